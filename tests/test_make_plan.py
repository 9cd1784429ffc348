"""make_plan end to end on tiny models: every strategy, agreement with an independent computation,
reproducibility, and the recorded facts."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from loraplan import LoraPlan, PlanConfig, make_plan
from loraplan.similarity import angular_similarity, linear_cka

SELECTORS = ["cka", "activation", "gradient", "random", "top", "bottom", "every_other", "all"]
SHARERS = [None, "angular", "odd_even"]


def _bert_batches(make_batches, **kw):
    batches = make_batches(**kw)
    for b in batches:
        b["input_ids"][:, 0] = 2  # a [CLS]-like first token, as a real tokenizer adds
        b["labels"] = (b["input_ids"][:, 1] % 2).long()  # sequence labels, for the gradient selector
    return batches


@pytest.mark.parametrize("share", SHARERS, ids=lambda s: f"share={s}")
@pytest.mark.parametrize("selector", SELECTORS)
def test_every_strategy_on_a_tiny_llama(selector, share, pm, make_llama, make_batches):
    model = make_llama(layers=6)
    cfg = PlanConfig(selector=selector, share=share, share_threshold=0.5, calibration_samples=16)
    plan = make_plan(model, make_batches(), cfg, plugin_manager=pm, progress=False)
    expected_count = 6 if selector == "all" else 3
    assert len(plan.selected_layers) == expected_count
    assert plan.num_layers == 6
    assert len(plan.scores["importance"]) == 6
    for group in plan.share_groups:
        assert set(group) <= set(plan.selected_layers) and len(group) >= 2
    if share == "odd_even":
        assert plan.share_groups == [
            [i, i + 1] for i in plan.selected_layers if i % 2 == 0 and i + 1 in plan.selected_layers
        ]
    if share == "angular":
        assert plan.similarity is not None and len(plan.similarity) == 6
    assert plan.calibration["num_samples"] == 16
    plan.validate()


@pytest.mark.parametrize("share", SHARERS, ids=lambda s: f"share={s}")
@pytest.mark.parametrize("selector", SELECTORS)
def test_every_strategy_on_a_tiny_bert(selector, share, pm, make_bert, make_batches):
    model = make_bert(layers=4)
    cfg = PlanConfig(selector=selector, share=share, share_threshold=0.3, calibration_samples=16)
    plan = make_plan(model, _bert_batches(make_batches), cfg, plugin_manager=pm, progress=False)
    assert plan.calibration["pooling"] == "first"
    assert len(plan.selected_layers) == (4 if selector == "all" else 2)
    assert set(plan.selected_layers) <= set(range(4))
    if selector == "cka":
        # the [CLS] embedding is the same for every sample: layer 0's input is constant and cannot be scored
        assert 0 in plan.flagged_layers and 0 not in plan.selected_layers
        assert math.isnan(plan.scores["cka"][0])
        assert any("flagged" in w for w in plan.warnings)


def test_cka_selection_equals_an_independent_computation(pm, make_llama, make_batches):
    model = make_llama(layers=8, seed=3)
    batches = make_batches(n_batches=4, batch=8, length=16, seed=5)
    plan = make_plan(model, batches, PlanConfig(calibration_samples=32), plugin_manager=pm, progress=False)
    pooled = [[] for _ in range(9)]
    with torch.no_grad():
        for b in batches:
            hidden = model(**b, output_hidden_states=True).hidden_states
            last = b["attention_mask"].sum(1) - 1
            for i, h in enumerate(hidden):
                pooled[i].append(h[torch.arange(h.shape[0]), last])
    pooled = [torch.cat(p) for p in pooled]
    cka = [linear_cka(pooled[i], pooled[i + 1]) for i in range(8)]
    expected = sorted(sorted(range(8), key=lambda i: cka[i])[:4])
    assert plan.selected_layers == expected
    assert plan.scores["cka"] == pytest.approx(cka, abs=1e-7)


def test_angular_groups_equal_an_independent_computation(pm, make_llama, make_batches):
    model = make_llama(layers=8, seed=4)
    batches = make_batches(n_batches=2, batch=8, length=16, seed=6)
    cfg = PlanConfig(selector="all", share="angular", share_threshold=0.6, calibration_samples=16)
    plan = make_plan(model, batches, cfg, plugin_manager=pm, progress=False)
    outputs = [[] for _ in range(8)]
    with torch.no_grad():
        for b in batches:
            hidden = model(**b, output_hidden_states=True).hidden_states
            last = b["attention_mask"].sum(1) - 1
            for i in range(8):
                outputs[i].append(hidden[i + 1][torch.arange(8), last])
    sim = angular_similarity([torch.cat(o) for o in outputs])
    for row, expected_row in zip(plan.similarity, sim):
        assert row == pytest.approx(expected_row, abs=1e-7)
    visited, groups = set(), []
    for i in range(8):
        if i in visited:
            continue
        members = [j for j in range(i + 1, 8) if sim[i][j] >= 0.6 and j not in visited]
        if members:
            groups.append([i, *members])
            visited.update([i, *members])
    assert plan.share_groups == groups
    assert groups  # the threshold was chosen so that groups form


def test_activation_scores_equal_an_independent_computation(pm, make_llama, make_batches):
    model = make_llama(layers=4, seed=1)
    batches = make_batches(n_batches=2, batch=4, length=10, seed=2)
    cfg = PlanConfig(selector="activation", target_modules=["q_proj", "o_proj", "down_proj"], calibration_samples=8)
    plan = make_plan(model, batches, cfg, plugin_manager=pm, progress=False)
    sums = torch.zeros(4, 3, dtype=torch.float64)
    tokens = 0.0
    seen = {}

    def hook(key):
        def fn(module, args):
            seen[key] = args[0].detach()

        return fn

    handles = []
    for l, layer in enumerate(model.model.layers):
        for m, mod in enumerate([layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj]):
            handles.append(mod.register_forward_pre_hook(hook((l, m))))
    with torch.no_grad():
        for b in batches:
            model(**b)
            mask = b["attention_mask"].bool()
            tokens += float(mask.sum())
            for (l, m), x in seen.items():
                sums[l, m] += x.norm(dim=-1)[mask].double().sum()
    for h in handles:
        h.remove()
    expected = (sums / tokens).mean(dim=1)
    assert plan.scores["activation"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert plan.selected_layers == sorted(torch.topk(expected, 2).indices.tolist())


def test_gradient_scores_equal_an_independent_computation(pm, make_llama, make_batches):
    model = make_llama(layers=4, seed=2)
    batches = make_batches(n_batches=2, batch=4, length=10, seed=3)
    cfg = PlanConfig(selector="gradient", target_modules=["v_proj", "up_proj"], calibration_samples=8, batch_size=4)
    plan = make_plan(model, batches, cfg, plugin_manager=pm, progress=False)
    per_batch = []
    for b in batches:
        model.zero_grad()
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        model(**b, labels=labels).loss.backward()
        per_batch.append(
            [
                float(l.self_attn.v_proj.weight.grad.norm() + l.mlp.up_proj.weight.grad.norm())
                for l in model.model.layers
            ]
        )
    model.zero_grad()
    expected = torch.tensor(per_batch).mean(0)
    assert plan.scores["gradient"] == pytest.approx(expected.tolist(), rel=1e-4)
    # calibration left the model as it was: nothing trainable changed, no gradients kept
    assert all(p.requires_grad for p in model.parameters())


def test_same_inputs_give_a_byte_identical_plan(tmp_path, pm, make_llama, make_batches):
    cfg = PlanConfig(selector="cka", share="angular", share_threshold=0.5, calibration_samples=16)
    paths = []
    for run in range(2):
        plan = make_plan(make_llama(layers=6), make_batches(), cfg, plugin_manager=pm, progress=False)
        paths.append(plan.save(tmp_path / f"plan{run}.json"))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert LoraPlan.load(paths[0]) == plan


def test_the_plan_records_what_is_needed_to_reproduce_it(pm, make_llama, make_batches):
    plan = make_plan(
        make_llama(layers=6),
        make_batches(),
        PlanConfig(calibration_samples=16, seed=7),
        plugin_manager=pm,
        lora_rank=8,
        progress=False,
    )
    assert plan.model_fingerprint["class"] == "LlamaForCausalLM" and plan.model_fingerprint["num_layers"] == 6
    assert plan.model_fingerprint["hidden_size"] == 32 and plan.model_fingerprint["config_hash"].startswith("sha256:")
    assert plan.calibration["data_hash"].startswith("sha256:") and plan.calibration["seed"] == 7
    assert plan.config == PlanConfig(calibration_samples=16, seed=7).to_dict()
    assert plan.versions["torch"] == torch.__version__.split("+")[0] or plan.versions["torch"].startswith(
        torch.__version__.split("+")[0]
    )
    assert plan.rank == 8
    assert "cka" in plan.stability and -1.0 <= plan.stability["cka"] <= 1.0
    assert plan.stack["module_shapes"]["self_attn.q_proj"] == [32, 32]
    assert len(plan.diagnostics["max_sample_variance_share"]) == 7


def test_other_data_gives_another_data_hash(pm, make_llama, make_batches):
    a = make_plan(
        make_llama(), make_batches(seed=1), PlanConfig(calibration_samples=16), plugin_manager=pm, progress=False
    )
    b = make_plan(
        make_llama(), make_batches(seed=2), PlanConfig(calibration_samples=16), plugin_manager=pm, progress=False
    )
    assert a.calibration["data_hash"] != b.calibration["data_hash"]


def test_count_cumulative_and_budget_rank(pm, make_llama, make_batches):
    model = make_llama(layers=6)
    plan = make_plan(
        model, make_batches(), PlanConfig(count=4, calibration_samples=16), plugin_manager=pm, progress=False
    )
    assert len(plan.selected_layers) == 4
    plan = make_plan(
        model,
        make_batches(),
        PlanConfig(selector="activation", cumulative=0.5, calibration_samples=16),
        plugin_manager=pm,
        progress=False,
    )
    scores = plan.scores["activation"]
    order = sorted(range(6), key=lambda i: -scores[i])
    total = sum(scores)
    needed = next(n for n in range(1, 7) if sum(scores[i] for i in order[:n]) / total >= 0.5)
    assert plan.selected_layers == sorted(order[:needed])
    plan = make_plan(
        model,
        make_batches(),
        PlanConfig(selector="all", share="odd_even", rank_policy="budget", calibration_samples=16),
        plugin_manager=pm,
        lora_rank=4,
        progress=False,
    )
    assert plan.share_groups == [[0, 1], [2, 3], [4, 5]]
    assert plan.rank == 8  # floor(6 * 4 / 3)


def test_text_data_with_a_tokenizer(pm, smollm2_dir, make_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = make_llama(layers=4, vocab=len(tokenizer))
    texts = [
        f"review number {i}: {'great' if i % 2 else 'bad'} product, would {'' if i % 3 else 'not '}buy again"
        for i in range(20)
    ]
    plan = make_plan(
        model, texts, PlanConfig(calibration_samples=12, batch_size=5), tokenizer, plugin_manager=pm, progress=False
    )
    assert plan.calibration["num_samples"] == 12
    from datasets import Dataset

    ds = Dataset.from_dict({"review": texts})
    plan2 = make_plan(
        model,
        ds,
        PlanConfig(calibration_samples=12, batch_size=5, text_field="review"),
        tokenizer,
        plugin_manager=pm,
        progress=False,
    )
    assert plan2.calibration["data_hash"] == plan.calibration["data_hash"]
    assert plan2.selected_layers == plan.selected_layers
    records = [{"text": t} for t in texts]
    plan3 = make_plan(
        model, records, PlanConfig(calibration_samples=12, batch_size=5), tokenizer, plugin_manager=pm, progress=False
    )
    assert plan3.calibration["data_hash"] == plan.calibration["data_hash"]


def test_bfloat16_model_keeps_statistics_in_float32(pm, make_llama, make_batches):
    fp32 = make_llama(layers=4, seed=9)
    bf16 = make_llama(layers=4, seed=9).to(torch.bfloat16)
    cfg = PlanConfig(selector="cka", calibration_samples=16)
    a = make_plan(fp32, make_batches(), cfg, plugin_manager=pm, progress=False)
    b = make_plan(bf16, make_batches(), cfg, plugin_manager=pm, progress=False)
    assert b.calibration["dtype"] == "bfloat16"
    assert b.scores["cka"] == pytest.approx(a.scores["cka"], abs=0.05)


def test_left_padded_batches_pool_the_same_tokens(pm, make_llama, make_batches):
    model = make_llama(layers=4)
    right = make_batches(ragged=True)
    left = []
    for b in right:
        ids, mask = b["input_ids"].clone(), b["attention_mask"].clone()
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            ids[row] = torch.cat([torch.zeros(ids.shape[1] - n, dtype=torch.long), b["input_ids"][row, :n]])
            mask[row] = torch.cat([torch.zeros(ids.shape[1] - n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        left.append({"input_ids": ids, "attention_mask": mask})
    cfg = PlanConfig(calibration_samples=16)
    a = make_plan(model, right, cfg, plugin_manager=pm, progress=False)
    b = make_plan(model, left, cfg, plugin_manager=pm, progress=False)
    assert a.calibration["data_hash"] == b.calibration["data_hash"]
    assert a.scores == b.scores


def test_no_group_is_a_warning_not_an_error(pm, make_llama, make_batches, caplog):
    with caplog.at_level(logging.WARNING, logger="loraplan"):
        plan = make_plan(
            make_llama(),
            make_batches(),
            PlanConfig(share="angular", share_threshold=1.0, calibration_samples=16),
            plugin_manager=pm,
            progress=False,
        )
    assert plan.share_groups == []
    assert any("formed no share group" in w for w in plan.warnings)
    assert "formed no share group" in caplog.text


@pytest.mark.parametrize(
    ("settings", "said", "not_said"),
    [
        ({"share": "angular", "share_threshold": 1.0}, "Lower share_threshold to at most", "only 1 layer"),
        ({"share": "angular", "share_threshold": 0.0, "count": 1}, "only 1 layer is selected", "share_threshold"),
        ({"share": "odd_even", "selector": "every_other"}, "formed no share group", "share_threshold"),
    ],
    ids=["threshold-too-high", "one-layer", "sharer-without-threshold"],
)
def test_the_no_group_warning_gives_the_advice_that_fits(settings, said, not_said, pm, make_llama, make_batches):
    config = PlanConfig(calibration_samples=16, **settings)
    plan = make_plan(make_llama(), make_batches(), config, plugin_manager=pm, progress=False)
    assert plan.share_groups == []
    [warning] = [w for w in plan.warnings if "`share`" in w]
    assert said in warning and not_said not in warning


def test_reference_last_token_mode_flags_constant_states(pm, make_llama):
    # every sample ends with the same two tokens and then eos (= 1): the embedding-level vector of the last token
    # is the same for every sample in both modes (eos in mask mode, token 9 in reference mode, which drops eos)
    model = make_llama(layers=4)
    model.config.eos_token_id = 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (16, 8), generator=g)
    ids[:, -3:-1] = torch.tensor([7, 9])
    ids[:, -1] = 1
    batches = [{"input_ids": ids[i : i + 8], "attention_mask": torch.ones(8, 8, dtype=torch.long)} for i in (0, 8)]
    for mode in ("mask", "reference"):
        plan = make_plan(
            model, batches, PlanConfig(calibration_samples=16, last_token=mode), plugin_manager=pm, progress=False
        )
        assert plan.diagnostics["distinct_vectors"][0] == 1
        assert plan.diagnostics["distinct_vectors"][1] == 16  # after attention the samples differ
        assert 0 in plan.flagged_layers and 0 not in plan.selected_layers


def test_one_odd_sample_makes_calibration_degenerate_and_is_reported(pm, make_llama, caplog):
    # 15 samples end in eos, one does not: at the embedding level one sample carries 15/16 of the variance
    model = make_llama(layers=4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (16, 8), generator=g)
    ids[:, -1] = 1
    ids[5, -1] = 42
    batches = [{"input_ids": ids[i : i + 8], "attention_mask": torch.ones(8, 8, dtype=torch.long)} for i in (0, 8)]
    with caplog.at_level(logging.WARNING, logger="loraplan"):
        plan = make_plan(model, batches, PlanConfig(calibration_samples=16), plugin_manager=pm, progress=False)
    assert plan.diagnostics["distinct_vectors"][0] == 2
    assert plan.diagnostics["max_sample_variance_share"][0] == pytest.approx(15 / 16)
    assert any("calibration is degenerate at h_0" in w for w in plan.warnings)
    assert "degenerate" in caplog.text
    assert 0 not in plan.flagged_layers  # scorable, but the warning says it rests on one sample


def test_the_budget_rank_follows_an_adjusted_plan(pm, make_llama, make_batches):
    from loraplan import hookimpl

    class Regroup:
        @hookimpl
        def loraplan_adjust_plan(self, plan, model, stats):
            plan.share_groups = [[2, 3], [4, 5]]

    pm.register(Regroup(), name="regroup")
    plan = make_plan(
        make_llama(layers=6),
        make_batches(),
        PlanConfig(selector="top", count=4, rank_policy="budget", calibration_samples=16),
        plugin_manager=pm,
        lora_rank=4,
        progress=False,
    )
    # 4 adapted layers in 2 modules: floor(4 * 4 / 2) = 8, not the 4 of the selection before the hook
    assert plan.share_groups == [[2, 3], [4, 5]] and plan.rank == 8 == plan.resolve_rank(4)


def test_a_wrapped_model_is_planned_with_its_active_adapters_rank_and_targets(pm, make_llama, make_batches):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(layers=4), LoraConfig(r=8, target_modules=["q_proj"]), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=4, target_modules=["v_proj"]))
    model.set_adapter("second")
    plan = make_plan(model, make_batches(), PlanConfig(ratio=0.5), plugin_manager=pm, progress=False)
    # the rank and the targets both come from the adapter that trains, not from the first one PEFT lists
    assert plan.calibration["base_rank"] == 4 and plan.rank == 4
    assert plan.stack["target_modules"] == ["v_proj"] and plan.stack["targets_from"] == "peft"
