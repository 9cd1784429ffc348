"""Axolotl plugin: enable with ``plugins: [loraplan.integrations.axolotl.LoraPlanPlugin]`` and a ``loraplan:`` block.

``LoraPlanPlugin`` (needs axolotl) is imported on first access, so ``loraplan.integrations.axolotl.args`` (pydantic
only) can be used without Axolotl installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoraPlanArgs", "LoraPlanPlugin"]


def __getattr__(name: str) -> Any:
    if name == "LoraPlanPlugin":
        from .plugin import LoraPlanPlugin

        return LoraPlanPlugin
    if name == "LoraPlanArgs":
        from .args import LoraPlanArgs

        return LoraPlanArgs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
