"""Encoder-decoder models (T5, BART, Whisper): both stacks found, calibrated in one pass and checked against
``output_hidden_states``, planned on their own (per-stack settings too), the plan file's ``stacks``, the round trip
through PEFT (cross-attention included) with the truncated backward exact, and what is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loraplan import ConfigError, LoraPlan, PlanConfig, apply_plan, load_adapter, make_plan, remove_truncation
from loraplan.calibration import calibrate_stacks
from loraplan.data import prepare_batches
from loraplan.layers import find_stacks
from loraplan.strategies import ACTIVATIONS, HIDDEN
from loraplan.truncate import truncations_of

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 101
FAMILIES = ["t5", "bart", "whisper"]
STACKS = {
    "t5": ("encoder.block", "decoder.block"),
    "bart": ("model.encoder.layers", "model.decoder.layers"),
    "whisper": ("model.encoder.layers", "model.decoder.layers"),
}
SHARED = dict(selector="cka", share="angular", share_threshold=0.0, calibration_samples=12)


def build(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "t5":
        config = tf.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=3, num_heads=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        return tf.T5ForConditionalGeneration(config).eval()
    sizes = dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=4, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, eos_token_id=2,
        bos_token_id=1, decoder_start_token_id=2,
    )  # fmt: skip
    if family == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(**sizes, max_position_embeddings=64)).eval()
    whisper = tf.WhisperConfig(**sizes, num_mel_bins=8, max_source_positions=16, max_target_positions=32)
    return tf.WhisperForConditionalGeneration(whisper).eval()


def batches(family: str, n_batches: int = 3, batch: int = 4, seed: int = 0) -> list[dict]:
    """Tokenised encoder-decoder batches: tokens (or log-mel features) and labels, right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        labels = torch.randint(3, VOCAB, (batch, 7), generator=g)
        labels[1, 5:] = -100
        labels[2, 3:] = -100
        if family == "whisper":
            out.append({"input_features": torch.randn(batch, 8, 32, generator=g), "labels": labels})
            continue
        ids = torch.randint(3, VOCAB, (batch, 9), generator=g)
        mask = torch.ones_like(ids)
        ids[0, 6:], mask[0, 6:] = 0, 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "input_features", "labels")}


@pytest.mark.parametrize("family", FAMILIES)
def test_both_stacks_are_found_encoder_first(family, pm):
    stacks = find_stacks(build(family), pm)
    assert [s.path for s in stacks] == list(STACKS[family])
    assert [s.pooling for s in stacks] == ["mean", "last"]


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_states_of_both_stacks_equal_output_hidden_states(family, pm):
    """h_0..h_L of each stack from one pass: the encoder's as the mean over its real tokens (every frame for
    Whisper), the decoder's at its last real position, exactly what output_hidden_states gives."""
    model = build(family)
    config = PlanConfig(calibration_samples=12, batch_size=4)
    data = prepare_batches(batches(family), config, None, model.config)
    stacks = find_stacks(model, pm)
    encoder, decoder = calibrate_stacks(model, stacks, data, {HIDDEN}, config, progress=False)
    assert encoder.hidden[0].shape[0] == decoder.hidden[0].shape[0] == 12
    expected: dict[str, list] = {"encoder": [[] for _ in range(5)], "decoder": [[] for _ in range(4)]}
    with torch.no_grad():
        for batch in data.batches:
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
            mask = batch.get("attention_mask")
            for i, h in enumerate(out.encoder_hidden_states):
                weights = torch.ones(h.shape[:2]) if mask is None else mask.float()
                expected["encoder"][i].append((h * weights[..., None]).sum(1) / weights.sum(1, keepdim=True))
            last = batch["decoder_attention_mask"].sum(1) - 1
            for i, h in enumerate(out.decoder_hidden_states):
                expected["decoder"][i].append(h[torch.arange(h.shape[0]), last])
    for stats, name in ((encoder, "encoder"), (decoder, "decoder")):
        for got, want in zip(stats.hidden, expected[name]):
            torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)
    assert encoder.meta["pooling"] == "mean" and decoder.meta["pooling"] == "last"


def test_the_decoder_does_not_count_cross_attention_keys_and_values(pm):
    """A decoder layer's cross-attention k/v read the encoder's output (the same tensor in every layer): the
    decoder's activation score counts the calls on its own tokens only. By hand: every call's input, kept unless it is
    the encoder's output, its masked norm sum averaged over the calls kept."""
    model = build("bart")
    targets = ["q_proj", "k_proj", "v_proj"]
    config = PlanConfig(calibration_samples=12, target_modules=targets)
    data = prepare_batches(batches("bart"), config, None, model.config)
    _, decoder = calibrate_stacks(model, find_stacks(model, pm), data, {ACTIVATIONS}, config, targets, False)
    calls: list[tuple[int, torch.Tensor]] = []
    handles = [
        module.register_forward_pre_hook(lambda m, args, i=i: calls.append((i, args[0])))
        for i, layer in enumerate(model.model.decoder.layers)
        for name, module in layer.named_modules()
        if name.endswith(tuple(targets))
    ]
    want = []
    with torch.no_grad():
        for batch in data.batches:
            calls.clear()
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            mask = batch["decoder_attention_mask"].double()
            own = [(i, x) for i, x in calls if x is not out.encoder_last_hidden_state]
            assert len(calls) - len(own) == 2 * 3  # encoder_attn.k_proj and .v_proj in each of the 3 layers
            row = []
            for layer in range(3):
                xs = [x for i, x in own if i == layer]
                row.append(sum((x.norm(dim=-1).double() * mask).sum(1) for x in xs) / len(xs))
            want.append(torch.stack(row, dim=1))
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(decoder.activation_sums, torch.cat(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("selector", ["cka", "activation", "gradient", "lora_drop"])
def test_every_selector_plans_each_stack_on_its_own(family, selector, pm):
    plan = make_plan(build(family), batches(family), PlanConfig(**{**SHARED, "selector": selector}), plugin_manager=pm)
    encoder, decoder = plan.stacks
    assert (encoder.stack_path, decoder.stack_path) == STACKS[family]
    assert (encoder.num_layers, decoder.num_layers) == (4, 3) and plan.num_layers == 7
    assert len(encoder.selected_layers) == 2 and len(decoder.selected_layers) == 1  # floor(0.5 L) each
    assert plan.selected_layers == encoder.selected_layers + [4 + i for i in decoder.selected_layers]
    assert encoder.share_groups == [encoder.selected_layers] and decoder.share_groups == []  # never across stacks
    assert len(encoder.scores[selector]) == 4 and len(decoder.scores[selector]) == 3
    data = plan.to_dict()
    assert data["format"] == "loraplan.plan/2" and "selected_layers" not in data
    assert [(e["name"], e["path"]) for e in data["stacks"]] == [
        ("encoder", STACKS[family][0]),
        ("decoder", STACKS[family][1]),
    ]
    assert all({"path", "selected_layers", "share_groups", "num_layers"} <= set(e) for e in data["stacks"])
    assert LoraPlan.from_dict(data) == plan


def test_per_stack_settings_adapt_the_last_two_encoder_layers_and_every_decoder_layer(pm):
    """peft #2165's request: the last 2 encoder layers and every decoder layer."""
    stacks = {"encoder": {"selector": "top", "count": 2}, "decoder": {"selector": "all"}}
    plan = make_plan(build("t5"), batches("t5"), PlanConfig(stacks=stacks, calibration_samples=12), plugin_manager=pm)
    assert [one.selected_layers for one in plan.stacks] == [[2, 3], [0, 1, 2]]
    assert [one.selector for one in plan.stacks] == ["top", "all"] and plan.selector == "cka"
    model = get_peft_model(build("t5"), plan.to_lora_config(LoraConfig(r=4, target_modules=["q", "v"])))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert {n.split("base_model.model.")[1].rsplit(".layer.", 1)[0] for n in adapted} == {
        "encoder.block.2", "encoder.block.3", "decoder.block.0", "decoder.block.1", "decoder.block.2"
    }  # fmt: skip


def _read_sites(model) -> dict[str, int]:
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name.endswith(".lora_A") and "default" in module:
            found[name.removesuffix(".lora_A").removeprefix("base_model.model.")] = module["default"].weight.shape[0]
    return found


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks in both runs compared
    loss = model(**model_inputs(batch)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["to_lora_config", "apply_plan"])
def test_round_trip_both_stacks_and_cross_attention(family, path, pm, tmp_path):
    plan = make_plan(build(family), batches(family), PlanConfig(**SHARED), plugin_manager=pm)
    user = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    if path == "to_lora_config":
        model = apply_plan(get_peft_model(build(family), plan.to_lora_config(user, model=build(family))), plan)
    else:
        model = apply_plan(get_peft_model(build(family), copy.deepcopy(user)), plan)
    # LoRA exactly where stock PEFT puts the user's config, minus each stack's unplanned layers
    stock = _read_sites(get_peft_model(build(family), copy.deepcopy(user)))

    def planned(site: str) -> bool:
        for one in plan.stacks:
            if site.startswith(one.stack_path + "."):
                return int(site[len(one.stack_path) + 1 :].split(".")[0]) in one.adapted_layers
        return True

    want = {s: r for s, r in stock.items() if planned(s)}
    assert _read_sites(model) == want
    assert any("encoder_attn" in s or "EncDecAttention" in s for s in want)  # the decoder's cross-attention
    encoder = plan.stacks[0]
    lead, member = encoder.share_groups[0][:2]
    layers = model.get_base_model().get_submodule(encoder.stack_path)
    linear = next(n for n, m in layers[lead].named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert (
        layers[lead].get_submodule(linear).lora_A["default"] is layers[member].get_submodule(linear).lora_A["default"]
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches(family, n_batches=2, seed=3):
        _loss_and_grads(model, batch)
        optimizer.step()
    model.eval()
    probe = batches(family, n_batches=1, seed=4)[0]
    with torch.no_grad():
        expected = model(**model_inputs(probe)).logits
    model.save_pretrained(tmp_path)
    plan.save(tmp_path)
    stock_loaded = PeftModel.from_pretrained(build(family), tmp_path).eval()
    ours = load_adapter(build(family), tmp_path).eval()
    for loaded in (stock_loaded, ours):
        assert _read_sites(loaded) == want
        with torch.no_grad():
            torch.testing.assert_close(loaded(**model_inputs(probe)).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_lora_in_the_encoder_runs_all_of_it_without_autograd_exactly(family, pm):
    config = PlanConfig(selector="top", stacks={"encoder": {"selector": "none"}}, calibration_samples=12)
    plan = make_plan(build(family), batches(family), config, plugin_manager=pm)
    assert plan.stacks[0].selected_layers == [] and plan.stacks[1].selected_layers == [2]
    model = apply_plan(get_peft_model(build(family), LoraConfig(r=4, target_modules="all-linear")), plan)
    assert not any(s.startswith(STACKS[family][0]) for s in _read_sites(model))
    encoder, decoder = truncations_of(model)
    assert encoder.active and encoder.layers == [0, 1, 2, 3] and "every layer runs without autograd" in encoder.note()
    assert decoder.active and decoder.layers == [0, 1]
    for one in model.get_base_model().get_submodule(STACKS[family][1])[2:]:
        for m in one.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                torch.nn.init.normal_(m.lora_B["default"].weight)
    seen: dict[str, set] = {}
    for name in STACKS[family]:
        for index, layer in enumerate(model.get_base_model().get_submodule(name)):
            layer.register_forward_hook(
                lambda m, a, o, key=f"{name}.{index}": seen.setdefault(key, set()).add(
                    bool((o[0] if isinstance(o, tuple) else o).requires_grad)
                )
            )
    batch = batches(family, n_batches=1, seed=5)[0]
    truncated = _loss_and_grads(model, batch)
    assert all(seen[f"{STACKS[family][0]}.{i}"] == {False} for i in range(4))
    assert seen[f"{STACKS[family][1]}.1"] == {False} and seen[f"{STACKS[family][1]}.2"] == {True}
    remove_truncation(model)
    stock = _loss_and_grads(model, batch)
    torch.testing.assert_close(truncated[0], stock[0])
    assert truncated[1].keys() == stock[1].keys()
    for name in stock[1]:
        torch.testing.assert_close(truncated[1][name], stock[1][name], msg=name)


def test_lora_in_the_encoder_truncates_below_it_and_back_propagates_the_whole_decoder(pm):
    plan = make_plan(
        build("bart"), batches("bart"), PlanConfig(selector="top", calibration_samples=12), plugin_manager=pm
    )
    model = apply_plan(get_peft_model(build("bart"), LoraConfig(r=4, target_modules="all-linear")), plan)
    encoder, decoder = truncations_of(model)
    assert encoder.active and encoder.layers == [0, 1]
    assert not decoder.active and "its gradient reaches it through the cross-attention" in decoder.reason
    assert any("decoder stack" in n and "off:" in n for n in plan.notes)
    for m in model.modules():
        if hasattr(m, "lora_B") and "default" in m.lora_B:
            torch.nn.init.normal_(m.lora_B["default"].weight)
    batch = batches("bart", n_batches=1, seed=5)[0]
    truncated = _loss_and_grads(model, batch)
    remove_truncation(model)
    stock = _loss_and_grads(model, batch)
    torch.testing.assert_close(truncated[0], stock[0])
    for name in stock[1]:
        torch.testing.assert_close(truncated[1][name], stock[1][name], msg=name)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"time_budget": 0.6}, "`time_budget` \\(0.6\\) needs the cost model"),
        ({"param_budget": 0.5}, "`param_budget` \\(0.5\\) needs the cost model"),
        ({"rank_policy": "budget"}, "`rank_policy` 'budget' is not available for an encoder-decoder model"),
        ({"stacks": {"encoder": {"selector": "none"}, "decoder": {"selector": "none"}}}, "no stack selects a layer"),
    ],
    ids=["time-budget", "param-budget", "budget-rank", "nothing-selected"],
)
def test_what_encoder_decoder_plans_cannot_do_is_refused(settings, message, pm):
    with pytest.raises(ConfigError, match=message):
        make_plan(build("t5"), batches("t5"), PlanConfig(calibration_samples=12, **settings), plugin_manager=pm)


@pytest.mark.parametrize(
    ("stacks", "message"),
    [
        ({"middle": {"count": 1}}, "`stacks` names the stack 'middle'"),
        ({"encoder": {"rank_policy": 8}}, "`stacks.encoder` sets `rank_policy`, which is not a per-stack setting"),
        ({"encoder": {"ratio": 2}}, "`stacks.encoder`: `ratio` must be a number in \\(0, 1\\]"),
    ],
    ids=["unknown-stack", "not-per-stack", "bad-value"],
)
def test_per_stack_settings_are_validated_naming_the_key(stacks, message):
    with pytest.raises(ConfigError, match=message):
        PlanConfig(stacks=stacks)


def test_calibration_batches_without_labels_are_refused_for_the_decoder(pm):
    model = build("t5")
    unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in batches("t5")]
    with pytest.raises(Exception, match="has no `labels`: an encoder-decoder model is calibrated on what its decoder"):
        make_plan(model, unlabelled, PlanConfig(calibration_samples=12), plugin_manager=pm)
