"""The documentation builds without warnings, and every code block in it runs.

Each fenced block of docs/*.md and README.md is one test (``page:line:language``): Python is
executed against a local receiver, shell commands are checked against the real parsers, data
blocks are parsed. tests/docs_snippets.py describes how, and the markers a block may carry.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from langfuse_mw.devserver import DevServer
from tests import docs_snippets
from tests.docs_snippets import PAGES, ROOT, Block

BLOCKS = docs_snippets.collect()
CODE = [block for block in BLOCKS if block.category != "text"]
MAX_SKIPPED = 0.10  # share of the code blocks that may be skipped


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [p.name for p in PAGES[:-1] if p.name not in nav] == []


def test_every_block_has_a_known_language_and_valid_markers() -> None:
    assert [problem for block in BLOCKS for problem in docs_snippets.problems(block)] == []


def test_skips_are_few_and_explained() -> None:
    counts = Counter(block.category for block in BLOCKS)
    skipped = [block for block in CODE if block.category == "skipped"]
    print(f"\ndocs code blocks: {dict(counts)}")
    for block in skipped:
        print(f"  skipped {block.where}: {block.marker.options.get('reason')}")
    assert all(block.marker.options.get("reason", "").strip() for block in skipped)
    assert len(skipped) < MAX_SKIPPED * len(CODE), [block.where for block in skipped]


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DevServer]:
    """A local Langfuse for the snippet; the process is left as it was found."""
    monkeypatch.chdir(tmp_path)  # files a snippet writes land here
    with (
        DevServer(port=0, db=":memory:", public_key=docs_snippets.DEV_PUBLIC_KEY,
                  secret_key=docs_snippets.DEV_SECRET_KEY) as server,
        docs_snippets.isolated(server),
    ):  # fmt: skip
        yield server


@pytest.mark.parametrize("block", CODE, ids=lambda block: block.id)
def test_snippet(block: Block, receiver: DevServer, tmp_path: Path) -> None:
    if block.category == "skipped":
        if block.kind == "python":
            docs_snippets.compile_block(block)
        pytest.skip(f"{block.where}: {block.marker.options['reason']}")
    docs_snippets.check(block, receiver, tmp_path)
