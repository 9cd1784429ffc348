"""Generated blocks in hand-written Markdown pages: the benchmarks replace their own block and keep the text around
it."""

from __future__ import annotations

import re
from pathlib import Path


def replace_block(
    text: str, begin: str, end: str, block: str, *, every: bool = False, gap_if_empty: bool = False
) -> str:
    """``text`` with the span from ``begin`` through the next ``end`` replaced by ``block`` (which carries its own
    markers), or with ``block`` appended after a blank line when no such span is there.

    ``every``: replace every such span, not only the first. ``gap_if_empty``: an empty ``text`` gets the blank line
    before an appended ``block`` too (else the block starts the page)."""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    replaced, found = pattern.subn(lambda _m: block, text, count=0 if every else 1)
    if found:
        return replaced
    return text.rstrip("\n") + ("\n\n" if text or gap_if_empty else "") + block + "\n"


def write_block(path: Path, begin: str, end: str, block: str) -> None:
    """Replace the text from ``begin`` through ``end`` in ``path`` with ``block`` (which carries its own markers),
    or append ``block`` when the page or the markers are missing."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    text = replace_block(text, begin, end, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
