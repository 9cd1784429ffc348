"""Generated blocks in hand-written Markdown pages: the benchmarks replace their own block and keep the text around
it."""

from __future__ import annotations

from pathlib import Path


def write_block(path: Path, begin: str, end: str, block: str) -> None:
    """Replace the text from ``begin`` through ``end`` in ``path`` with ``block`` (which carries its own markers),
    or append ``block`` when the page or the markers are missing."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
