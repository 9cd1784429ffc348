"""Weight-only selectors (snr, condition): their formulas against an independent computation, planning without
data, streaming from a checkpoint's shards (the same plan as the model in memory), a third-party weight selector,
and the rank cap of importance ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraplan import ConfigError, LoraPlan, PlanConfig, apply_plan, hookimpl, make_plan
from loraplan.allocation import allocate_ranks
from loraplan.checkpoint import plan_checkpoint
from loraplan.cli import main
from loraplan.spectra import condition_number, singular_values, snr
from loraplan.strategies import WEIGHTS, Selector

# -- the formulas ------------------------------------------------------------------------------------------------


def _spectrum_snr(w: np.ndarray) -> float:
    """Spectrum's SNR from numpy's SVD, written from the paper's reference code's description."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    sigma = (np.quantile(s, 0.75) - np.quantile(s, 0.25)) / 1.349
    m, n = w.shape
    beta = min(m, n) / max(m, n)
    edge = sigma * (1 + math.sqrt(beta))
    signal, noise = s[s > edge].sum(), s[s <= edge]
    return float(signal / (noise.sum() if noise.size else 1.0) / s[0])


@pytest.mark.parametrize("shape", [(48, 48), (32, 96), (96, 32)])
def test_snr_and_condition_number_agree_with_numpys_svd(shape):
    g = torch.Generator().manual_seed(1)
    # low rank signal plus noise, as a trained weight looks: some singular values stand above the noise edge
    w = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g) + 0.1 * torch.randn(
        *shape, generator=g
    )
    values = singular_values(w)
    exact = torch.tensor(np.linalg.svd(w.double().numpy(), compute_uv=False))
    # float32 Gram: every singular value within 1e-4 of the largest (the small ones lose their relative accuracy)
    assert torch.allclose(values.double(), exact, rtol=0, atol=1e-4 * float(exact[0]))
    assert snr(values, shape) == pytest.approx(_spectrum_snr(w.numpy()), rel=2e-3)  # the quantiles read small values
    assert condition_number(w) == pytest.approx(float(np.linalg.cond(w.double().numpy())), rel=1e-4)
    # a bf16 weight is accumulated in float32: the same spectrum as the float32 copy of it
    assert torch.equal(singular_values(w.to(torch.bfloat16)), singular_values(w.to(torch.bfloat16).float()))


# -- planning without data -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("selector", ["snr", "condition"])
def test_a_weight_selector_plans_without_data_from_the_mean_over_target_modules(selector, pm, make_llama):
    model = make_llama(layers=6)
    plan = make_plan(model, None, PlanConfig(selector=selector, ratio=0.5), plugin_manager=pm, progress=False)
    layers = model.model.layers
    names = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    names += [f"self_attn.{m}" for m in ("k_proj", "o_proj", "q_proj", "v_proj")]
    for i, got in enumerate(plan.scores["importance"]):
        ws = [layers[i].get_submodule(n).weight.detach() for n in names]
        if selector == "snr":
            want = sum(_spectrum_snr(w.numpy()) for w in ws) / len(ws)  # from an exact SVD
        else:
            want = 1 / (sum(math.log(np.linalg.cond(w.double().numpy())) for w in ws) / len(ws))
        assert got == pytest.approx(want, rel=2e-3)
    order = sorted(range(6), key=lambda i: -plan.scores["importance"][i])
    assert plan.selected_layers == sorted(order[:3])
    assert plan.calibration["num_samples"] == 0 and plan.calibration["weights"] == "model"
    assert plan.calibration["statistics"] == ["weights"]


def test_without_data_a_weight_selector_takes_budgets_and_importance_ranks(pm, make_llama):
    model = make_llama(layers=6)
    ranked = make_plan(
        model,
        None,
        PlanConfig(selector="snr", rank_policy="importance", param_budget=0.5),
        lora_rank=8,
        plugin_manager=pm,
        progress=False,
    )
    assert sum(ranked.rank_pattern.values()) == 24 and ranked.cost["budget"]["rank_units"] == 24
    timed = make_plan(model, None, PlanConfig(selector="snr", time_budget=0.7), lora_rank=8, plugin_manager=pm)
    assert timed.cost["budget"]["chosen"]["time"] <= 0.7
    counted = make_plan(model, None, PlanConfig(selector="snr", count=2), plugin_manager=pm, progress=False)
    assert len(counted.selected_layers) == 2


def test_what_needs_data_is_refused_without_it(pm, make_llama):
    model = make_llama(layers=4)
    with pytest.raises(ConfigError, match=r"selector 'cka' reads the calibration statistics \['hidden'\]"):
        make_plan(model, None, PlanConfig(selector="cka"), plugin_manager=pm)
    with pytest.raises(ConfigError, match="`share` 'angular' groups layers by their representations on data"):
        make_plan(model, None, PlanConfig(selector="snr", share="angular"), plugin_manager=pm)


# -- streamed from a checkpoint ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_shards(smollm2_dir, tmp_path_factory):
    """The real SmolLM2-135M saved in bf16 as several safetensors shards."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("smollm2-bf16")
    AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="100MB")
    return out


def test_the_checkpoint_streamed_gives_the_plan_of_the_model_in_memory(smollm2_shards, pm, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert len(list(smollm2_shards.glob("*.safetensors"))) >= 2
    settings = PlanConfig(selector="snr", ratio=0.5)
    model = AutoModelForCausalLM.from_pretrained(smollm2_shards, dtype=torch.bfloat16)
    in_memory = make_plan(model, None, settings, plugin_manager=pm, progress=False)
    streamed = plan_checkpoint(smollm2_shards, settings, plugin_manager=pm, progress=False)
    assert streamed.selected_layers == in_memory.selected_layers and len(streamed.selected_layers) == 15
    assert streamed.scores["snr"] == in_memory.scores["snr"]  # the same tensors, the same arithmetic
    assert streamed.model_fingerprint == in_memory.model_fingerprint
    for key in ("path", "pattern", "target_modules", "module_shapes"):
        assert streamed.stack[key] == in_memory.stack[key]
    assert streamed.calibration["weights"] == "checkpoint"
    # the CLI takes the same path without --data, and the plan applies to the model as any plan does
    assert main(["analyze", str(smollm2_shards), "--selector", "snr", "--ratio", "0.5", "--out", str(tmp_path)]) == 0
    saved = LoraPlan.load(tmp_path)
    assert saved.selected_layers == in_memory.selected_layers
    peft_model = apply_plan(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), saved)
    adapted = {n.split(".")[4] for n, _ in peft_model.named_modules(remove_duplicate=False) if n.endswith("lora_A")}
    assert sorted(map(int, adapted)) == saved.selected_layers


def test_what_the_checkpoint_cannot_price_or_share_is_refused(smollm2_shards, pm, capsys):
    with pytest.raises(ConfigError, match="`time_budget` .* needs the model"):
        plan_checkpoint(smollm2_shards, PlanConfig(selector="snr", time_budget=0.6), plugin_manager=pm)
    assert main(["analyze", str(smollm2_shards), "--selector", "cka"]) == 2
    assert "`--data` is not given: `calibration_data` is None, but selector 'cka'" in capsys.readouterr().err


def test_a_checkpoint_without_safetensors_is_named(tmp_path, pm):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ConfigError, match="has no safetensors weights"):
        plan_checkpoint(tmp_path, PlanConfig(selector="snr"), plugin_manager=pm)


# -- a third party's weight selector -----------------------------------------------------------------------------


class Heaviest(Selector):
    """The layers whose target weights have the largest Frobenius norm (the docs/writing-plugins.md example)."""

    name = "heaviest"
    requires = frozenset({WEIGHTS})
    data_dependent = False

    def score(self, ctx):
        w = ctx.weights
        return {
            "importance": [
                sum(float(w.weight(i, name).float().norm()) for name in w.names(i)) for i in range(w.num_layers)
            ]
        }


class Plugin:
    @hookimpl
    def loraplan_register_selectors(self, register):
        register(Heaviest())


def test_a_third_party_weight_selector_plans_in_memory_and_from_a_checkpoint(pm, make_llama, tmp_path):
    pm.register(Plugin(), name="heaviest")
    model = make_llama(layers=4)
    for i, layer in enumerate(model.model.layers):  # layer 2 is the heaviest, then layer 0
        layer.mlp.down_proj.weight.data *= {0: 3.0, 2: 5.0}.get(i, 1.0)
    model.save_pretrained(tmp_path)
    settings = PlanConfig(selector="heaviest", count=2)
    assert make_plan(model, None, settings, plugin_manager=pm).selected_layers == [0, 2]
    assert plan_checkpoint(tmp_path, settings, plugin_manager=pm, progress=False).selected_layers == [0, 2]


# -- the rank cap ----------------------------------------------------------------------------------------------------


def test_max_rank_caps_a_layer_and_gives_its_excess_to_the_others():
    assert allocate_ranks([1.0, 1.0, 10.0], 24) == [2, 2, 20]
    assert allocate_ranks([1.0, 1.0, 10.0], 24, max_rank=12) == [6, 6, 12]
    assert allocate_ranks([1.0, 2.0, 3.0, 20.0], 40, rank_multiple=4, max_rank=16) == [4, 8, 12, 16]
    assert allocate_ranks([1.0, 10.0], 24, max_rank=8) == [8, 8]  # every unit capped: the rest stays unspent
    for seed in range(20):
        weights = torch.rand(8, generator=torch.Generator().manual_seed(seed)).tolist()
        ranks = allocate_ranks(weights, 64, rank_multiple=4, max_rank=12)
        assert max(ranks) <= 12 and all(r % 4 == 0 for r in ranks) and 64 - 4 < sum(ranks) <= 64


def test_max_rank_reaches_the_plan_and_is_checked(pm, make_llama):
    plan = make_plan(
        make_llama(layers=6),
        None,
        PlanConfig(selector="snr", rank_policy="importance", param_budget=0.5, max_rank=5),
        lora_rank=8,
        plugin_manager=pm,
        progress=False,
    )
    assert max(plan.rank_pattern.values()) <= 5 and sum(plan.rank_pattern.values()) == 24
    assert "max_rank 5" in plan.notes[0]
    with pytest.raises(ConfigError, match="`max_rank` 2 is below `min_rank` 4"):
        PlanConfig(rank_policy="importance", min_rank=4, max_rank=2)
