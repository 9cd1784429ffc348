"""Building the plugin manager and reading the strategies plugins registered."""

from __future__ import annotations

import importlib
import os
from typing import Any

import pluggy

from ..errors import ConfigError, PluginError, closest
from . import specs
from ._markers import PROJECT
from .calls import Registered, call_hook

__all__ = ["DEFAULT_PLUGINS", "AUTOLOAD_ENV", "Registered", "call_hook", "get_plugin_manager", "selectors", "sharers"]

#: Built-in plugins, registered on every manager, in this order.
DEFAULT_PLUGINS = (
    "loraplan.plugins.architectures",
    "loraplan.plugins.cka",
    "loraplan.plugins.activation",
    "loraplan.plugins.gradient",
    "loraplan.plugins.baselines",
    "loraplan.plugins.lora_drop",
    "loraplan.plugins.spectral",
    "loraplan.plugins.angular",
    "loraplan.plugins.odd_even",
    "loraplan.plugins.shared_rest",
)

#: Set this environment variable (to anything but "" or "0") to stop entry-point plugins from loading.
AUTOLOAD_ENV = "LORAPLAN_DISABLE_PLUGIN_AUTOLOAD"


def get_plugin_manager(*, load_entrypoints: bool | None = None) -> pluggy.PluginManager:
    """A new plugin manager with the hook specifications, the built-in plugins and installed plugins.

    Installed plugins are those announced in the ``loraplan`` entry-point group. They load unless
    ``load_entrypoints=False`` or the ``LORAPLAN_DISABLE_PLUGIN_AUTOLOAD`` environment variable is set.
    Each call returns a fresh manager: nothing is shared between calls, nothing is loaded at import time.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(specs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entrypoints is None:
        load_entrypoints = os.environ.get(AUTOLOAD_ENV, "") in ("", "0")
    if load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(PROJECT)
        except Exception as exc:  # an installed plugin that cannot import must not be skipped silently
            raise PluginError(
                f"an installed loraplan plugin (entry-point group {PROJECT!r}) failed to load: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall it, or set {AUTOLOAD_ENV}=1 to skip installed plugins."
            ) from exc
    pm.check_pending()
    return pm


def _collect(pm: pluggy.PluginManager, hook_name: str, kind: str) -> dict[str, Registered]:
    found: dict[str, Registered] = {}
    caller = getattr(pm.hook, hook_name)
    for impl in caller.get_hookimpls():  # registration order: built-ins first

        def register(strategy: Any, _plugin: str = impl.plugin_name) -> None:
            name = getattr(strategy, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r} registered a {kind} without a `name`: {strategy!r}")
            if name in found:
                raise PluginError(
                    f"{kind} {name!r} is registered twice: by plugin {found[name].plugin!r} and by plugin "
                    f"{_plugin!r}. Rename one of them."
                )
            found[name] = Registered(strategy, _plugin)

        kwargs = {arg: register for arg in impl.argnames if arg == "register"}
        try:
            impl.function(**kwargs)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in hook {hook_name!r}: {type(exc).__name__}: {exc}"
            ) from exc
    return found


def selectors(pm: pluggy.PluginManager) -> dict[str, Registered]:
    """Every registered selector, by name."""
    return _collect(pm, "loraplan_register_selectors", "selector")


def sharers(pm: pluggy.PluginManager) -> dict[str, Registered]:
    """Every registered sharer, by name."""
    return _collect(pm, "loraplan_register_sharers", "sharer")


def lookup(registry: dict[str, Registered], name: str, key: str) -> Registered:
    """The strategy called ``name``; an unknown name is a config error listing what is installed."""
    if name not in registry:
        close = closest(name, registry)
        hint = f" Did you mean {close!r}?" if close else ""
        raise ConfigError(
            f"`{key}` is {name!r}, which no installed plugin provides. Installed: "
            f"{', '.join(sorted(registry))}.{hint} A third-party strategy must be installed in the "
            f"'{PROJECT}' entry-point group or registered with get_plugin_manager().register(...)."
        )
    return registry[name]
