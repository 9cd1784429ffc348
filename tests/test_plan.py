"""`LoraPlan` (`loraplan.plan`): the JSON document, its checks against itself and against a model, and the
LoraConfig it gives PEFT."""

from __future__ import annotations

import json
import logging
import math

import pytest

from loraplan import LoraPlan, PlanConfig, make_plan
from loraplan.errors import PlanMismatchError
from loraplan.plan import fingerprint

FORMAT = "loraplan.plan/1"


def _document() -> dict:
    """A plan file with every documented key (docs/plan.md), NaN written as null."""
    return {
        "format": FORMAT,
        "num_layers": 4,
        "selected_layers": [1, 2, 3],
        "share_groups": [[2, 3]],
        "rank": 8,
        "scores": {"cka": [None, 0.25, 0.5, 0.125], "importance": [None, -0.25, -0.5, -0.125]},
        "similarity": [[1.0, 0.5, 0.25, None]] * 4,
        "config": PlanConfig(share="angular", rank_policy="budget").to_dict(),
        "model": {"class": "LlamaForCausalLM", "num_layers": 4, "hidden_size": 32, "layers_path": "model.layers"},
        "layers": {"path": "model.layers", "target_modules": ["self_attn.q_proj"]},
        "calibration": {"num_samples": 16, "data_hash": "sha256:0123456789abcdef"},
        "flagged_layers": {"0": "its input h_0 is identical for every calibration sample"},
        "diagnostics": {"distinct_vectors": [1, 16, 16, 16, 16]},
        "stability": {"activation": None, "cka": 0.75},
        "cost": {"step_time_ratio": 0.6},
        "warnings": ["layer 0 flagged"],
        "notes": ["a note"],
        "versions": {"loraplan": "0.0"},
    }


def _plan_for(model, selected=(1, 3), path="model.layers") -> LoraPlan:
    return LoraPlan.from_dict(
        {
            "format": FORMAT,
            "num_layers": 4,
            "selected_layers": list(selected),
            "model": fingerprint(model),
            "layers": {"path": path},
        }
    )


def test_a_plan_file_reads_and_writes_back_unchanged():
    document = _document()
    plan = LoraPlan.from_dict(json.loads(json.dumps(document)))
    assert math.isnan(plan.scores["cka"][0]) and plan.scores["cka"][1:] == [0.25, 0.5, 0.125]
    assert math.isnan(plan.similarity[0][3]) and math.isnan(plan.stability["activation"])
    assert plan.flagged_layers == {0: "its input h_0 is identical for every calibration sample"}
    assert (plan.share_groups, plan.rank, plan.selector, plan.share) == ([[2, 3]], 8, "cka", "angular")
    assert plan.stack_path == "model.layers"
    data = plan.to_dict()
    assert data == document
    json.dumps(data, allow_nan=False)  # NaN is written as null
    assert LoraPlan.from_dict(data) == plan


def test_a_plan_made_in_code_round_trips_through_a_dict():
    plan = LoraPlan(
        num_layers=3,
        selected_layers=[0, 2],
        share_groups=[[0, 2]],
        rank=4,
        scores={"importance": [0.1, float("nan"), 1 / 3]},
        flagged_layers={1: "constant"},
    )
    data = plan.to_dict()
    assert data["format"] == FORMAT and data["flagged_layers"] == {"1": "constant"}
    assert data["scores"]["importance"] == [0.1, None, 0.3333333333]  # 10 significant digits
    back = LoraPlan.from_dict(data)
    assert back == plan and back.flagged_layers == {1: "constant"}
    assert LoraPlan.from_dict({"format": FORMAT, "num_layers": 3, "selected_layers": [1]}).share_groups == []


def test_save_into_a_directory_and_load_it_back(tmp_path):
    plan = LoraPlan.from_dict(_document())
    path = plan.save(tmp_path)
    assert path == tmp_path / "loraplan.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loraplan.json"]  # the temporary file is gone
    text = path.read_text()
    assert text == plan.to_json() and list(json.loads(text)) == sorted(json.loads(text))
    assert LoraPlan.load(tmp_path) == plan == LoraPlan.load(path)
    again = LoraPlan.load(path).save(tmp_path / "nested" / "copy.json")
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("fmt", [None, "loraplan.plan/3"])
def test_from_dict_refuses_another_format(fmt):
    data = _document()
    data["format"] = fmt
    with pytest.raises(PlanMismatchError, match=f"`format` is {fmt!r}; this loraplan reads 'loraplan.plan/1'"):
        LoraPlan.from_dict(data)


def test_a_stacks_plan_file_without_stacks_is_refused():
    data = _document()
    data["format"] = "loraplan.plan/2"  # an encoder-decoder model's plan: its stacks are what it is made of
    with pytest.raises(PlanMismatchError, match="`stacks` of a 'loraplan.plan/2' plan must list two or more stacks"):
        LoraPlan.from_dict(data)


def test_from_dict_names_what_is_missing_or_malformed():
    with pytest.raises(PlanMismatchError, match=r"incomplete or malformed \(KeyError: 'selected_layers'\)"):
        LoraPlan.from_dict({"format": "loraplan.plan/1", "num_layers": 4})
    with pytest.raises(PlanMismatchError, match=r"incomplete or malformed \(ValueError"):
        LoraPlan.from_dict({"format": "loraplan.plan/1", "num_layers": "four", "selected_layers": [1]})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"selected_layers": []}, "selects no layer"),
        ({"selected_layers": [2, 1]}, "sorted and unique, got \\[2, 1\\]"),
        ({"selected_layers": [1, 1, 2]}, "sorted and unique"),
        ({"share_groups": [[2]]}, "share group \\[2\\] has one selected layer and nothing to share with"),
        ({"share_groups": [[2, 2]]}, "share group \\[2, 2\\] lists a layer twice"),
        ({"share_groups": [[]]}, "a share group is empty"),
        ({"share_groups": [[1, 2, 2]]}, "share group \\[1, 2, 2\\] lists a layer twice"),
        ({"share_groups": [[1, 2], [2, 3]]}, "layer\\(s\\) \\[2\\] appear in more than one share group"),
        ({"flagged_layers": {1: "constant"}}, "flagged \\(unscorable\\) layers \\[1\\] must not be selected"),
        (
            {"share_groups": [[2, 3]], "rank_pattern": {2: 0}},
            "`rank_pattern` gives layer 2 rank 0; ranks are integers >= 1",
        ),
        (
            {"model_fingerprint": {"num_layers": 6}},
            "`num_layers` is 4, but the plan's own model fingerprint \\(`model.num_layers`\\) says 6",
        ),
        ({"scores": {"cka": [0.5, 0.5]}}, "`scores.cka` has 2 values, but the plan has `num_layers` 4"),
    ],
    ids=[
        "empty",
        "unsorted",
        "duplicate",
        "group-of-one",
        "one-layer-twice",
        "empty-group",
        "repeated-layer",
        "overlap",
        "flagged",
        "rank-0-in-a-group",
        "num-layers-edited",
        "scores-of-another-plan",
    ],
)
def test_validate_names_what_is_wrong(changes, message):
    plan = LoraPlan(num_layers=4, selected_layers=[1, 2, 3])
    plan.validate()
    for key, value in changes.items():
        setattr(plan, key, value)
    with pytest.raises(PlanMismatchError, match=message):
        plan.validate()


def test_rank_and_group_helpers():
    plan = LoraPlan(num_layers=6, selected_layers=[0, 1, 2, 3, 4, 5], share_groups=[[0, 1], [2, 3, 4]])
    assert plan.num_modules() == 3
    assert [plan.group_of(i) for i in range(6)] == [0, 0, 1, 1, 1, None]
    assert plan.resolve_rank(4) == 4  # "keep" when the config says nothing
    plan.config = {"rank_policy": "budget"}
    assert plan.resolve_rank(4) == 8  # floor(6 * 4 / 3)
    plan.config = {"rank_policy": 16}
    assert plan.resolve_rank(4) == 16


def test_check_model_refuses_another_hidden_size_and_a_missing_stack(make_llama):
    model = make_llama(layers=4)
    plan = _plan_for(model)
    plan.check_model(model)
    wider = _llama(layers=4, hidden_size=48)
    with pytest.raises(PlanMismatchError, match="hidden_size: plan 32, model 48"):
        plan.check_model(wider)
    with pytest.raises(PlanMismatchError, match="transformer.h"):
        _plan_for(model, path="transformer.h").check_model(model)


def test_check_model_only_warns_for_another_head_on_the_same_backbone(make_llama, caplog):
    from transformers import LlamaForSequenceClassification

    causal = make_llama(layers=4)
    plan = _plan_for(causal)
    classifier = LlamaForSequenceClassification(causal.config)
    with caplog.at_level(logging.WARNING, logger="loraplan"):
        plan.check_model(classifier)
    assert "'LlamaForCausalLM'; this model has 'LlamaForSequenceClassification'" in caplog.text


def test_to_lora_config_of_a_hand_made_plan_puts_lora_on_the_planned_layers_only(make_llama, read_sites):
    from peft import LoraConfig, get_peft_model

    model = make_llama(layers=4)
    plan = _plan_for(model)
    user = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    config = plan.to_lora_config(user)
    assert user.exclude_modules is None and config is not user  # the user's config is left as it was
    sites = read_sites(get_peft_model(model, config))
    assert sorted(sites) == [f"model.layers.{i}.self_attn.{m}" for i in (1, 3) for m in ("q_proj", "v_proj")]
    assert set(sites.values()) == {4}


def test_a_plan_against_a_model_it_does_not_fit(tmp_path, pm, make_llama, make_batches):
    plan = make_plan(
        make_llama(layers=6), make_batches(), PlanConfig(calibration_samples=8), plugin_manager=pm, progress=False
    )
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
    bad.write_text(
        json.dumps({"format": "loraplan.plan/1", "num_layers": 4, "selected_layers": [1, 2], "share_groups": [[1, 3]]})
    )
    rest = LoraPlan.load(bad)  # a group may hold an unselected layer, which then carries LoRA through it
    assert (rest.adapted_layers, rest.shared_rest, rest.num_modules()) == ([1, 2, 3], [3], 2)
    bad.write_text(
        json.dumps({"format": "loraplan.plan/1", "num_layers": 4, "selected_layers": [1, 2], "share_groups": [[1, 7]]})
    )
    with pytest.raises(PlanMismatchError, match=r"share group \[1, 7\] must hold layer indices 0..3"):
        LoraPlan.load(bad)


def _llama(layers: int, hidden_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=101,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def test_the_file_keys_model_and_layers_are_the_attributes_model_fingerprint_and_stack():
    plan = LoraPlan.from_dict(_document())
    assert plan.model_fingerprint["class"] == "LlamaForCausalLM" and plan.stack["path"] == "model.layers"
    with pytest.warns(DeprecationWarning, match="LoraPlan.model is now LoraPlan.model_fingerprint"):
        assert plan.model is plan.model_fingerprint
    with pytest.warns(DeprecationWarning, match="LoraPlan.layers is now LoraPlan.stack"):
        plan.layers = {"path": "transformer.h"}
    assert plan.stack == {"path": "transformer.h"} and plan.to_dict()["layers"] == {"path": "transformer.h"}
    assert "stack" not in plan.to_dict() and "model_fingerprint" not in plan.to_dict()


def test_a_hand_edited_layer_count_is_named_where_the_plan_is_applied(make_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    from loraplan import apply_plan

    model = make_llama(layers=4)
    data = _plan_for(model).to_dict()
    data.update(num_layers=6, selected_layers=[1, 5])  # the file says 6 layers; its fingerprint and the model say 4
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanMismatchError, match="`num_layers` is 6, but the plan's own model fingerprint") as caught:
        apply_plan(get_peft_model(model, LoraConfig(target_modules=["q_proj"])), LoraPlan.from_dict(data))
    assert "Wrap the model" not in str(caught.value)
    # both edited to agree with each other: the model itself is compared
    plan = _plan_for(model)
    plan.num_layers, plan.model_fingerprint["num_layers"] = 6, 6
    with pytest.raises(PlanMismatchError, match="num_layers: plan 6, model 4"):
        plan.check_model(model)


def test_loading_a_file_that_is_not_a_plan_says_what_it_is(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(PlanMismatchError, match="is a PEFT adapter config, not a loraplan plan"):
        LoraPlan.load(tmp_path / "adapter_config.json")
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(PlanMismatchError, match="other.json is a JSON document without a `format` key, not a lora"):
        LoraPlan.load(tmp_path / "other.json")
    # the same, said the same way, for a document handed to from_dict (not "recompute the plan")
    with pytest.raises(PlanMismatchError, match="the data is a PEFT adapter config, not a loraplan plan") as caught:
        LoraPlan.from_dict({"peft_type": "LORA", "r": 8})
    assert "Recompute" not in str(caught.value)


def _save_repeatedly(path: str, selected: list[int], times: int) -> None:
    plan = LoraPlan(num_layers=8, selected_layers=selected, notes=["x" * 4000])  # a file of several pages
    for _ in range(times):
        plan.save(path)


def test_concurrent_saves_to_one_path_never_fail_and_a_reader_never_sees_a_torn_file(tmp_path):
    import multiprocessing

    path = tmp_path / "plan.json"
    LoraPlan(num_layers=8, selected_layers=[0]).save(path)
    context = multiprocessing.get_context("fork")
    writers = [
        context.Process(target=_save_repeatedly, args=(str(path), selected, 300)) for selected in ([1, 2], [5, 6, 7])
    ]
    for writer in writers:
        writer.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        seen.add(tuple(LoraPlan.load(path).selected_layers))  # a torn or missing file raises here
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0  # no save failed
    assert seen <= {(0,), (1, 2), (5, 6, 7)} and seen & {(1, 2), (5, 6, 7)}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left behind
