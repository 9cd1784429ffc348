"""The calibration pass (`loraplan.calibration`): what it measures, against hand computations on tiny models, and
the errors that name the layer or the batch."""

from __future__ import annotations

import pytest
import torch

from loraplan import PlanConfig, make_plan
from loraplan.calibration import CalibrationStats, calibrate, model_inputs
from loraplan.data import prepare_batches
from loraplan.errors import CalibrationError
from loraplan.layers import find_layers
from loraplan.strategies import ACTIVATIONS, GRADIENTS, HIDDEN

LLAMA_LINEAR = sorted(
    [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
)


def _calibrate(model, batches, requires, pm, targets=None, **settings):
    config = PlanConfig(**{"calibration_samples": sum(b["input_ids"].shape[0] for b in batches), **settings})
    data = prepare_batches(batches, config, None, model.config)
    stats = calibrate(model, find_layers(model, pm), data, requires, config, targets=targets, progress=False)
    return stats, data


def test_statistics_have_one_row_per_sample_and_one_column_per_layer(pm, make_llama, make_batches):
    model = make_llama(layers=3)
    batches = make_batches(n_batches=3, batch=4, length=10)
    stats, data = _calibrate(model, batches, {HIDDEN, ACTIVATIONS, GRADIENTS}, pm, batch_size=4)
    assert isinstance(stats, CalibrationStats)
    assert (stats.num_layers, stats.num_samples, stats.num_batches) == (3, 12, 3)
    assert len(stats.hidden) == 4  # h_0 .. h_3
    assert all(h.shape == (12, 32) and h.dtype == torch.float32 for h in stats.hidden)
    assert stats.activation_sums.shape == (12, 3) and stats.activation_sums.dtype == torch.float64
    assert stats.gradients.shape == (3, 3) and stats.gradients.dtype == torch.float64
    assert stats.tokens.tolist() == [float(m.sum()) for b in batches for m in b["attention_mask"]]
    assert stats.batch_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert stats.target_names == [LLAMA_LINEAR] * 3
    assert stats.meta["pooling"] == "last"
    # only what is asked for is measured
    hidden_only, _ = _calibrate(model, batches, {HIDDEN}, pm, batch_size=4)
    assert hidden_only.activation_sums is None and hidden_only.gradients is None
    for a, b in zip(hidden_only.hidden, stats.hidden):
        torch.testing.assert_close(a, b)


def test_pooled_embedding_output_is_the_embedding_row_of_the_last_real_token(pm, make_llama, make_batches):
    model = make_llama(layers=2, seed=4)
    batches = make_batches(n_batches=2, batch=4, length=9, seed=8)
    stats, data = _calibrate(model, batches, {HIDDEN}, pm, batch_size=3)
    assert len(data.batches) == 3
    expected = []
    for batch in data.batches:
        last = batch["attention_mask"].sum(dim=1) - 1
        rows = torch.arange(batch["input_ids"].shape[0])
        expected.append(model.model.embed_tokens.weight[batch["input_ids"][rows, last]].detach())
    torch.testing.assert_close(stats.hidden[0], torch.cat(expected))


def test_activation_sums_are_masked_input_norms_averaged_over_the_layers_targets(pm, make_llama, make_batches):
    # q_proj and v_proj both read input_layernorm(h_l): the per-sample sum over real tokens of its L2 norm
    model = make_llama(layers=3, seed=1)
    batches = make_batches(n_batches=2, batch=4, length=10, seed=2)
    stats, data = _calibrate(model, batches, {ACTIVATIONS}, pm, targets=["q_proj", "v_proj"])
    assert stats.target_names == [["self_attn.q_proj", "self_attn.v_proj"]] * 3
    expected = []
    with torch.no_grad():
        for batch in data.batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].double()
            row = [
                (layer.input_layernorm(hidden[l]).norm(dim=-1).double() * mask).sum(dim=1)
                for l, layer in enumerate(model.model.layers)
            ]
            expected.append(torch.stack(row, dim=1))
    torch.testing.assert_close(stats.activation_sums, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_activation_sums_count_only_the_token_stream_of_deberta_relative_attention(pm, make_batches, make_deberta_v3):
    model = make_deberta_v3()
    batches = make_batches(n_batches=2, batch=4, length=10, seed=3)
    targets = ["query_proj", "value_proj"]
    stats, data = _calibrate(model, batches, {ACTIVATIONS}, pm, targets=targets)
    # by hand: each target module's input on the token stream (its (batch, tokens) calls), its masked norm sum
    calls: dict[str, list] = {}
    handles = [
        module.register_forward_pre_hook(lambda m, args, _n=name: calls.setdefault(_n, []).append(args[0]))
        for name, module in model.named_modules()
        if name.endswith(tuple(targets))
    ]
    expected = []
    with torch.no_grad():
        for batch in data.batches:
            calls.clear()
            model(**batch)
            mask = batch["attention_mask"].double()
            row = []
            for layer in range(3):
                inputs = [
                    x
                    for name, seen in calls.items()
                    if f"layer.{layer}." in name
                    for x in seen
                    if x.shape[:2] == mask.shape
                ]
                assert len(inputs) == 2  # one token-stream call per target; query_proj's other call is not counted
                row.append(sum((x.norm(dim=-1).double() * mask).sum(dim=1) for x in inputs) / 2)
            expected.append(torch.stack(row, dim=1))
    for handle in handles:
        handle.remove()
    assert any(x.shape[:2] != (4, 10) for seen in calls.values() for x in seen)  # the position-embedding calls exist
    torch.testing.assert_close(stats.activation_sums, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_deberta_position_calls_shaped_like_the_tokens_are_still_not_counted(pm, make_batches, make_deberta_v3):
    """One row of exactly 2 x att_span tokens: the relative position embeddings reach query_proj as (1, 16, d), the
    very shape of the token stream (deberta-v3-base: one 512-token row). Told apart by identity, not by shape."""
    model = make_deberta_v3(position_buckets=8)  # att_span 8: the position embeddings are 16 rows
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(3, 101, (1, 16), generator=g), "attention_mask": torch.ones(1, 16).long()}]
    batches *= 3
    seen: list[tuple] = []
    handle = model.deberta.encoder.layer[0].attention.self.query_proj.register_forward_pre_hook(
        lambda m, args: seen.append(tuple(args[0].shape))
    )
    stats, data = _calibrate(model, batches, {ACTIVATIONS}, pm, targets=["query_proj", "value_proj"], batch_size=1)
    handle.remove()
    assert seen.count((1, 16, 32)) == 2 * len(data.batches)  # both calls look like tokens
    expected = []
    with torch.no_grad():
        for batch in data.batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].double()
            # query_proj and value_proj both read the layer's input on the token stream
            expected.append(torch.stack([(hidden[l].norm(dim=-1).double() * mask).sum(dim=1) for l in range(3)], 1))
    torch.testing.assert_close(stats.activation_sums, torch.cat(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("selector", ["activation", "lora_drop"])
def test_deberta_v3_attention_is_planned_by_the_token_stream_selectors(selector, pm, make_batches, make_deberta_v3):
    model = make_deberta_v3("DebertaV2ForMaskedLM")
    plan = make_plan(model, make_batches(), PlanConfig(selector=selector), plugin_manager=pm, progress=False)
    assert len(plan.selected_layers) == 1 and all(v > 0 for v in plan.scores[selector])


def test_reference_last_token_is_the_count_of_non_eos_tokens_minus_one(pm, make_llama):
    # a chat template puts eos (= pad = 1) in the middle of a sample: the reference code takes
    # (input_ids != pad).sum() - 1, which is then not the last real position; reference mode does the same
    from loraplan.calibration import calibrate
    from loraplan.data import prepare_batches
    from loraplan.layers import find_layers
    from loraplan.strategies import HIDDEN

    model = make_llama(layers=3)
    model.config.eos_token_id = 1
    ids = torch.tensor([[5, 6, 1, 7, 8, 1, 1, 1], [9, 1, 4, 4, 4, 3, 2, 1], [3, 4, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [1] * 8])
    config = PlanConfig(calibration_samples=3, last_token="reference")
    batches = prepare_batches([{"input_ids": ids, "attention_mask": mask}], config, None, model.config)
    stats = calibrate(model, find_layers(model, pm), batches, {HIDDEN}, config, progress=False)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    positions = (ids != 1).sum(dim=1) - 1
    assert positions.tolist() == [3, 5, 7]  # the last non-eos tokens are at 4, 5 and 7
    for i, h in enumerate(hidden):
        torch.testing.assert_close(stats.hidden[i], h[torch.arange(3), positions].float())


def test_mask_mode_pools_the_last_attended_token(pm, make_llama):
    # the same padded batch as above: mask mode reads the attention mask's last token, eos or not
    model = make_llama(layers=3)
    model.config.eos_token_id = 1
    ids = torch.tensor([[5, 6, 1, 7, 8, 1, 1, 1], [9, 1, 4, 4, 4, 3, 2, 1], [3, 4, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [1] * 8])
    batch = [{"input_ids": ids, "attention_mask": mask}]
    default, _ = _calibrate(model, batch, {HIDDEN}, pm, last_token="mask")
    reference, _ = _calibrate(model, batch, {HIDDEN}, pm, last_token="reference")
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    positions = torch.tensor([5, 7, 7])
    for i, h in enumerate(hidden):
        torch.testing.assert_close(default.hidden[i], h[torch.arange(3), positions].float())
    # the two modes agree on the sample without an inner eos and differ on the two with one
    for d, r in zip(default.hidden, reference.hidden):
        torch.testing.assert_close(d[2], r[2])
        assert not torch.allclose(d[:2], r[:2])


def test_auto_mode_reads_the_token_before_a_trailing_eos_and_is_the_default(pm, make_llama):
    # the same batch: auto steps back over a trailing eos run (rows 0 and 1), keeps an inner eos (row 0's third token
    # stays before the read position) and reads a row without a trailing eos as mask mode does (row 2)
    model = make_llama(layers=3)
    model.config.eos_token_id = 1
    ids = torch.tensor([[5, 6, 1, 7, 8, 1, 1, 1], [9, 1, 4, 4, 4, 3, 2, 1], [3, 4, 5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [1] * 8])
    batch = [{"input_ids": ids, "attention_mask": mask}]
    assert PlanConfig().last_token == "auto"
    auto, _ = _calibrate(model, batch, {HIDDEN}, pm)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    positions = torch.tensor([4, 6, 7])
    for i, h in enumerate(hidden):
        torch.testing.assert_close(auto.hidden[i], h[torch.arange(3), positions].float())
    assert auto.read_tokens.tolist() == [8, 2, 10]


def test_auto_mode_keeps_a_row_that_is_all_eos_at_its_last_token(pm, make_llama):
    from loraplan.calibration.inputs import positions

    ids = torch.tensor([[1, 1, 1, 0], [4, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    got = positions({"input_ids": ids, "attention_mask": mask}, "last", "auto", pad_id=0, eos_id=1)
    assert got.tolist() == [0, 0]
    assert positions({"input_ids": ids, "attention_mask": mask}, "last", "auto", 0, None).tolist() == [2, 3]


def test_encoders_pool_the_first_token_unless_told_otherwise(pm, make_bert, make_batches):
    model = make_bert(layers=2)
    batches = make_batches(n_batches=1, batch=4, length=8)
    stats, data = _calibrate(model, batches, {HIDDEN}, pm)
    assert stats.meta["pooling"] == "first"
    ids = data.batches[0]["input_ids"]
    with torch.no_grad():
        embedded = model.bert.embeddings(input_ids=ids)
    torch.testing.assert_close(stats.hidden[0], embedded[:, 0])
    last, _ = _calibrate(model, batches, {HIDDEN}, pm, pooling="last")
    positions = data.batches[0]["attention_mask"].sum(dim=1) - 1
    assert last.meta["pooling"] == "last"
    torch.testing.assert_close(last.hidden[0], embedded[torch.arange(4), positions])


def test_subset_batches_and_halves_keep_the_rows_of_their_batches(pm, make_llama, make_batches):
    model = make_llama(layers=2)
    stats, _ = _calibrate(model, make_batches(n_batches=4, batch=3), {HIDDEN, ACTIVATIONS, GRADIENTS}, pm, batch_size=3)
    first, second = stats.halves()
    assert (first.num_samples, second.num_samples) == (6, 6)
    assert first.batch_index.tolist() == second.batch_index.tolist() == [0, 0, 0, 1, 1, 1]
    for h, h1, h2 in zip(stats.hidden, first.hidden, second.hidden):
        torch.testing.assert_close(torch.cat([h1, h2]), h)
    torch.testing.assert_close(second.activation_sums, stats.activation_sums[6:])
    torch.testing.assert_close(second.gradients, stats.gradients[2:])
    odd = stats.subset_batches([3, 1])
    assert odd.tokens.tolist() == stats.tokens[[3, 4, 5, 9, 10, 11]].tolist()
    torch.testing.assert_close(odd.gradients, stats.gradients[[1, 3]])
    assert odd.halves() is not None and odd.subset_batches([0]).halves() is None


def test_a_peft_wrapped_model_is_calibrated_as_its_base_model(pm, make_llama, make_batches):
    from peft import LoraConfig, get_peft_model

    model = make_llama(layers=3)
    batches = make_batches(n_batches=2, batch=4)
    base_stats, data = _calibrate(model, batches, {HIDDEN, ACTIVATIONS}, pm)
    with torch.no_grad():
        base_logits = model(**data.batches[0]).logits
    # random B: the adapter changes the function, so a pass with it enabled would differ
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.train()
    with torch.no_grad():
        adapted_logits = peft_model(**data.batches[0]).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)
    stats, _ = _calibrate(peft_model, batches, {HIDDEN, ACTIVATIONS}, pm, targets=None)
    for a, b in zip(stats.hidden, base_stats.hidden):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(stats.activation_sums, base_stats.activation_sums)
    # the adapter is enabled again and the training mode restored
    assert peft_model.training
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**data.batches[0]).logits, adapted_logits)


def test_the_gradient_pass_restores_trainable_flags_and_gradients(pm, make_llama, make_batches):
    model = make_llama(layers=2)
    model.model.embed_tokens.weight.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj.weight
    kept = torch.full_like(q, 0.5)
    q.grad = kept
    stats, _ = _calibrate(model, make_batches(n_batches=2, batch=4), {GRADIENTS}, pm, targets=["q_proj"], batch_size=4)
    assert stats.gradients.shape == (2, 2) and bool((stats.gradients > 0).all())
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    assert q.grad is kept
    assert all(p.grad is None for p in model.parameters() if p is not q)


def test_model_inputs_turns_the_cache_off_only_where_the_forward_takes_it(make_llama, make_bert, make_batches):
    batch = make_batches(n_batches=1)[0]
    inputs = model_inputs(make_llama(layers=1), batch, torch.device("cpu"))
    assert sorted(inputs) == ["attention_mask", "input_ids", "use_cache"] and inputs["use_cache"] is False
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    assert sorted(model_inputs(make_bert(layers=1), batch, torch.device("cpu"))) == ["attention_mask", "input_ids"]


def test_targets_that_match_nothing_name_the_layer(pm, make_llama, make_batches):
    model = make_llama(layers=2)
    with pytest.raises(CalibrationError) as exc:
        _calibrate(model, make_batches(n_batches=1), {ACTIVATIONS}, pm, targets=["c_attn"])
    assert "no LoRA target module found in layer 0 (model.layers.0) for target_modules=['c_attn']" in str(exc.value)
    stats, _ = _calibrate(model, make_batches(n_batches=1), {HIDDEN}, pm, targets=["c_attn"])  # hidden needs none
    assert stats.target_names == [[], []]


def test_reference_mode_refuses_a_sample_of_only_eos_tokens(pm, make_llama):
    model = make_llama(layers=2)
    model.config.eos_token_id = 1
    ids = torch.tensor([[4, 5, 6], [1, 1, 1]])
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with pytest.raises(CalibrationError, match="sample 1 of a batch has no real token.*last_token='mask'"):
        _calibrate(model, batch, {HIDDEN}, pm, last_token="reference")
    stats, _ = _calibrate(model, batch, {HIDDEN}, pm)  # the mask says both rows are real
    assert stats.num_samples == 2


def test_nan_in_activations_names_the_layer(pm, make_llama, make_batches):
    model = make_llama(layers=6)
    with torch.no_grad():
        model.model.layers[3].input_layernorm.weight[0] = float("nan")
    with pytest.raises(CalibrationError) as exc:
        make_plan(model, make_batches(), PlanConfig(calibration_samples=8), plugin_manager=pm, progress=False)
    assert "layer 3 (model.layers.3)" in str(exc.value) and "nan/inf" in str(exc.value)
    with pytest.raises(CalibrationError, match="layer 3 \\(model.layers.3\\)"):
        make_plan(
            model,
            make_batches(),
            PlanConfig(selector="activation", calibration_samples=8),
            plugin_manager=pm,
            progress=False,
        )


def test_inf_in_the_embeddings_names_the_embedding_output(pm, make_llama, make_batches):
    model = make_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("inf")
    with pytest.raises(CalibrationError, match="embedding output"):
        make_plan(model, make_batches(), PlanConfig(calibration_samples=8), plugin_manager=pm, progress=False)


def test_gradient_selector_without_a_loss(pm, make_bert, make_batches):
    with pytest.raises(CalibrationError, match="needs a loss"):
        make_plan(
            make_bert(head=False),
            make_batches(),
            PlanConfig(selector="gradient", calibration_samples=8),
            plugin_manager=pm,
            progress=False,
        )


def test_batching_by_length_keeps_every_sample_statistic_and_splits_the_halves_by_sample(pm, make_llama):
    """Forward-only statistics batch the samples shortest first; each sample's pooled vectors and activation sums
    are those of file-order batching (float noise of other batch shapes aside), back in sample order, and the
    batches the stability halves split are numbered by sample, not by length."""
    model = make_llama(layers=3, seed=4)
    g = torch.Generator().manual_seed(6)
    lengths = [9, 3, 12, 5, 7, 2, 11, 4, 8, 6]
    rows = [{"input_ids": torch.randint(3, 100, (1, n), generator=g)} for n in lengths]
    rows = [{**r, "attention_mask": torch.ones_like(r["input_ids"])} for r in rows]
    config = PlanConfig(calibration_samples=len(rows), batch_size=4)
    stack = find_layers(model, pm)
    results = {}
    for by_length in (False, True):
        data = prepare_batches(rows, config, None, model.config, by_length=by_length)
        assert (data.order is not None) == by_length
        results[by_length] = calibrate(model, stack, data, {HIDDEN, ACTIVATIONS}, config, progress=False)
    plain, sorted_ = results[False], results[True]
    assert data.order == sorted(range(len(lengths)), key=lambda i: lengths[i])  # the batches really were reordered
    for a, b in zip(plain.hidden, sorted_.hidden):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sorted_.activation_sums, plain.activation_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sorted_.tokens, plain.tokens)
    assert sorted_.batch_index.tolist() == [i // 4 for i in range(len(lengths))] == plain.batch_index.tolist()
    assert sorted_.meta["batching"] == "by length"
