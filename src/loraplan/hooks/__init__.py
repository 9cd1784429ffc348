"""loraplan's pluggy hooks: the markers, the specifications and the plugin manager."""

from ._markers import PROJECT, hookimpl, hookspec
from .manager import AUTOLOAD_ENV, DEFAULT_PLUGINS, Registered, get_plugin_manager, selectors, sharers

__all__ = [
    "AUTOLOAD_ENV",
    "DEFAULT_PLUGINS",
    "PROJECT",
    "Registered",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "selectors",
    "sharers",
]
