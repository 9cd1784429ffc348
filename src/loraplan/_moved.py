"""Names that moved to another module and keep working from the old one for a release, with a warning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._removed import removed


def moved(old: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that gives each of ``names`` (name -> the module it lives in now) from its
    new module, warning that the old place goes away. The new module is imported when the name is first asked for,
    so the two never import each other. (A module that also keeps removed names uses :func:`._removed.removed`.)"""
    return removed(old, {}, names)
