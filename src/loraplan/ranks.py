"""Moved: per-layer ranks from importance now live in :mod:`loraplan.allocation.ranks` (``allocate_ranks``); the old
name warns and keeps working for a release."""

from ._moved import moved

__getattr__ = moved(__name__, {"allocate_ranks": "loraplan.allocation.ranks"})
