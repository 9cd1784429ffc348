"""Keep loraplan's modules and functions small enough to read: no module over 450 lines, no function over 80.

A function's length is from its ``def`` line to its last line, docstring included (nested functions count on their
own too). Exit 1, listing each one over its limit, when there is one.

    python .ci/sizes.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "loraplan"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def oversized(folder: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(
                        f"{name}:{node.lineno}: {node.name}() is {length} lines (at most {MAX_FUNCTION_LINES})"
                    )
    return found


def main() -> int:
    found = oversized()
    if found:
        print(*found, sep="\n")
        return 1
    print(f"every module of src/loraplan is at most {MAX_MODULE_LINES} lines, every function {MAX_FUNCTION_LINES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
