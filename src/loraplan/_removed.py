"""Names that loraplan no longer uses, kept for a release with a warning (names that moved are :mod:`._moved`'s)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def removed(old: str, names: dict[str, Any], moved: dict[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that still gives each of ``names`` (name -> its value, kept under a
    private name where it was defined), warning that it goes away.

    A module has one ``__getattr__``: one that also keeps names that moved passes them as ``moved`` (name -> the
    module it lives in now, as :func:`loraplan._moved.moved` takes them), with the same warning as there. (Calling
    that function from this one would make its warning point at this module instead of the caller's line.)"""
    moved = moved or {}

    def __getattr__(name: str) -> Any:
        if name in names:
            warnings.warn(
                f"{old}.{name} is deprecated: nothing in loraplan uses it, and it goes away in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
            return names[name]
        if name in moved:
            warnings.warn(
                f"{old}.{name} has moved to {moved[name]}.{name}; the old name goes away in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
