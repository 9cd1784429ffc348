"""Strategies are plugins: third parties register them through the same hooks and use them by name."""

from __future__ import annotations

import sys
import textwrap

import pytest

from loraplan import PlanConfig, get_plugin_manager, hookimpl, make_plan
from loraplan.errors import ConfigError, PluginError
from loraplan.hooks import selectors
from loraplan.strategies import Selector


def test_a_plugin_registered_in_a_test_is_usable_by_name(pm, make_llama, make_batches, third_party):
    pm.register(third_party.plugin(), name="third-party")
    plan = make_plan(
        make_llama(layers=6),
        make_batches(),
        PlanConfig(selector="last_two", share="pair_all", calibration_samples=8),
        plugin_manager=pm,
        progress=False,
    )
    assert plan.selected_layers == [4, 5]
    assert plan.share_groups == [[4, 5]]


def test_an_entry_point_plugin_is_loaded_by_the_manager(tmp_path, monkeypatch, make_llama, make_batches):
    package = tmp_path / "loraplan_toy"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            import loraplan
            from loraplan.strategies import Selector

            class Middle(Selector):
                name = "middle"

                def score(self, ctx):
                    mid = (ctx.num_layers - 1) / 2
                    return {"importance": [-abs(i - mid) for i in range(ctx.num_layers)]}

            @loraplan.hookimpl
            def loraplan_register_selectors(register):
                register(Middle())
            """
        )
    )
    dist = tmp_path / "loraplan_toy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: loraplan-toy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[loraplan]\ntoy = loraplan_toy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LORAPLAN_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    try:
        manager = get_plugin_manager()
        assert "middle" in selectors(manager)
        plan = make_plan(
            make_llama(layers=5),
            make_batches(),
            PlanConfig(selector="middle", count=1, calibration_samples=8),
            plugin_manager=manager,
            progress=False,
        )
        assert plan.selected_layers == [2]
        # the switch turns installed plugins off
        monkeypatch.setenv("LORAPLAN_DISABLE_PLUGIN_AUTOLOAD", "1")
        assert "middle" not in selectors(get_plugin_manager())
    finally:
        sys.modules.pop("loraplan_toy", None)


def test_unknown_selector_lists_what_is_installed(pm, make_llama, make_batches):
    with pytest.raises(ConfigError) as exc:
        make_plan(make_llama(), make_batches(), PlanConfig(selector="ckaa"), plugin_manager=pm, progress=False)
    message = str(exc.value)
    assert "`selector` is 'ckaa'" in message
    assert "activation" in message and "every_other" in message and "Did you mean 'cka'" in message


def test_unknown_sharer_lists_what_is_installed(pm, make_llama, make_batches):
    with pytest.raises(ConfigError) as exc:
        make_plan(make_llama(), make_batches(), PlanConfig(share="cosine"), plugin_manager=pm, progress=False)
    assert "`share` is 'cosine'" in str(exc.value) and "angular, lora_drop, odd_even" in str(exc.value)


def test_an_exception_inside_a_plugin_names_the_plugin(pm, make_llama, make_batches):
    class Broken(Selector):
        name = "broken"

        def score(self, ctx):
            raise ZeroDivisionError("oops")

    class BrokenPlugin:
        @hookimpl
        def loraplan_register_selectors(self, register):
            register(Broken())

    pm.register(BrokenPlugin(), name="acme-broken")
    with pytest.raises(PluginError) as exc:
        make_plan(make_llama(), make_batches(), PlanConfig(selector="broken"), plugin_manager=pm, progress=False)
    assert "'acme-broken'" in str(exc.value) and "ZeroDivisionError: oops" in str(exc.value)
    assert isinstance(exc.value.__cause__, ZeroDivisionError)


def test_an_exception_inside_a_hook_names_the_plugin(pm, make_llama, make_batches):
    class Adjuster:
        @hookimpl
        def loraplan_adjust_plan(self, plan):
            raise KeyError("missing")

    pm.register(Adjuster(), name="acme-adjust")
    with pytest.raises(PluginError, match="plugin 'acme-adjust' failed in hook 'loraplan_adjust_plan'"):
        make_plan(make_llama(), make_batches(), PlanConfig(calibration_samples=8), plugin_manager=pm, progress=False)


def test_plugins_can_adjust_a_plan_and_are_told_when_it_is_final(pm, make_llama, make_batches):
    seen = []

    class PinFirst:
        @hookimpl
        def loraplan_adjust_plan(self, plan, model, stats):
            if 0 not in plan.selected_layers:
                plan.selected_layers = sorted([0, *plan.selected_layers])
                plan.notes.append("layer 0 pinned by pin-first")
            assert stats.num_samples == 8 and model is not None

        @hookimpl
        def loraplan_plan_final(self, plan):
            seen.append(list(plan.selected_layers))

    pm.register(PinFirst(), name="pin-first")
    plan = make_plan(
        make_llama(layers=6),
        make_batches(),
        PlanConfig(selector="top", calibration_samples=8),
        plugin_manager=pm,
        progress=False,
    )
    assert plan.selected_layers == [0, 3, 4, 5]
    assert plan.notes == ["layer 0 pinned by pin-first"]
    assert seen == [[0, 3, 4, 5]]


def test_a_plugin_returning_bad_scores_is_named(pm, make_llama, make_batches):
    class Short(Selector):
        name = "short"

        def score(self, ctx):
            return {"importance": [1.0]}

    class P:
        @hookimpl
        def loraplan_register_selectors(self, register):
            register(Short())

    pm.register(P(), name="acme-short")
    with pytest.raises(PluginError, match="acme-short.*expected one per layer"):
        make_plan(make_llama(), make_batches(), PlanConfig(selector="short"), plugin_manager=pm, progress=False)
