"""The exception tree.

Every error loraplan raises on purpose is a :class:`LoraPlanError`. Errors about what the user asked for
(configuration, plan files that do not fit) also subclass :class:`ValueError`, so callers that already catch
``ValueError`` around configuration keep working.

Messages follow one form: the key in backticks, what was given, what is allowed, how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "ConfigError",
    "LayerDiscoveryError",
    "LoraPlanError",
    "PlanMismatchError",
    "PluginError",
]


class LoraPlanError(Exception):
    """Base class of every loraplan error."""


class ConfigError(LoraPlanError, ValueError):
    """A setting has a value loraplan cannot use."""


class CalibrationError(LoraPlanError, ValueError):
    """The calibration data or the calibration pass cannot give a trustworthy plan."""


class LayerDiscoveryError(LoraPlanError):
    """The transformer layer stack of a model could not be found."""


class PlanMismatchError(LoraPlanError, ValueError):
    """A plan does not fit the model, adapter or checkpoint it is applied to."""


class PluginError(LoraPlanError):
    """A plugin failed; the message names the plugin and the strategy."""


def closest(name: str, known: object) -> str | None:
    """The known name closest to a misspelt ``name`` (for "did you mean" in error messages), or ``None``."""
    import difflib

    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)  # type: ignore[call-overload]
    return match[0] if match else None
