"""The cost model: hand-counted FLOPs, the regime of every layer, budgets that trade importance against backward
depth, the settings that drive them, and what the plan and the CLI show."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loraplan import ConfigError, LoraPlan, PlanConfig, make_plan
from loraplan.allocation import select_within_budget
from loraplan.cli import main
from loraplan.cost import LayerCosts, flop_costs, measure_costs, predict, regimes, relative
from loraplan.layers import find_layers

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_flop_counts_by_hand(make_llama):
    costs = flop_costs(make_llama(layers=6), targets=["q_proj", "v_proj"], rank=4, batch=2, seq_len=10)
    # d=32, 4 heads of 8, 2 KV heads (k, v: 32 -> 16), MLP 64: sum of in*out over the seven linears
    linear = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    attention = 4 * (10 / 2) * 32  # QK^T and AV over a causal context of seq/2, per token
    tokens = 20
    forward = (2 * linear + attention) * tokens / 1e9
    backward = (2 * linear + 2 * attention) * tokens / 1e9
    lora = 4 * (32 + 32 + 32 + 16)
    assert costs.layer["skip"] == pytest.approx(forward)
    assert costs.layer["frozen"] == pytest.approx(forward + backward)
    assert costs.layer["lora"] == pytest.approx(forward + backward + 6 * lora * tokens / 1e9)
    assert costs.layer["frozen_ckpt"] == pytest.approx(2 * forward + backward)
    assert costs.head == pytest.approx(4 * 32 * 101 * tokens / 1e9)  # lm_head forward and input gradient
    assert costs.lora_params_per_layer == lora and costs.num_layers == 6 and costs.source == "flops"
    with pytest.raises(ConfigError, match=r"`target_modules` \['wq'\] match no linear module of layer 0"):
        flop_costs(make_llama(layers=2), targets=["wq"], rank=4, batch=1, seq_len=4)


def test_regime_of_every_layer():
    top = [3, 4, 5]
    assert regimes(6, top, checkpointing=True, truncate=True, input_grads=True) == (
        ["skip"] * 3 + ["lora_first_ckpt", "lora_ckpt", "lora_ckpt"]
    )
    assert (
        regimes(6, top, checkpointing=True, truncate=False, input_grads=True) == ["frozen_ckpt"] * 3 + ["lora_ckpt"] * 3
    )
    assert regimes(6, top, checkpointing=False, truncate=False, input_grads=False) == ["skip"] * 3 + [
        "lora_first",
        "lora",
        "lora",
    ]
    assert regimes(6, [1, 3, 5], checkpointing=False, truncate=True, input_grads=True) == [
        "skip",
        "lora_first",
        "frozen",
        "lora",
        "frozen",
        "lora",
    ]


def synthetic(num_layers: int = 6) -> LayerCosts:
    """Round numbers: a skipped layer 1, back-propagated 3, with LoRA 4 (+1 and +2 under checkpointing), head 2."""
    layer = {
        "skip": 1.0,
        "frozen": 3.0,
        "frozen_ckpt": 4.0,
        "lora": 4.0,
        "lora_ckpt": 6.0,
        "lora_first": 4.0,
        "lora_first_ckpt": 6.0,
    }
    memory = {
        "weights": 100.0,
        "saved": {"frozen": 10.0, "lora": 12.0, "checkpointed": 1.0, "head": 5.0},
        "head_transient": 7.0,
    }
    return LayerCosts("flops", "GFLOP", [1, 1], 8, num_layers, layer, 2.0, 0.0, 1, memory)


def test_loraplan_is_never_predicted_slower_or_bigger_than_stock(make_llama):
    costs = flop_costs(make_llama(layers=6), targets=ALL, rank=8, batch=2, seq_len=16)
    for selected in ([3, 4, 5], [0, 1, 2], [1, 3, 5], [5], list(range(6))):
        for checkpointing in (True, False):
            ours = predict(costs, selected, checkpointing=checkpointing, truncate=True)
            stock = predict(costs, selected, checkpointing=checkpointing, truncate=False, input_grads=True)
            assert ours.time <= stock.time and ours.memory <= stock.memory
            if min(selected) == 0:
                assert ours.time == stock.time
    # LoRA on every layer is the reference: ratio 1
    assert relative(costs, list(range(6)), checkpointing=True) == (pytest.approx(1.0), pytest.approx(1.0))


def test_predicted_memory_by_hand():
    costs = synthetic()
    # top half with checkpointing: three skipped layers keep nothing, three checkpointed keep their input (1 each),
    # the larger of one layer's recomputation (12) and the logits' gradient (7), the head (5), weights (100), 3 LoRA
    # sets of 1 parameter * 16 bytes
    assert predict(costs, [3, 4, 5], checkpointing=True).memory == 100 + 3 + 12 + 5 + 3 * 16
    # stock PEFT without checkpointing but with input grads: three frozen (10) and three LoRA (12) layers saved, and
    # the logits' gradient on top while the head back-propagates
    assert (
        predict(costs, [3, 4, 5], checkpointing=False, truncate=False, input_grads=True).memory == 100 + 66 + 7 + 5 + 48
    )


def test_time_budget_trades_importance_for_backward_depth():
    costs = synthetic()
    # layer 0 is the single most important one, but adapting it back-propagates through everything
    importance = [10.0, 0.0, 1.0, 5.0, 4.0, 4.0]
    reference = predict(costs, range(6), checkpointing=True, truncate=False).time
    assert reference == 6 * 6 + 2
    layers, record = select_within_budget(
        importance, costs, time_budget=0.6, param_budget=None, checkpointing=True, base_rank=8, plan_rank=8
    )  # 0.6 * 38 = 22.8
    by_cut = {c["lowest"]: c for c in record.candidates}
    # cut 0, layer 0 alone: 6 + five back-propagated layers (4 each) + head 2 = 28: does not fit
    assert by_cut[0]["fits"] is False and by_cut[0]["time"] == pytest.approx(28 / 38)
    # cut 2: two skipped (1 each) + 6 + three back-propagated (12) + 2 = 22; one more LoRA layer adds 2: 24 > 22.8
    assert by_cut[2]["count"] == 1 and by_cut[2]["time"] == pytest.approx(22 / 38)
    # cut 3: 3 + 6 + 4 + 4 + 2 = 19, plus layer 4 (the next most important): 21; plus layer 5: 23 > 22.8
    assert by_cut[3]["layers"] == [3, 4] and by_cut[3]["time"] == pytest.approx(21 / 38)
    assert by_cut[4]["layers"] == [4, 5] and by_cut[4]["importance"] == 8.0
    assert layers == record.chosen["layers"] == [3, 4] and record.chosen["importance"] == 9.0
    # the two most important layers would be 0 and 3: 6 + 6 + four back-propagated (16) + 2 = 30
    assert record.top_by_importance["layers"] == [0, 3]
    assert record.top_by_importance["time"] == pytest.approx(30 / 38)
    assert "2 layers from layer 3 up, predicted 0.55x" in record.summary and "would cost 0.79x" in record.summary
    # a generous budget takes the important layer 0 after all
    layers, _ = select_within_budget(
        importance, costs, time_budget=1.0, param_budget=None, checkpointing=True, base_rank=8, plan_rank=8
    )
    assert layers == list(range(6))
    # parameters: half the layers at the same rank; at twice the rank, a quarter
    layers, record = select_within_budget(
        importance, costs, time_budget=None, param_budget=0.5, checkpointing=True, base_rank=8, plan_rank=8
    )
    assert layers == [0, 3, 4] and record.param_layers == 3
    layers, _ = select_within_budget(
        importance, costs, time_budget=1.0, param_budget=0.34, checkpointing=True, base_rank=8, plan_rank=16
    )
    assert layers == [0]


def test_unscorable_layers_are_never_chosen_and_an_impossible_budget_says_what_would_fit():
    costs = synthetic()
    importance = [math.nan, 5.0, 1.0, 1.0, 1.0, 9.0]
    layers, _ = select_within_budget(
        importance, costs, time_budget=1.0, param_budget=None, checkpointing=True, base_rank=8, plan_rank=8
    )
    assert 0 not in layers and layers == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError) as exc:
        select_within_budget(
            importance, costs, time_budget=0.2, param_budget=None, checkpointing=True, base_rank=8, plan_rank=8
        )
    # the cheapest plan: layer 5 alone, 5 skipped + 6 + head = 13 / 38
    assert "`time_budget` 0.2" in str(exc.value) and "0.342x" in str(exc.value) and "at least 0.343" in str(exc.value)
    with pytest.raises(ConfigError, match=r"`param_budget` 0.1 allows 0.60 layers"):
        select_within_budget(
            importance, costs, time_budget=None, param_budget=0.1, checkpointing=True, base_rank=8, plan_rank=8
        )


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"time_budget": 0.0}, "time_budget"),
        ({"time_budget": 1.5}, "time_budget"),
        ({"param_budget": -0.1}, "param_budget"),
        ({"param_budget": True}, "param_budget"),
        ({"cost_model": "guess"}, "cost_model"),
        ({"cost_checkpointing": "yes"}, "cost_checkpointing"),
        ({"cost_shape": [8]}, "cost_shape"),
        ({"cost_shape": [8, 0]}, "cost_shape"),
        ({"cost_shape": "8x512"}, "cost_shape"),
        ({"time_budget": 0.5, "cumulative": 0.9}, "cumulative"),
    ],
    ids=lambda v: str(v),
)
def test_budget_settings_are_validated_with_the_key_and_the_value(changes, key):
    with pytest.raises(ConfigError) as exc:
        PlanConfig(**changes)
    assert f"`{key}`" in str(exc.value)
    assert repr(changes[key]) in str(exc.value) or str(changes[key]) in str(exc.value)


def test_plan_with_a_time_budget_records_the_trade_off_and_is_reproducible(tmp_path, pm, make_llama, make_batches):
    config = PlanConfig(selector="cka", time_budget=0.7, calibration_samples=16, cost_shape=[2, 32])
    plans = [
        make_plan(make_llama(layers=12), make_batches(), config, plugin_manager=pm, progress=False) for _ in range(2)
    ]
    assert plans[0].save(tmp_path / "a.json").read_bytes() == plans[1].save(tmp_path / "b.json").read_bytes()
    plan = plans[0]
    budget = plan.cost["budget"]
    assert plan.selected_layers == budget["chosen"]["layers"]
    assert budget["chosen"]["time"] <= 0.7 and len(budget["candidates"]) == 12
    assert plan.cost["predicted"]["checkpointing"]["loraplan"]["time"] == pytest.approx(budget["chosen"]["time"])
    assert plan.cost["source"] == "flops" and plan.cost["shape"] == [2, 32]
    assert any("r=8" in n for n in plan.cost["notes"])  # no LoRA rank known: the assumption is recorded
    assert LoraPlan.load(tmp_path / "a.json") == plan


def test_every_plan_carries_predictions(pm, make_llama, make_batches):
    plan = make_plan(
        make_llama(layers=6),
        make_batches(),
        PlanConfig(selector="top", calibration_samples=8),
        plugin_manager=pm,
        progress=False,
        lora_rank=4,
    )
    predicted = plan.cost["predicted"]
    assert set(predicted) == {"checkpointing", "no_checkpointing"}
    assert predicted["checkpointing"]["loraplan"]["time"] < predicted["checkpointing"]["stock"]["time"] < 1
    assert predicted["no_checkpointing"]["loraplan"] == predicted["no_checkpointing"]["stock_no_input_grads"]
    assert plan.cost["rank"] == 4


def test_timed_costs_leave_the_model_untouched(make_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(layers=4), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.base_model.model.activation_checkpointing_enable()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    costs = measure_costs(model, targets=["q_proj", "v_proj"], rank=4, batch=2, seq_len=8, passes=1)
    assert (
        costs.source == "timed"
        and costs.unit == "s"
        and set(costs.layer) == set(flop_costs(model, targets=["q_proj", "v_proj"], rank=4, batch=2, seq_len=8).layer)
    )
    assert all(v > 0 for v in costs.layer.values()) and costs.head > 0
    saved = costs.memory["saved"]
    assert saved["lora"] > saved["frozen"] > saved["checkpointed"] > 0  # LoRA also keeps A(x)
    for name, param in model.named_parameters():
        value, requires_grad = before[name]
        assert torch.equal(param.detach(), value) and param.requires_grad == requires_grad and param.grad is None
    layers = find_layers(model).layers
    assert not any(m._forward_pre_hooks or m._forward_hooks for layer in layers for m in layer.modules())
    assert all(layer.gradient_checkpointing for layer in layers)


def test_cli_show_prints_the_cost_model_and_the_budget(tmp_path, capsys, pm, make_llama, make_batches):
    config = PlanConfig(selector="cka", time_budget=0.8, calibration_samples=16, cost_shape=[2, 32])
    path = make_plan(make_llama(layers=8), make_batches(), config, plugin_manager=pm, progress=False).save(
        tmp_path / "p.json"
    )
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cost model (FLOP counts, batch 2 x 32 tokens, r=8)" in out
    assert "activation checkpointing: with loraplan" in out and "stock PEFT" in out
    assert "budget: time_budget 0.8 (with checkpointing)" in out and "best cuts" in out


def test_a_plan_saved_before_the_budget_settings_existed_still_matches_default_settings(pm, make_llama, make_batches):
    from loraplan.integrations._common import config_differences

    config = PlanConfig(selector="top", calibration_samples=8)
    plan = make_plan(make_llama(layers=4), make_batches(), config, plugin_manager=pm, progress=False)
    old = {
        k: v
        for k, v in plan.config.items()
        if k not in ("time_budget", "param_budget", "cost_model", "cost_checkpointing", "cost_shape")
    }
    older = LoraPlan.from_dict({**plan.to_dict(), "config": old})
    assert config_differences(older, config) == []
    assert config_differences(older, config.replace(time_budget=0.5)) == ["time_budget: plan None, now 0.5"]


# -- the fitted model (cost_model="fitted") -------------------------------------------------------------------------

#: the H200 run of benchmarks/step_time.py --preset gpu (2026-12-04, TinyLlama-1.1B shape, bf16, batch 8 x 1024, r=16
#: on all seven projections; ../shared/measurements/h200-2026-12-04/step_time_gpu.json, kept as it was recorded)
H200 = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "step_time_gpu_h200.json"


def _replay_costs(rows: list[dict], num_layers: int):
    """LayerCosts fitted on three recorded rows per checkpointing setting: all layers, stock top half, loraplan's."""
    from loraplan.cost import LayerCosts, fit_step_costs
    from loraplan.cost.fitted import layer_costs_from_fit

    def pick(plan: str, mode: str, checkpointing: bool) -> dict:
        return next(r for r in rows if (r["plan"], r["mode"], r["checkpointing"]) == (plan, mode, checkpointing))

    fits = {}
    for checkpointing in (True, False):
        chosen = [pick("all layers", "all layers", checkpointing), pick("top half", "stock PEFT", checkpointing)]
        chosen.append(pick("top half", "loraplan", checkpointing))
        samples = [
            (r["layers"], num_layers - r["lowest"] if r["mode"] == "loraplan" else num_layers, r["median_s"])
            for r in chosen
        ]
        fits[checkpointing] = fit_step_costs(samples)
    template = LayerCosts("flops", "GFLOP", [8, 1024], 16, num_layers, {}, 0.0, 0.0, 1)
    template.layer = {
        name: 0.0 for name in ("skip", "frozen", "frozen_ckpt", "lora", "lora_ckpt", "lora_first", "lora_first_ckpt")
    }
    return layer_costs_from_fit(fits, template, {})


def test_the_fitted_model_explains_the_recorded_h200_table():
    """Fitted on three rows per checkpointing setting, the structure predicts every other row of the recorded H200
    table (stock PEFT, loraplan, input grads off, the time-budget plan) within 10 % (in fact within 1.1 %)."""
    from loraplan.cost import predict

    recorded = json.loads(H200.read_text(encoding="utf-8"))
    num_layers = 22
    costs = _replay_costs(recorded["rows"], num_layers)
    plans = {**recorded["plans"], "all layers": list(range(num_layers))}
    worst = 0.0
    for row in recorded["rows"]:
        layers, checkpointing = plans[row["plan"]], row["checkpointing"]
        truncate = row["mode"] == "loraplan"
        input_grads = row["mode"] != "stock PEFT, input grads off"
        reference = predict(costs, range(num_layers), checkpointing=checkpointing, truncate=False, input_grads=True)
        mine = predict(costs, layers, checkpointing=checkpointing, truncate=truncate, input_grads=input_grads)
        error = abs(mine.time / reference.time - row["time_ratio"]) / row["time_ratio"]
        assert error < 0.10, (row["plan"], row["mode"], checkpointing, mine.time / reference.time, row["time_ratio"])
        worst = max(worst, error)
    assert worst < 0.011  # what the recorded table gives: every row within 1.1 %


def test_paired_times_cancel_a_drift_and_drop_a_disturbed_round():
    """Rounds in which every layout ran once: a machine that slows down from round to round moves no ratio, and one
    round another process disturbed moves no estimate (the fastest step alone would take the early, fast rounds of
    one layout against the late, slow rounds of another)."""
    from loraplan.cost.fitted import paired_times

    drift = [1.0, 1.1, 1.2, 1.3, 1.4]
    times = {"all": [2.0 * d for d in drift], "half": [1.5 * d for d in drift]}
    times["half"][2] *= 1.5  # a disturbed round
    estimate = paired_times(times, reference="all")
    assert estimate["all"] == pytest.approx(2.0 * 1.2)
    assert estimate["half"] / estimate["all"] == pytest.approx(0.75)
    with pytest.raises(ValueError):  # every layout must have run in every round
        paired_times({"all": [1.0, 1.0], "half": [1.0]}, reference="all")


def test_fitted_costs_time_the_model_itself_and_leave_it_as_it_was(pm, make_llama, make_batches):
    model = make_llama(layers=6)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    modules = [name for name, _ in model.named_modules()]
    plan = make_plan(
        model,
        make_batches(),
        PlanConfig(cost_model="fitted", time_budget=0.7, calibration_samples=16, cost_shape=[2, 32]),
        plugin_manager=pm,
        lora_rank=4,
        progress=False,
    )
    cost = plan.cost
    assert cost["source"] == "fitted" and cost["unit"] == "s" and cost["head_checkpointing"] > 0
    assert set(cost["samples"]) == {
        f"{l}|{c}" for l in ("all layers", "top half, stock", "top half, truncated") for c in ("ckpt", "no-ckpt")
    }
    assert cost["layer"]["skip"] == 0.0 and cost["layer"]["lora_ckpt"] > cost["layer"]["frozen_ckpt"] > 0
    assert plan.cost["predicted"]["checkpointing"]["loraplan"]["time"] <= 0.7 + 1e-9
    # the model is as it was: modules, weights, no checkpointing or input-grad hooks left behind
    assert [name for name, _ in model.named_modules()] == modules
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not model.is_gradient_checkpointing if hasattr(model, "is_gradient_checkpointing") else True
    assert not model.get_input_embeddings()._forward_hooks
