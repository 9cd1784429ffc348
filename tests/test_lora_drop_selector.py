"""The LoRA-drop selector (`selector="lora_drop"`, `loraplan.calibration.warmup`): its scores against an independent
warm-up done with plain PEFT, the model left exactly as it was (also a PEFT model with its own adapter), what the plan
records, cumulative selection, and the error for a model without a loss."""

from __future__ import annotations

import copy

import pytest
import torch

from loraplan import PlanConfig, make_plan
from loraplan.calibration import LORA_OUTPUTS, calibrate
from loraplan.data import prepare_batches
from loraplan.errors import CalibrationError
from loraplan.layers import find_layers
from loraplan.plugins.lora_drop import LoraDropSelector

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj"]
LAYERS = 4
#: the warm-up the selector promises: rank 8, alpha 16, dropout 0, AdamW at 1e-4, seeded with `seed`
RANK, ALPHA, LR = 8, 16, 1e-4


def _config(batches, **settings):
    return PlanConfig(
        **{
            "selector": "lora_drop",
            "calibration_samples": sum(b["input_ids"].shape[0] for b in batches),
            "batch_size": batches[0]["input_ids"].shape[0],
            "stability": False,
            **settings,
        }
    )


def _independent(model, batches, targets, steps, seed=0, lr=LR):
    """The warm-up done by hand with `get_peft_model` on a copy, and ``Σ ||ΔW x||²`` recomputed from the captured
    inputs and the trained A, B: per sample and layer (N, L), and the warm-up losses."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets)),
    )
    peft_model.eval()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        loss = peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, use_cache=False
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            handles.append(
                module.register_forward_pre_hook(lambda m, args, _n=name: captured.__setitem__(_n, args[0].detach()))
            )
    rows = []
    with torch.no_grad():
        for batch in batches:
            captured.clear()
            peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            row = torch.zeros(batch["input_ids"].shape[0], LAYERS, dtype=torch.float64)
            mask = batch["attention_mask"].double()
            for name, x in captured.items():
                layer = int(name.split(".layers.")[1].split(".")[0])
                module = peft_model.get_submodule(name)
                a = module.lora_A["default"].weight.double()  # (r, in)
                b = module.lora_B["default"].weight.double()  # (out, r)
                delta = x.double() @ a.T @ b.T * (ALPHA / RANK)
                row[:, layer] += (delta.square().sum(-1) * mask).sum(-1)
            rows.append(row)
    for handle in handles:
        handle.remove()
    return torch.cat(rows), losses


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, id(m), type(m), m.training) for n, m in model.named_modules()],
        "flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [(n, p.grad) for n, p in model.named_parameters()],
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["modules"] == before["modules"]
    assert after["flags"] == before["flags"]
    assert all(a[1] is b[1] for a, b in zip(after["grads"], before["grads"]))
    assert not any("loraplan" in n for n, _ in model.named_modules())  # the temporary adapter's name


def test_scores_equal_an_independent_peft_warm_up(pm, make_llama, make_batches):
    model = make_llama(layers=LAYERS, seed=3)
    raw = make_batches(n_batches=2, batch=4, length=10, seed=5)
    config = _config(raw, lora_drop_steps=3, target_modules=TARGETS)
    data = prepare_batches(raw, config, None, model.config)
    expected, losses = _independent(model, data.batches, TARGETS, steps=3)

    stats = calibrate(model, find_layers(model, pm), data, {LORA_OUTPUTS}, config, targets=TARGETS, progress=False)
    assert stats.lora_outputs.shape == (8, LAYERS) and stats.lora_outputs.dtype == torch.float64
    torch.testing.assert_close(stats.lora_outputs, expected, rtol=1e-6, atol=0.0)
    assert stats.meta["lora_drop"] == {
        "steps": 3,
        "rank": RANK,
        "alpha": ALPHA,
        "lr": LR,
        "loss_first": pytest.approx(losses[0], rel=1e-6),
        "loss_last": pytest.approx(losses[-1], rel=1e-6),
    }
    assert losses[-1] < losses[0]  # it did train

    plan = make_plan(model, raw, config, plugin_manager=pm, progress=False)
    totals = expected.sum(dim=0)
    shares = (totals / totals.sum()).tolist()
    assert sum(plan.scores["lora_drop"]) == pytest.approx(1.0, abs=1e-9)
    assert plan.scores["lora_drop"] == pytest.approx(shares, rel=1e-6, abs=1e-9)
    assert plan.scores["importance"] == plan.scores["lora_drop"]
    # the comparison can fail: another number of steps (or another seed) moves the scores well beyond the tolerance
    other, _ = _independent(model, data.batches, TARGETS, steps=1)
    assert not torch.allclose(other, expected, rtol=1e-3, atol=0.0)
    reseeded, _ = _independent(model, data.batches, TARGETS, steps=3, seed=1)
    assert not torch.allclose(reseeded, expected, rtol=1e-3, atol=0.0)


def test_the_model_is_unchanged_after_planning(pm, make_llama, make_batches):
    model = make_llama(layers=LAYERS, seed=1)
    model.model.layers[1].train()  # a mixed train/eval state is restored too
    model.lm_head.weight.requires_grad_(False)
    batches = make_batches(n_batches=2, batch=4, length=8, seed=2)
    with torch.no_grad():
        reference = model(**batches[0]).logits
    before = _snapshot(model)
    rng = torch.random.get_rng_state()
    make_plan(model, batches, _config(batches, lora_drop_steps=2), plugin_manager=pm, progress=False)
    _assert_unchanged(model, before)
    assert "peft_config" not in model.__dict__
    assert torch.equal(torch.random.get_rng_state(), rng)  # the warm-up's seeding does not touch the caller's RNG
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, reference)


def test_a_peft_model_keeps_its_adapter_untouched_and_active(pm, make_llama, make_batches):
    from peft import LoraConfig, get_peft_model

    plain = make_llama(layers=LAYERS, seed=2)
    batches = make_batches(n_batches=2, batch=4, length=8, seed=4)
    model = get_peft_model(copy.deepcopy(plain), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():  # the user's adapter is not a no-op
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    peft_config = model.peft_config
    before = _snapshot(model)
    with torch.no_grad():
        reference = model(**batches[0]).logits
    plan = make_plan(model, batches, _config(batches, lora_drop_steps=2), plugin_manager=pm, progress=False)

    _assert_unchanged(model, before)
    assert model.peft_config is peft_config and list(model.peft_config) == ["default"]
    assert model.base_model.model.peft_config is peft_config
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(m.active_adapters == ["default"] for m in lora_layers)
    assert all(set(m.lora_A) == {"default"} and not m.disable_adapters for m in lora_layers)
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, reference)
    # the user's adapter was neither active nor trained in the warm-up: the same scores as the plain model's on the
    # same targets (which the PEFT model's LoraConfig gives)
    alone = make_plan(
        plain, batches, _config(batches, lora_drop_steps=2, target_modules=TARGETS), plugin_manager=pm, progress=False
    )
    assert plan.scores["lora_drop"] == pytest.approx(alone.scores["lora_drop"], rel=1e-6, abs=1e-9)


def test_a_failing_warm_up_still_restores_the_model(pm, make_llama, make_batches):
    model = make_llama(layers=LAYERS, seed=6)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # every loss is nan
    batches = make_batches(n_batches=2, batch=4, length=8, seed=1)
    before = _snapshot(model)
    with pytest.raises(CalibrationError, match=r"LoRA-drop warm-up loss is not finite at step 0"):
        make_plan(model, batches, _config(batches), plugin_manager=pm, progress=False)
    after = _snapshot(model)
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key].nan_to_num(), value.nan_to_num()), key
    assert after["modules"] == before["modules"] and after["flags"] == before["flags"]
    assert "peft_config" not in model.__dict__


def test_steps_and_the_warm_up_are_recorded(pm, make_llama, make_batches):
    model = make_llama(layers=LAYERS, seed=0)
    batches = make_batches(n_batches=3, batch=4, length=8, seed=3)
    plan = make_plan(model, batches, _config(batches, lora_drop_steps=3), plugin_manager=pm, progress=False)
    assert plan.config["lora_drop_steps"] == 3
    assert plan.config["selector"] == "lora_drop"
    assert plan.calibration["statistics"] == ["lora_outputs"]
    # default: one epoch, one step per calibration batch
    config = _config(batches)
    data = prepare_batches(batches, config, None, model.config)
    stats = calibrate(model, find_layers(model, pm), data, {LORA_OUTPUTS}, config, progress=False)
    assert stats.meta["lora_drop"]["steps"] == 3 == len(data.batches)
    assert stats.subset_batches([1]).lora_outputs.tolist() == stats.lora_outputs[4:8].tolist()


def test_the_warm_up_is_recorded_in_the_plan(pm, make_llama, make_batches):
    model = make_llama(layers=LAYERS, seed=0)
    batches = make_batches(n_batches=2, batch=4, length=8, seed=3)
    plan = make_plan(model, batches, _config(batches, lora_drop_steps=3), plugin_manager=pm, progress=False)
    record = plan.calibration["lora_drop"]
    assert {k: record[k] for k in ("steps", "rank", "alpha", "lr")} == {"steps": 3, "rank": 8, "alpha": 16, "lr": LR}
    assert record["loss_last"] < record["loss_first"]


@pytest.mark.parametrize("threshold", [0.9, 0.6])
def test_cumulative_keeps_the_smallest_set_reaching_the_threshold(pm, make_llama, make_batches, threshold):
    model = make_llama(layers=LAYERS, seed=5)
    batches = make_batches(n_batches=2, batch=4, length=8, seed=6)
    plan = make_plan(
        model, batches, _config(batches, lora_drop_steps=2, cumulative=threshold), plugin_manager=pm, progress=False
    )
    shares = plan.scores["lora_drop"]
    order = sorted(range(LAYERS), key=lambda i: -shares[i])
    kept, total = [], 0.0
    for i in order:
        kept.append(i)
        total += shares[i]
        if total >= threshold:
            break
    assert plan.selected_layers == sorted(kept)
    assert sum(shares[i] for i in kept) >= threshold > sum(shares[i] for i in kept[:-1])
    if threshold < 0.7:
        assert len(plan.selected_layers) < LAYERS


def test_a_model_without_a_loss_is_a_clear_error(pm, make_bert, make_batches):
    model = make_bert(layers=2, head=False)  # a bare encoder: no head, and the batches carry no labels
    batches = make_batches(n_batches=1, batch=4, length=8)
    before = _snapshot(model)
    with pytest.raises(CalibrationError, match=r"`lora_drop` selector trains a temporary LoRA and needs a loss"):
        make_plan(model, batches, _config(batches), plugin_manager=pm, progress=False)
    _assert_unchanged(model, before)


def test_mamba_without_target_modules_scores_the_modules_peft_can_adapt(pm, make_batches):
    # PEFT refuses LoRA on Mamba's out_proj (and conv1d): without target_modules every selector reads the linear
    # modules it can adapt, and the warm-up trains LoRA on exactly those
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MambaConfig(hidden_size=32, num_hidden_layers=3, vocab_size=101, state_size=8, expand=2)
    model = tf.MambaForCausalLM(config).eval()
    for selector in ("lora_drop", "activation"):
        plan = make_plan(model, make_batches(), PlanConfig(selector=selector), plugin_manager=pm, progress=False)
        assert plan.stack["target_modules"] == ["dt_proj", "in_proj", "x_proj"]
        assert plan.stack["targets_from"] == "all-linear" and len(plan.selected_layers) == 1
    with pytest.raises(CalibrationError, match="`target_modules`: selector='lora_drop' trains a temporary LoRA") as exc:
        make_plan(model, make_batches(), PlanConfig(selector="lora_drop", target_modules=["out_proj"]), progress=False)
    assert "out_proj" in str(exc.value)


def test_the_selector_is_registered_and_normalises():
    from loraplan.calibration import CalibrationStats
    from loraplan.strategies import SelectionContext

    selector = LoraDropSelector()
    assert selector.name == "lora_drop" and selector.requires == frozenset({"lora_outputs"})
    assert selector.minimum_samples(PlanConfig()) == 1
    stats = CalibrationStats(
        num_layers=3,
        tokens=torch.ones(2, dtype=torch.float64),
        batch_index=torch.zeros(2, dtype=torch.long),
        target_names=[["q_proj"]] * 3,
        lora_outputs=torch.tensor([[1.0, 2.0, 5.0], [1.0, 0.0, 1.0]], dtype=torch.float64),
    )
    scores = selector.score(SelectionContext(stats=stats, config=PlanConfig(), num_layers=3, k=1))
    assert scores == {"lora_drop": [0.2, 0.2, 0.6], "importance": [0.2, 0.2, 0.6]}


def test_deberta_position_calls_shaped_like_the_tokens_are_not_counted(pm, make_deberta_v3):
    """LoRA-drop's Σ ||ΔW x||² on DeBERTa-v3 attention: query_proj is also called on the relative position embeddings,
    and with one row of exactly 2 x att_span tokens that call has the token stream's shape. Recomputed by hand from
    each module's first call in a forward (the tokens; the position call comes after it), it must match."""
    from peft import LoraConfig, get_peft_model

    targets = ["query_proj", "value_proj"]
    model = make_deberta_v3("DebertaV2ForMaskedLM", position_buckets=8)  # position embeddings: 16 rows
    g = torch.Generator().manual_seed(7)
    raw = [{"input_ids": torch.randint(3, 101, (1, 16), generator=g), "attention_mask": torch.ones(1, 16).long()}]
    raw *= 2
    config = _config(raw, lora_drop_steps=2, target_modules=targets)
    data = prepare_batches(raw, config, None, model.config)
    stats = calibrate(model, find_layers(model, pm), data, {LORA_OUTPUTS}, config, targets=targets, progress=False)

    torch.manual_seed(0)  # the warm-up by hand, as in _independent
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
    )
    peft_model.eval()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    for step in range(2):
        batch = data.batches[step % len(data.batches)]
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    calls: dict[str, list[torch.Tensor]] = {}
    handles = [
        module.register_forward_pre_hook(lambda m, args, _n=name: calls.setdefault(_n, []).append(args[0].detach()))
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    ]
    rows = []
    with torch.no_grad():
        for batch in data.batches:
            calls.clear()
            peft_model(**batch)
            row = torch.zeros(1, 3, dtype=torch.float64)
            for name, seen in calls.items():
                assert all(x.shape == (1, 16, 32) for x in seen)  # every call looks like the token stream
                module = peft_model.get_submodule(name)
                a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
                delta = seen[0].double() @ a.T @ b.T * (ALPHA / RANK)
                row[:, int(name.split(".layer.")[1].split(".")[0])] += delta.square().sum((-1, -2))
            assert sum(len(seen) for seen in calls.values()) > len(calls)  # query_proj's second call happened
            rows.append(row)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(stats.lora_outputs, torch.cat(rows), rtol=1e-6, atol=0.0)
