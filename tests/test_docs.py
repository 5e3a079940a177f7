"""The documentation builds without warnings, and its Python snippets are valid Python."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
SNIPPET = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_snippets_compile(page: Path) -> None:
    for n, snippet in enumerate(SNIPPET.findall(page.read_text())):
        if snippet.lstrip().startswith(">>>"):
            continue  # an interactive session, shown for its output
        compile(snippet, f"{page.name}#snippet{n}", "exec")


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [p.name for p in PAGES[:-1] if p.name not in nav] == []
