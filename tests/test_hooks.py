"""The plugin manager and the hook specifications (`loraplan.hooks`): built-ins and third parties register
strategies the same way, are found by name, and every failure names the plugin."""

from __future__ import annotations

import sys

import pluggy
import pytest

from loraplan import LoraPlan, get_plugin_manager, hookimpl
from loraplan.errors import ConfigError, PluginError
from loraplan.hooks import AUTOLOAD_ENV, DEFAULT_PLUGINS, Registered, selectors, sharers
from loraplan.hooks.manager import lookup
from loraplan.strategies import Selector, Sharer, SharingResult


def test_builtins_are_registered_as_plugins(pm):
    assert set(selectors(pm)) == {
        "cka",
        "activation",
        "gradient",
        "lora_drop",
        "random",
        "top",
        "bottom",
        "every_other",
        "none",
        "snr",
        "condition",
        "all",
    }
    assert set(sharers(pm)) == {"angular", "lora_drop", "odd_even"}
    assert selectors(pm)["cka"].plugin == "loraplan.plugins.cka"


def test_the_builtin_plugins_are_registered_in_order_under_their_module_names(pm):
    names = [pm.get_name(plugin) for plugin in pm.get_plugins()]
    assert sorted(names) == sorted(DEFAULT_PLUGINS)
    assert [impl.plugin_name for impl in pm.hook.loraplan_register_selectors.get_hookimpls()] == [
        name for name in DEFAULT_PLUGINS if "loraplan_register_selectors" in vars(sys.modules[name])
    ]


def test_a_third_party_selector_and_sharer_are_found_by_name(pm, third_party):
    assert "last_two" not in selectors(pm)
    pm.register(third_party.plugin(), name="acme")
    found = lookup(selectors(pm), "last_two", "selector")
    assert isinstance(found, Registered) and isinstance(found.strategy, third_party.LastTwo)
    assert (found.name, found.plugin) == ("last_two", "acme")
    assert lookup(sharers(pm), "pair_all", "share").plugin == "acme"
    assert selectors(pm)["cka"].plugin == "loraplan.plugins.cka"  # the built-ins are still there


def test_an_unknown_name_lists_what_is_installed_and_suggests_the_closest(pm):
    with pytest.raises(ConfigError) as exc:
        lookup(sharers(pm), "angualr", "share")
    message = str(exc.value)
    assert (
        "`share` is 'angualr', which no installed plugin provides. Installed: angular, lora_drop, odd_even." in message
    )
    assert "Did you mean 'angular'?" in message and "'loraplan' entry-point group" in message
    with pytest.raises(ConfigError) as exc:
        lookup(selectors(pm), "zzz", "selector")
    assert "`selector` is 'zzz'" in str(exc.value) and "Did you mean" not in str(exc.value)


def test_each_call_returns_a_fresh_manager(third_party):
    a, b = get_plugin_manager(load_entrypoints=False), get_plugin_manager(load_entrypoints=False)
    a.register(third_party.plugin(), name="third-party")
    assert "last_two" in selectors(a) and "last_two" not in selectors(b)


def test_a_registration_hook_that_fails_names_the_plugin(pm):
    class Fails:
        @hookimpl
        def loraplan_register_sharers(self, register):
            raise RuntimeError("cannot import torch_extra")

    pm.register(Fails(), name="acme-fails")
    with pytest.raises(PluginError, match="'acme-fails' failed in hook 'loraplan_register_sharers'"):
        sharers(pm)


def test_a_name_registered_twice_is_an_error(pm, third_party):
    class Clash:
        @hookimpl
        def loraplan_register_selectors(self, register):
            class Cka(third_party.LastTwo):
                name = "cka"

            register(Cka())

    pm.register(Clash(), name="acme-clash")
    with pytest.raises(
        PluginError, match="'cka' is registered twice: by plugin 'loraplan.plugins.cka' and by plugin 'acme-clash'"
    ):
        selectors(pm)


def test_a_strategy_without_a_name_is_refused(pm):
    class Nameless(Sharer):
        name = ""

        def share(self, ctx):
            return SharingResult(groups=[])

    class P:
        @hookimpl
        def loraplan_register_sharers(self, register):
            register(Nameless())

    pm.register(P(), name="acme-nameless")
    with pytest.raises(PluginError, match="plugin 'acme-nameless' registered a sharer without a `name`"):
        sharers(pm)


def test_a_strategy_call_names_the_plugin_and_lets_loraplan_errors_through():
    class Fragile(Selector):
        name = "fragile"

        def score(self, ctx):
            if ctx == "bad setting":
                raise ConfigError("`options.x` is wrong")
            raise IndexError("list index out of range")

    registered = Registered(Fragile(), "acme-fragile")
    with pytest.raises(PluginError) as exc:
        registered.call("score", None)
    assert str(exc.value) == (
        "plugin 'acme-fragile' failed in Fragile.score() of strategy 'fragile': IndexError: list index out of range"
    )
    assert isinstance(exc.value.__cause__, IndexError)
    with pytest.raises(ConfigError, match="`options.x` is wrong"):
        registered.call("score", "bad setting")


def test_hook_implementations_are_checked_against_the_specifications(pm):
    class TooMany:
        @hookimpl
        def loraplan_plan_final(self, plan, model):  # the spec passes only `plan`
            pass

    with pytest.raises(pluggy.PluginValidationError, match="model"):
        pm.register(TooMany(), name="acme-too-many")

    class Fewer:  # an implementation may take fewer arguments than the spec
        @hookimpl
        def loraplan_adjust_plan(self, plan):
            plan.notes.append("seen")

    pm.register(Fewer(), name="acme-fewer")
    plan = LoraPlan(num_layers=2, selected_layers=[0])
    pm.hook.loraplan_adjust_plan(plan=plan, model=None, stats=None)
    assert plan.notes == ["seen"]
    assert pm.hook.loraplan_find_layers.spec.opts["firstresult"] is True


def test_an_installed_plugin_that_cannot_import_is_an_error_naming_the_switch(tmp_path, monkeypatch):
    package = tmp_path / "loraplan_broken_toy"
    package.mkdir()
    (package / "__init__.py").write_text("import torch_extra_that_is_not_installed\n")
    dist = tmp_path / "loraplan_broken_toy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: loraplan-broken-toy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[loraplan]\nbroken = loraplan_broken_toy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    try:
        with pytest.raises(PluginError) as exc:
            get_plugin_manager()
        message = str(exc.value)
        assert "entry-point group 'loraplan'" in message and "ModuleNotFoundError" in message
        assert f"set {AUTOLOAD_ENV}=1 to skip installed plugins" in message
        # skipped on request, by argument or by the switch
        assert "cka" in selectors(get_plugin_manager(load_entrypoints=False))
        monkeypatch.setenv(AUTOLOAD_ENV, "1")
        assert "cka" in selectors(get_plugin_manager())
    finally:
        sys.modules.pop("loraplan_broken_toy", None)
