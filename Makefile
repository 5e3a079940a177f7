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

# Benchmarks run in a venv of their own: the [bench] extra (Logfire) loads itself into every
# process of the venv it is installed in (a pydantic plugin), which the tests must not measure.
BENCH_VENV := .venv-bench
BENCH := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH)/python -m pip install --quiet --upgrade pip
	$(BENCH)/python -m pip install --quiet -e ".[all,dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH)/python benchmarks/asgi_overhead.py
	$(BENCH)/python benchmarks/wsgi_overhead.py
	$(BENCH)/python benchmarks/server_throughput.py

# Instructions per request under valgrind: noise-free comparisons (needs valgrind installed).
bench-instructions: $(BENCH_STAMP)
	$(BENCH)/python benchmarks/instructions.py

demo: $(STAMP)
	$(BIN)/python -m demo_apps.run

clean:
	rm -rf $(VENV) $(BENCH_VENV) build dist *.egg-info
