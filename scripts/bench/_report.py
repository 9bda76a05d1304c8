"""Write one benchmark's section into BENCHMARKS.md, leaving the other sections alone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_HEADER = (
    "# Benchmarks\n\n"
    "Measured, not asserted: each section is written by a script in `scripts/bench/`.\n"
)


def write_section(mark: str, heading: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- mark -->`` and ``<!-- /mark -->``."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else _HEADER
    block = f"<!-- {mark} -->\n{heading}\n\n{body}\n<!-- /{mark} -->"
    pattern = re.compile(rf"<!-- {mark} -->.*?<!-- /{mark} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
