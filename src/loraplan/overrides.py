"""Dotted ``section.key=value`` overrides for YAML configs (the recipes and the benchmarks share them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_yaml(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The YAML mapping at ``path`` with ``overrides`` applied (see :func:`apply_overrides`)."""
    try:
        import yaml
    except ImportError as exc:  # pyyaml comes with the `trl` and `dev` extras
        raise ImportError("reading a YAML config needs pyyaml: pip install 'loraplan[trl]' (or pyyaml)") from exc
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: expected a YAML mapping at the top level, got {type(config).__name__}")
    return apply_overrides(config, overrides)


def apply_overrides(config: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Set ``a.b.c=value`` in ``config`` for each override (value parsed as YAML, missing sections created)."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SystemExit(f"override {item!r}: {part!r} holds {child!r}, not a section")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return config
