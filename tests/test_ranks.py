"""Per-layer ranks from importance (rank_policy="importance") and LoRA-drop's shared rest (share="lora_drop"): the
allocation by hand, the budget to the parameter, and the round trip through real PEFT."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraplan import LoraPlan, PlanConfig, apply_plan, hookimpl, make_plan
from loraplan.allocation import allocate_ranks
from loraplan.apply import lora_modules_by_layer
from loraplan.errors import ConfigError, PlanMismatchError, PluginError
from loraplan.report import format_plan
from loraplan.strategies import Sharer, SharingResult

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj", "down_proj"]
#: LoRA parameters per unit of rank in one tiny-llama layer: (in + out) of q (32->32), v (32->16), down (64->32)
PER_RANK = (32 + 32) + (32 + 16) + (64 + 32)
LAYERS = 6


# -- the allocation, worked by hand ---------------------------------------------------------------------------------


def test_ranks_follow_importance_by_largest_remainders():
    # 24 units over weights 1:2:3 -> exactly 4, 8, 12
    assert allocate_ranks([1.0, 2.0, 3.0], 24) == [4, 8, 12]
    # 10 over 1:1:1 -> 3.33 each; the spare unit goes to the earliest of the tied remainders
    assert allocate_ranks([1.0, 1.0, 1.0], 10) == [4, 3, 3]
    # shares 2.5, 7.5 in multiples of 2: 1.25 and 3.75 multiples -> floors 1, 3; the spare goes to .75
    assert allocate_ranks([1.0, 3.0], 10, rank_multiple=2) == [2, 8]
    # a nan layer never gets a rank; all-zero weights share equally
    assert allocate_ranks([math.nan, 1.0, 1.0], 8) == [0, 4, 4]
    assert allocate_ranks([0.0, 0.0], 6) == [3, 3]


def test_a_layer_below_min_rank_is_left_out_and_its_share_goes_to_the_rest():
    # 16 over 1:1:6 -> 2, 2, 12; with min_rank 3 the least important short layer (the later of the ties: index 1) is
    # left out first, then 16 over 1:6 -> 2.29, 13.71 -> 2, 14: layer 0 is short too, and 16 goes to layer 2 alone
    assert allocate_ranks([1.0, 1.0, 6.0], 16, min_rank=3) == [0, 0, 16]
    # 16 over 2:3:3 -> 4, 6, 6 all reach min_rank 4
    assert allocate_ranks([2.0, 3.0, 3.0], 16, min_rank=4) == [4, 6, 6]
    # min_rank counts in multiples: min_rank 3 with multiple 4 means at least 4
    assert allocate_ranks([1.0, 7.0], 16, min_rank=3, rank_multiple=4) == [0, 16]


def test_the_ranks_never_exceed_the_budget():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=g))
        weights = torch.rand(n, generator=g).tolist()
        total = int(torch.randint(0, 120, (1,), generator=g))
        multiple = int(torch.randint(1, 5, (1,), generator=g))
        minimum = int(torch.randint(1, 9, (1,), generator=g))
        ranks = allocate_ranks(weights, total, min_rank=minimum, rank_multiple=multiple)
        assert sum(ranks) <= total, (weights, total, ranks)
        kept = [r for r in ranks if r]
        assert all(r % multiple == 0 and r >= minimum for r in kept)
        if kept:  # what is left over is less than one multiple
            assert total - sum(ranks) < multiple


def test_negative_importance_is_refused():
    with pytest.raises(ConfigError, match="must be non-negative"):
        allocate_ranks([1.0, -0.5], 8)


# -- plans with per-layer ranks -------------------------------------------------------------------------------------


def _plan(make_llama, make_batches, pm, lora_rank=4, **cfg):
    settings = dict(selector="cka", calibration_samples=16, rank_policy="importance")
    settings.update(cfg)
    return make_plan(
        make_llama(layers=LAYERS),
        make_batches(),
        PlanConfig(**settings),
        plugin_manager=pm,
        progress=False,
        lora_rank=lora_rank,
    )


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_param_budget_is_spent_exactly_in_proportion_to_importance(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, param_budget=0.5)
    importance = plan.scores["importance"]
    total = math.floor(0.5 * LAYERS * 4)  # rank units: half of six layers at r=4
    assert sum(plan.rank_pattern.values()) == total
    assert plan.selected_layers == sorted(plan.rank_pattern)
    expected = allocate_ranks(importance, total)
    assert plan.rank_pattern == {i: r for i, r in enumerate(expected) if r}
    assert plan.cost["budget"]["rank_units"] == total
    assert any(n.startswith("rank_policy 'importance'") for n in plan.notes)

    model = get_peft_model(make_llama(layers=LAYERS), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    apply_plan(model, plan)
    assert _trainable(model) == total * PER_RANK == 0.5 * LAYERS * 4 * PER_RANK
    for layer, modules in lora_modules_by_layer(model).items():
        for module in modules.values():
            assert module.r["default"] == plan.rank_pattern[layer]
            assert module.scaling["default"] == pytest.approx(8 / 4)  # alpha / r kept at every rank


def test_ranks_redistribute_the_selected_layers_budget_without_param_budget(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, ratio=0.5, rank_multiple=2)
    assert sum(plan.rank_pattern.values()) <= 3 * 4 and all(r % 2 == 0 for r in plan.rank_pattern.values())
    assert set(plan.rank_pattern) == set(plan.selected_layers)
    table = format_plan(plan, 4)
    assert "rank" in table.splitlines()[0] or any("rank" in line for line in table.splitlines()[:3])
    for layer, r in plan.rank_pattern.items():
        assert any(line.split()[:1] == [str(layer)] and f" {r} " in f" {line} " for line in table.splitlines())


def test_save_then_stock_peft_reload_gives_the_same_outputs(
    tmp_path, pm, make_llama, make_batches, read_sites, train_steps, reloaded
):
    plan = _plan(make_llama, make_batches, pm, param_budget=0.5, min_rank=2)
    assert len(set(plan.rank_pattern.values())) > 1, "the test needs different ranks"
    model = get_peft_model(make_llama(layers=LAYERS), LoraConfig(r=4, target_modules=TARGETS))
    apply_plan(model, plan)
    train_steps(model)
    stock, _ = reloaded(model, tmp_path / "adapter", lambda: make_llama(layers=LAYERS))
    sites = read_sites(stock)
    assert {int(name.split(".")[2]): r for name, r in sites.items()} == plan.rank_pattern
    assert LoraPlan.load(tmp_path / "adapter").rank_pattern == plan.rank_pattern


def test_a_users_per_module_ranks_are_scaled_and_rslora_keeps_alpha(pm, make_llama, make_batches, read_sites):
    plan = _plan(make_llama, make_batches, pm, param_budget=0.5, rank_multiple=2)
    user = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"q_proj": 8}, alpha_pattern={"q_proj": 4}
    )
    model = get_peft_model(make_llama(layers=LAYERS), user)
    apply_plan(model, plan)
    for layer, modules in lora_modules_by_layer(model).items():
        if not modules:
            assert layer not in plan.rank_pattern
            continue
        factor = plan.rank_pattern[layer] / 4
        assert modules["self_attn.q_proj"].r["default"] == round(8 * factor)
        assert modules["self_attn.q_proj"].lora_alpha["default"] == pytest.approx(4 * factor)
        assert modules["self_attn.v_proj"].r["default"] == plan.rank_pattern[layer]

    rs = get_peft_model(
        make_llama(layers=LAYERS), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True)
    )
    apply_plan(rs, plan)
    for layer, modules in lora_modules_by_layer(rs).items():
        if not modules:
            continue
        assert modules["self_attn.v_proj"].lora_alpha["default"] == 8
        assert modules["self_attn.v_proj"].scaling["default"] == pytest.approx(8 / math.sqrt(plan.rank_pattern[layer]))


def test_ranks_made_for_another_r_are_refused(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, param_budget=0.5)
    model = get_peft_model(make_llama(layers=LAYERS), LoraConfig(r=8, target_modules=TARGETS))
    with pytest.raises(ConfigError, match=r"allocated for a LoRA rank of 4, but the LoraConfig has r=8"):
        apply_plan(model, plan)


def test_importance_ranks_need_the_lora_rank(pm, make_llama, make_batches):
    with pytest.raises(ConfigError, match="lora_rank"):
        _plan(make_llama, make_batches, pm, lora_rank=None, param_budget=0.5)


def test_a_budget_too_small_for_min_rank_is_refused(pm, make_llama, make_batches):
    with pytest.raises(ConfigError, match="min_rank"):
        _plan(make_llama, make_batches, pm, param_budget=0.1, min_rank=8)


def test_a_tampered_rank_pattern_is_refused(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, ratio=0.5)
    data = plan.to_dict()
    unplanned = next(i for i in range(LAYERS) if i not in plan.selected_layers)
    data["rank_pattern"][str(unplanned)] = 4
    with pytest.raises(PlanMismatchError, match=f"gives layer {unplanned} rank 4"):
        LoraPlan.from_dict(data).validate()


# -- LoRA-drop's shared rest ------------------------------------------------------------------------------------


def test_the_shared_rest_is_one_tensor_per_module_type_after_training(
    tmp_path, pm, make_llama, make_batches, train_steps, reloaded
):
    plan = _plan(make_llama, make_batches, pm, rank_policy="keep", share="lora_drop", ratio=0.5)
    rest = [i for i in range(LAYERS) if i not in plan.selected_layers]
    assert plan.share_groups == [rest] and plan.shared_rest == rest and plan.adapted_layers == list(range(LAYERS))
    assert plan.num_modules() == len(plan.selected_layers) + 1
    assert any("truncated backward has nothing to skip" in n for n in plan.notes)

    model = get_peft_model(make_llama(layers=LAYERS), LoraConfig(r=4, target_modules=TARGETS))
    apply_plan(model, plan)
    assert _trainable(model) == (len(plan.selected_layers) + 1) * 4 * PER_RANK
    named = [n for n, _ in model.named_modules(remove_duplicate=False) if n.endswith("lora_A.default")]
    assert len(named) == LAYERS * len(TARGETS)  # every layer carries LoRA
    train_steps(model)
    by_layer = lora_modules_by_layer(model)
    for name in by_layer[rest[0]]:
        weights = {by_layer[i][name].lora_B["default"].weight.data_ptr() for i in rest}
        assert len(weights) == 1, f"{name}: the rest must share one tensor"
        own = {by_layer[i][name].lora_B["default"].weight.data_ptr() for i in plan.selected_layers}
        assert len(own) == len(plan.selected_layers) and not own & weights
    assert not torch.equal(by_layer[rest[0]]["self_attn.q_proj"].lora_B["default"].weight, torch.zeros(32, 4))

    _, ours = reloaded(model, tmp_path / "adapter", lambda: make_llama(layers=LAYERS), seed=3, is_trainable=True)
    ours_layers = lora_modules_by_layer(ours)
    assert (
        ours_layers[rest[0]]["mlp.down_proj"].lora_A["default"]
        is ours_layers[rest[-1]]["mlp.down_proj"].lora_A["default"]
    )


def test_the_shared_rest_keeps_r_beside_importance_ranks(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, share="lora_drop", param_budget=0.5, min_rank=3)
    rest = plan.shared_rest
    assert rest and all(i not in plan.rank_pattern for i in rest)
    # the budget pays the rest's module set at r=4 first
    assert sum(plan.rank_pattern.values()) == math.floor(0.5 * LAYERS * 4) - 4
    assert sum(plan.module_ranks(4)) == math.floor(0.5 * LAYERS * 4)
    # three layers reach min_rank 3 of 12 units; once the rest takes 4, the least important of them falls below it
    record = plan.cost["budget"]
    assert len(record["ranks"]["left_out"]) == 1 and record["ranks"]["rank_units"] == 8
    assert "1 of them left out again after sharing (8 units for the 2 selected layers)" in record["summary"]
    model = get_peft_model(make_llama(layers=LAYERS), LoraConfig(r=4, target_modules=TARGETS))
    apply_plan(model, plan)
    assert _trainable(model) == math.floor(0.5 * LAYERS * 4) * PER_RANK


class _EveryOther(Sharer):
    """A third-party sharer that gives the unselected layers one module: allowed only with shares_unselected."""

    name = "every_other_rest"

    def share(self, ctx):
        return SharingResult(groups=[[i for i in range(ctx.num_layers) if i not in ctx.selected]])


class _Plugin:
    def __init__(self, sharer):
        self.sharer = sharer

    @hookimpl
    def loraplan_register_sharers(self, register):
        register(self.sharer)


def test_a_third_party_sharer_gives_unselected_layers_lora_only_when_it_says_so(pm, make_llama, make_batches):
    pm.register(_Plugin(_EveryOther()))
    with pytest.raises(PluginError, match="shares_unselected = True"):
        _plan(make_llama, make_batches, pm, rank_policy="keep", share="every_other_rest")

    class Declared(_EveryOther):
        name = "declared_rest"
        shares_unselected = True

    pm.register(_Plugin(Declared()))
    plan = _plan(make_llama, make_batches, pm, rank_policy="keep", share="declared_rest")
    assert plan.adapted_layers == list(range(LAYERS)) and plan.shared_rest


# -- one budget: candidates priced as they train --------------------------------------------------------------------


def test_a_param_budget_pays_for_the_shared_rest(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, rank_policy="keep", share="lora_drop", param_budget=0.5)
    # 0.5 of six layers at r=4 is 12 rank units: the rest's module set takes 4, so two selected layers fit
    assert len(plan.selected_layers) == 2 and plan.num_modules() == 3
    assert plan.cost["budget"]["rank_units"] == 12
    assert plan.cost["budget"]["chosen"]["rank_units"] == 12


def test_a_time_budget_prices_the_shared_rest_and_refuses_what_cannot_fit(pm, make_llama, make_batches):
    with pytest.raises(ConfigError, match="shared rest gives the layers below the selection LoRA"):
        _plan(make_llama, make_batches, pm, rank_policy="keep", share="lora_drop", time_budget=0.6)
    plan = _plan(make_llama, make_batches, pm, rank_policy="keep", share="lora_drop", time_budget=1.0)
    candidates = plan.cost["budget"]["candidates"]
    assert all(c["adapted"] == LAYERS and c["lowest"] == 0 for c in candidates)  # the rest reaches layer 0
    assert plan.cost["predicted"]["checkpointing"]["loraplan"]["time"] <= 1.0 + 1e-9


def test_a_time_budget_with_importance_ranks_keeps_both(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, time_budget=0.6, param_budget=0.5)
    assert plan.cost["budget"]["chosen"]["time"] <= 0.6 + 1e-12
    assert plan.cost["predicted"]["checkpointing"]["loraplan"]["time"] <= 0.6 + 1e-9
    assert sum(plan.rank_pattern.values()) == math.floor(0.5 * LAYERS * 4)
    assert set(plan.rank_pattern) == set(plan.selected_layers)
    assert plan.cost["budget"]["ranks"]["rank_units"] == 12


def test_a_share_group_is_one_unit_with_one_rank(pm, make_llama, make_batches, train_steps):
    plan = _plan(make_llama, make_batches, pm, ratio=1.0, share="angular", share_threshold=0.5)
    assert plan.share_groups, "the threshold must form a group"
    units = plan.module_ranks(4)
    assert len(units) == plan.num_modules() and sum(units) == LAYERS * 4  # six layers' r, over fewer module sets
    importance = plan.scores["importance"]
    weights = []
    for layer in plan.adapted_layers:
        group = plan.group_of(layer)
        if group is None:
            weights.append(importance[layer])
        elif plan.share_groups[group][0] == layer:
            weights.append(sum(importance[i] for i in plan.share_groups[group]))
    assert units == allocate_ranks(weights, LAYERS * 4)
    for group in plan.share_groups:
        assert len({plan.rank_pattern[i] for i in group}) == 1
    model = get_peft_model(make_llama(layers=LAYERS), LoraConfig(r=4, target_modules=TARGETS))
    apply_plan(model, plan)
    train_steps(model)
    assert _trainable(model) == sum(units) * PER_RANK
