"""Moved: choosing layers within a budget now lives in :mod:`loraplan.allocation.budget` (``select_within_budget``,
``Completion``); the old names warn and keep working for a release."""

from .._moved import moved

__getattr__ = moved(__name__, {name: "loraplan.allocation.budget" for name in ("Completion", "select_within_budget")})
