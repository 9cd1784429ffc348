"""loraplan's pluggy hooks: the markers, the specifications, the plugin manager and the calls into plugins."""

from ._markers import PROJECT, hookimpl, hookspec
from .calls import Registered, call_hook
from .manager import AUTOLOAD_ENV, DEFAULT_PLUGINS, get_plugin_manager, selectors, sharers

__all__ = [
    "AUTOLOAD_ENV",
    "DEFAULT_PLUGINS",
    "PROJECT",
    "Registered",
    "call_hook",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "selectors",
    "sharers",
]
