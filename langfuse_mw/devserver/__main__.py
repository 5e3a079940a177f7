"""``python -m langfuse_mw.devserver``: the same as ``langfuse-mw devserver``."""

from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["devserver", *sys.argv[1:]]))
