"""Calling plugins: a strategy with the plugin that registered it, and a hook call whose failure names the plugin.

A leaf (it imports nothing of loraplan's but the errors), so that what calls a hook, :func:`loraplan.layers.find_layers`
with the caller's manager for one, does not import the manager that builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import LoraPlanError, PluginError

if TYPE_CHECKING:
    import pluggy

__all__ = ["Registered", "call_hook"]


@dataclass(frozen=True)
class Registered:
    """A strategy together with the plugin that registered it."""

    strategy: Any
    plugin: str

    @property
    def name(self) -> str:
        return self.strategy.name

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``strategy.method``; an unexpected exception is re-raised naming the plugin."""
        try:
            return getattr(self.strategy, method)(*args, **kwargs)
        except LoraPlanError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {self.plugin!r} failed in {type(self.strategy).__name__}.{method}() of strategy "
                f"{self.name!r}: {type(exc).__name__}: {exc}"
            ) from exc


def call_hook(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> Any:
    """Call a hook; an unexpected exception from a plugin is re-raised naming the plugin."""
    caller = getattr(pm.hook, hook_name)
    try:
        return caller(**kwargs)
    except LoraPlanError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {_blame(caller, exc)!r} failed in hook {hook_name!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _blame(caller: Any, exc: BaseException) -> str:
    """The plugin whose implementation raised ``exc``, from the traceback."""
    tb = exc.__traceback__
    codes = {
        impl.function.__code__: impl.plugin_name
        for impl in caller.get_hookimpls()
        if hasattr(impl.function, "__code__")
    }
    blamed = "unknown"
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            blamed = codes[tb.tb_frame.f_code]
        tb = tb.tb_next
    return blamed
