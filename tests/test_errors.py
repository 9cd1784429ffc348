"""Bad input gets a clear error (key, value, what is allowed, the fix) and nothing is planned wrongly."""

from __future__ import annotations

import json

import pytest
import torch

from loraplan import LoraPlan, PlanConfig, make_plan
from loraplan.errors import CalibrationError, ConfigError, PlanMismatchError


def test_count_beyond_the_layers(pm, make_llama, make_batches):
    with pytest.raises(ConfigError, match="`count` must be between 1 and the model's 6 layers, got 7"):
        make_plan(make_llama(layers=6), make_batches(), PlanConfig(count=7), plugin_manager=pm, progress=False)


@pytest.mark.parametrize(("debiased", "needed"), [(False, 2), (True, 4)], ids=["biased", "debiased"])
def test_fewer_samples_than_cka_needs(debiased, needed, pm, make_llama, make_batches):
    batches = make_batches(n_batches=1, batch=needed - 1)
    with pytest.raises(CalibrationError) as exc:
        make_plan(make_llama(), batches, PlanConfig(debiased=debiased), plugin_manager=pm, progress=False)
    assert f"{needed - 1} calibration sample(s) given" in str(exc.value) and f"needs at least {needed}" in str(exc.value)


def test_fewer_samples_than_asked_is_recorded(pm, make_llama, make_batches):
    plan = make_plan(make_llama(), make_batches(n_batches=1), PlanConfig(calibration_samples=50), plugin_manager=pm, progress=False)
    assert plan.calibration["num_samples"] == 4
    assert any("only 4 calibration samples" in w for w in plan.warnings)


def test_empty_and_all_padding_batches(pm, make_llama):
    model = make_llama()
    empty = [{"input_ids": torch.zeros(0, 5, dtype=torch.long)}]
    with pytest.raises(CalibrationError, match="batch 0 is empty"):
        make_plan(model, empty, PlanConfig(), plugin_manager=pm, progress=False)
    padding = [{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}]
    with pytest.raises(CalibrationError, match="all padding"):
        make_plan(model, padding, PlanConfig(), plugin_manager=pm, progress=False)
    one_row = torch.ones(2, 5, dtype=torch.long)
    one_row[1] = 0
    with pytest.raises(CalibrationError, match="row 1 is all padding"):
        make_plan(model, [{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": one_row}], PlanConfig(),
                  plugin_manager=pm, progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        make_plan(model, [], PlanConfig(), plugin_manager=pm, progress=False)


def test_text_without_a_tokenizer_and_other_wrong_data(pm, make_llama):
    model = make_llama()
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        make_plan(model, ["a text", "another"], PlanConfig(), plugin_manager=pm, progress=False)
    with pytest.raises(ConfigError, match="single string"):
        make_plan(model, "a text", PlanConfig(), plugin_manager=pm, progress=False)
    with pytest.raises(ConfigError, match="`text_field` is 'text', but calibration record 0 has keys \\['review'\\]"):
        make_plan(model, [{"review": "x"}], PlanConfig(), plugin_manager=pm, progress=False)
    with pytest.raises(ConfigError, match="None"):
        make_plan(model, None, PlanConfig(), plugin_manager=pm, progress=False)


def test_nan_in_activations_names_the_layer(pm, make_llama, make_batches):
    model = make_llama(layers=6)
    with torch.no_grad():
        model.model.layers[3].input_layernorm.weight[0] = float("nan")
    with pytest.raises(CalibrationError) as exc:
        make_plan(model, make_batches(), PlanConfig(calibration_samples=8), plugin_manager=pm, progress=False)
    assert "layer 3 (model.layers.3)" in str(exc.value) and "nan/inf" in str(exc.value)
    with pytest.raises(CalibrationError, match="layer 3 \\(model.layers.3\\)"):
        make_plan(model, make_batches(), PlanConfig(selector="activation", calibration_samples=8), plugin_manager=pm,
                  progress=False)


def test_inf_in_the_embeddings_names_the_embedding_output(pm, make_llama, make_batches):
    model = make_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("inf")
    with pytest.raises(CalibrationError, match="embedding output"):
        make_plan(model, make_batches(), PlanConfig(calibration_samples=8), plugin_manager=pm, progress=False)


def test_gradient_selector_without_a_loss(pm, make_bert, make_batches):
    with pytest.raises(CalibrationError, match="needs a loss"):
        make_plan(make_bert(head=False), make_batches(), PlanConfig(selector="gradient", calibration_samples=8),
                  plugin_manager=pm, progress=False)


def test_cumulative_with_a_fixed_baseline(pm, make_llama, make_batches):
    with pytest.raises(ConfigError, match="`cumulative` needs a data-driven selector"):
        make_plan(make_llama(), make_batches(), PlanConfig(selector="top", cumulative=0.5), plugin_manager=pm, progress=False)


def test_a_plan_against_a_model_it_does_not_fit(tmp_path, pm, make_llama, make_batches):
    plan = make_plan(make_llama(layers=6), make_batches(), PlanConfig(calibration_samples=8), plugin_manager=pm, progress=False)
    with pytest.raises(PlanMismatchError) as exc:
        plan.check_model(make_llama(layers=4))
    assert "num_layers: plan 6, model 4" in str(exc.value) and "Recompute the plan" in str(exc.value)


def test_malformed_plan_files(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(PlanMismatchError, match="invalid JSON"):
        LoraPlan.load(bad)
    bad.write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(PlanMismatchError, match="`format` is 'other/9'"):
        LoraPlan.load(bad)
    with pytest.raises(PlanMismatchError, match="no loraplan plan"):
        LoraPlan.load(tmp_path / "missing.json")
    bad.write_text(json.dumps({"format": "loraplan.plan/1", "num_layers": 4, "selected_layers": [1, 7]}))
    with pytest.raises(PlanMismatchError, match="indices 0..3"):
        LoraPlan.load(bad)
    bad.write_text(json.dumps({"format": "loraplan.plan/1", "num_layers": 4, "selected_layers": [1, 2],
                               "share_groups": [[1, 3]]}))
    with pytest.raises(PlanMismatchError, match="not selected"):
        LoraPlan.load(bad)
