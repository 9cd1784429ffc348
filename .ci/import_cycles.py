"""Find import circles among loraplan's own modules (and among the benchmarks scripts).

Every import counts, the lazy ones inside functions too. Imports under ``if TYPE_CHECKING:`` (they never run) are
counted in a second pass: a circle that only they close is an error too, unless it is one of ``ANNOTATION_CIRCLES``
below, each with the reason it is kept. Importing ``a.b.c`` counts as an edge to ``a.b.c`` alone: the parent packages'
``__init__`` runs too, but an edge to it is only counted when the name comes from the package itself
(``from loraplan import make_plan``).

    python .ci/import_cycles.py            # exit 1 and print each circle when there is one
    python .ci/import_cycles.py --graph    # print the whole graph
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: circles closed by type-only imports alone, kept on purpose: module set -> why
ANNOTATION_CIRCLES = {
    frozenset({"loraplan.plan", "loraplan.layout", "loraplan.plan_stacks"}): (
        "LoraPlan calls layout.plan_lora_config (to_lora_config) and plan_stacks (an encoder-decoder plan's file); "
        "both name LoraPlan in their signatures only. Breaking it would restate LoraPlan as a Protocol."
    ),
}
TREES = {"loraplan": ROOT / "src" / "loraplan", "benchmarks": ROOT / "benchmarks"}


def _modules() -> dict[str, Path]:
    found = {}
    for top, folder in TREES.items():
        for path in sorted(folder.rglob("*.py")):
            # the benchmarks are scripts run from their folder: they import one another by bare name
            base = folder.parent if top == "loraplan" else folder
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_only: bool = False):
    """Yield the import nodes that run (``type_only``: those under ``if TYPE_CHECKING:`` too)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_only:
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def graph(type_only: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path)), type_only):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _resolve(name, is_package, node)
                # `from pkg import sub` names the submodule when there is one, else a name defined in pkg
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.attr` style leftovers
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _report(edges: dict[str, set[str]], component: list[str], what: str) -> None:
    inside = [f"  {a} -> {b}" for a in component for b in sorted(edges[a]) if b in component]
    print(f"{what} among {', '.join(component)}:", *inside, sep="\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="store_true", help="print every module's imports")
    args = parser.parse_args(argv)
    edges, annotated = graph(), graph(type_only=True)
    if args.graph:
        for name in sorted(edges):
            print(f"{name}: {', '.join(sorted(edges[name])) or '-'}")
    found = cycles(edges)
    for component in found:
        _report(edges, component, "import circle")
    typed = [c for c in cycles(annotated) if not any(set(c) <= set(f) for f in found)]
    kept = [c for c in typed if frozenset(c) in ANNOTATION_CIRCLES]
    new = [c for c in typed if frozenset(c) not in ANNOTATION_CIRCLES]
    for component in new:
        _report(annotated, component, "import circle (closed by type-only imports)")
    for component in kept:
        print(f"kept: type-only circle among {', '.join(component)}: {ANNOTATION_CIRCLES[frozenset(component)]}")
    if not found and not new:
        print(f"no import circles among {len(edges)} modules ({len(kept)} type-only circle(s) kept, listed above)")
    return 1 if found or new else 0


if __name__ == "__main__":
    sys.exit(main())
