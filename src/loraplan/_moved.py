"""Names that moved to another module and keep working from the old one for a release, with a warning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that gives each of ``names`` (name -> the module it lives in now) from its
    new module, warning that the old place goes away. The new module is imported when the name is first asked for,
    so the two never import each other."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} has moved to {names[name]}.{name}; the old name goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
