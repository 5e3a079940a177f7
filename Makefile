# Two commands a newcomer needs: `make test` and `make demo`. Both create .venv with python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typing check demo bench bench-instructions clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy --strict langfuse_mw benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check .

typing: $(STAMP)
	$(BIN)/python -m mypy --strict langfuse_mw benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/asgi_overhead.py
	$(BIN)/python benchmarks/wsgi_overhead.py
	$(BIN)/python benchmarks/server_throughput.py

# Instructions per request under valgrind: noise-free comparisons (needs valgrind installed).
bench-instructions: $(STAMP)
	$(BIN)/python benchmarks/instructions.py

demo: $(STAMP)
	$(BIN)/python -m demo_apps.run

clean:
	rm -rf $(VENV) build dist *.egg-info
