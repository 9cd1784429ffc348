"""The plan's sub-records (`loraplan.plan_records`): each one's JSON form round-trips exactly (optional keys absent
or present, ``null`` kept, unknown keys kept), the mapping view reads as the dicts they replace did, and a plan file
made by the planner loads and saves to the same bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from loraplan import LoraPlan, PlanConfig, hookimpl, make_plan
from loraplan.cost.prediction import LayerCosts
from loraplan.errors import PlanMismatchError
from loraplan.plan_records import (
    CalibrationRecord,
    CostRecord,
    DiagnosticsRecord,
    ModelFingerprint,
    StackRecord,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FINGERPRINT = {
    "class": "LlamaForCausalLM",
    "model_type": "llama",
    "num_layers": 6,
    "hidden_size": 32,
    "layers_path": "model.layers",
    "config_hash": "sha256:0123456789abcdef",
}
STACK = {
    "path": "model.layers",
    "pattern": "layers",
    "ambiguous": False,
    "target_modules": ["q_proj", "v_proj"],
    "module_shapes": {"self_attn.q_proj": [32, 32], "self_attn.v_proj": [32, 16]},
    "targets_from": "config",
    "other_stacks": [],
}
CALIBRATION = {
    "num_samples": 16,
    "num_tokens": 160,
    "max_length": 512,
    "batch_size": 8,
    "data_hash": "sha256:0123456789abcdef",
    "seed": 0,
    "pooling": "last",
    "last_token": "auto",
    "dtype": "float32",
    "device": None,
    "statistics": ["hidden"],
}
DIAGNOSTICS = {"max_sample_variance_share": [0.5, None, 0.25], "distinct_vectors": [1, 16, 16]}
COSTS = LayerCosts(
    source="flops",
    unit="GFLOP",
    shape=[2, 32],
    rank=8,
    num_layers=6,
    layer={"frozen": 1.0, "lora": 1.5},
    head=2.0,
    optimizer_per_param=1e-8,
    lora_params_per_layer=1024,
    memory={"weights": 100.0},
    device="cpu",
    dtype="float32",
    notes=["no output head found: its cost is not counted"],
)
PREDICTED = {"checkpointing": {"loraplan": {"time": 0.5, "memory": 0.75}}}

RECORDS = [
    (ModelFingerprint, FINGERPRINT, {"stacks": ["encoder.block", "decoder.block"]}),
    (StackRecord, STACK, {"name": "decoder", "pooling": None, "stacks": ["encoder.block"]}),
    (
        CalibrationRecord,
        CALIBRATION,
        {"batching": "by length", "lora_drop": {"steps": 2}, "quantization": "4-bit nf4", "base_rank": 8},
    ),
    (DiagnosticsRecord, DIAGNOSTICS, {}),
    (CostRecord, {**COSTS.to_dict(), "predicted": PREDICTED}, {"budget": {"summary": "fits"}}),
]


@pytest.mark.parametrize("kind, always, optional", RECORDS, ids=lambda v: getattr(v, "__name__", ""))
def test_every_record_reads_back_exactly_the_keys_it_had(kind, always, optional):
    for data in (always, {**always, **optional}, {}, {**always, "from_a_plugin": {"x": 1}}):
        record = kind.from_dict(json.loads(json.dumps(data)))
        assert record.to_dict() == data and record == data and kind.from_dict(record.to_dict()) == record
    partial = {key: always[key] for key in list(always)[:2]}  # a hand-made file: the keys it has, no more
    assert kind.from_dict(partial).to_dict() == partial


def test_a_record_built_in_code_writes_what_the_planner_always_writes_and_its_set_optional_keys():
    assert CalibrationRecord(num_samples=4).to_dict() == {**dict.fromkeys(CALIBRATION), "num_samples": 4}
    assert "base_rank" not in CalibrationRecord() and CalibrationRecord(base_rank=8)["base_rank"] == 8
    assert ModelFingerprint(class_name="Bert").to_dict() == {**dict.fromkeys(FINGERPRINT), "class": "Bert"}
    assert DiagnosticsRecord().to_dict() == {} and CostRecord().to_dict() == {}
    record = StackRecord(path="model.layers")
    assert set(record) == {"path", "pattern", "ambiguous", "target_modules", "module_shapes"}
    record.name = "encoder"  # setting an attribute adds its key; an optional key set to None leaves again
    assert record["name"] == "encoder"
    record.name = None
    assert "name" not in record
    record.pattern = None  # a key the planner always writes stays, as null
    assert record.to_dict()["pattern"] is None


def test_null_and_unknown_keys_in_a_file_are_written_back():
    data = {**STACK, "name": None, "pooling": None, "from_a_newer_version": [1, 2]}
    record = StackRecord.from_dict(data)
    assert record.extra == {"from_a_newer_version": [1, 2]} and record.name is None
    assert record.to_dict() == data
    assert record.copy().to_dict() == data and record.replace(path="h").to_dict() == {**data, "path": "h"}
    assert ModelFingerprint.from_dict({**FINGERPRINT, "stacks": None}).to_dict() == {**FINGERPRINT, "stacks": None}


def test_the_mapping_view_reads_as_the_dicts_did():
    record = ModelFingerprint.from_dict(FINGERPRINT)
    assert record.class_name == record["class"] == "LlamaForCausalLM" and record.get("nothing") is None
    assert "class" in record and "class_name" not in record and len(record) == 6
    assert dict(record) == FINGERPRINT and dict(record.items()) == FINGERPRINT and list(record) == list(FINGERPRINT)
    assert {**record, "stacks": []} == {**FINGERPRINT, "stacks": []}
    assert not CalibrationRecord.empty() and CalibrationRecord.empty() == {}
    record["num_layers"] = 4  # writes the attribute (code and plugins written against the dicts)
    record["from_a_plugin"] = "yes"  # an unknown key goes to extra
    record.update(hidden_size=64)
    assert (record.num_layers, record.hidden_size, record.extra) == (4, 64, {"from_a_plugin": "yes"})
    with pytest.raises(KeyError):
        record["nothing"]
    with pytest.raises(TypeError, match="ModelFingerprint is read from a JSON object, got list"):
        ModelFingerprint.from_dict([1])


def test_the_cost_record_holds_the_cost_model_as_layer_costs():
    data = {**COSTS.to_dict(), "predicted": PREDICTED, "budget": {"summary": "fits"}}
    record = CostRecord.from_dict(json.loads(json.dumps(data)))
    assert record.costs == COSTS and record.predicted == PREDICTED and record.extra == {}
    assert record.budget == record.budget_dict() == {"summary": "fits"} and record.unavailable is None
    assert record["source"] == "flops" and record["predicted"] is record.predicted
    record["notes"].append("a second note")  # the view holds the cost model's own list, as the dict did
    assert record.costs.notes[-1] == "a second note" and record.to_dict()["notes"][-1] == "a second note"
    assert CostRecord.from_dict({"unavailable": "why"}).to_dict() == {"unavailable": "why"}
    assert CostRecord(unavailable="why").costs is None and CostRecord(unavailable="why")["unavailable"] == "why"


def test_a_budget_is_kept_as_given_and_written_as_its_dict():
    @dataclass
    class Budget:
        summary: str

        def to_dict(self):
            return {"summary": self.summary}

    budget = Budget("fits")
    record = CostRecord(costs=COSTS, predicted=PREDICTED, budget=budget)
    assert record.budget is budget and record["budget"] == {"summary": "fits"}
    written = record.to_dict()
    assert written == {**COSTS.to_dict(), "predicted": PREDICTED, "budget": {"summary": "fits"}}
    assert CostRecord.from_dict(written).budget == {"summary": "fits"}  # read back as a plain dict


@pytest.mark.parametrize(
    "data",
    [
        {"step_time_ratio": 0.6},  # not the cost model's keys
        {key: value for key, value in COSTS.to_dict().items() if key != "memory"},  # a key it needs is missing
        {**COSTS.to_dict(), "samples": None},  # a key it would not write back
    ],
    ids=["unknown", "incomplete", "null-samples"],
)
def test_cost_keys_that_do_not_read_back_as_layer_costs_stay_as_they_are(data):
    record = CostRecord.from_dict(data)
    assert record.costs is None and record.extra == data and record.to_dict() == data


def test_a_plan_takes_its_records_as_dicts_and_writes_them_under_their_file_keys():
    plan = LoraPlan(num_layers=6, selected_layers=[1], stack=STACK, model_fingerprint=FINGERPRINT, cost={"x": 1})
    assert isinstance(plan.stack, StackRecord) and plan.stack.module_shapes["self_attn.v_proj"] == [32, 16]
    assert plan.model_fingerprint.class_name == "LlamaForCausalLM" and plan.cost.extra == {"x": 1}
    plan.calibration = CALIBRATION  # assigning a dict later, too
    plan.diagnostics = DIAGNOSTICS
    assert isinstance(plan.calibration, CalibrationRecord) and plan.calibration.num_samples == 16
    data = plan.to_dict()
    assert (data["layers"], data["model"], data["calibration"]) == (STACK, FINGERPRINT, CALIBRATION)
    assert data["diagnostics"] == DIAGNOSTICS and data["cost"] == {"x": 1}
    assert LoraPlan(num_layers=2, selected_layers=[0]).to_dict()["layers"] == {}
    with pytest.raises(PlanMismatchError, match="CostRecord is read from a JSON object"):
        LoraPlan.from_dict({"format": "loraplan.plan/1", "num_layers": 2, "selected_layers": [0], "cost": [1]})


def _keys_from_a_plugin(pm):
    class AddsKeys:
        @hookimpl
        def loraplan_adjust_plan(self, plan):
            plan.calibration["acme_seconds"] = 1.5
            plan.stack["acme"] = {"kept": True}

    pm.register(AddsKeys(), name="acme")


@pytest.mark.parametrize(
    "settings, lora_rank",
    [
        (dict(share="angular", share_threshold=0.3), None),
        (dict(selector="activation", time_budget=0.7), 8),
        (dict(selector="activation", param_budget=0.5, rank_policy="importance"), 8),
    ],
    ids=["angular", "time-budget", "param-budget"],
)
def test_a_plan_file_the_planner_wrote_loads_and_saves_to_the_same_bytes(
    settings, lora_rank, pm, make_llama, make_batches, tmp_path
):
    _keys_from_a_plugin(pm)
    config = PlanConfig(calibration_samples=16, **settings)
    plan = make_plan(
        make_llama(layers=6), make_batches(), config, plugin_manager=pm, progress=False, lora_rank=lora_rank
    )
    path = plan.save(tmp_path / "plan.json")
    text = path.read_text()
    loaded = LoraPlan.load(path)
    assert loaded.to_json() == text and loaded == plan
    again = LoraPlan.load(loaded.save(tmp_path / "again.json"))
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes() and again == plan
    data = json.loads(text)
    assert loaded.calibration.extra == {"acme_seconds": 1.5} and data["calibration"]["acme_seconds"] == 1.5
    assert loaded.stack.extra == {"acme": {"kept": True}} and data["layers"]["acme"] == {"kept": True}
    assert loaded.model_fingerprint.class_name == data["model"]["class"] == "LlamaForCausalLM"
    assert loaded.stack.module_shapes == data["layers"]["module_shapes"]
    assert loaded.calibration.num_samples == 16 and loaded.calibration.base_rank == lora_rank
    assert loaded.cost.costs is not None and loaded.cost.costs.notes == data["cost"]["notes"]
    assert loaded.cost.predicted == data["cost"]["predicted"]
    assert (
        (loaded.cost.budget is not None)
        == ("budget" in data["cost"])
        == ("time_budget" in settings or "param_budget" in settings)
    )
    assert list(loaded.diagnostics) == (
        ["max_sample_variance_share", "distinct_vectors"] if "share" in settings else []
    )


def _tiny_t5():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.T5Config(
        vocab_size=101, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return tf.T5ForConditionalGeneration(config).eval()


def test_an_encoder_decoder_plan_file_loads_and_saves_to_the_same_bytes(pm, make_batches, tmp_path):
    batches = [{**b, "labels": b["input_ids"][:, :5].clone()} for b in make_batches(n_batches=3)]
    config = PlanConfig(selector="cka", calibration_samples=12)
    plan = make_plan(_tiny_t5(), batches, config, plugin_manager=pm, progress=False, lora_rank=8)
    path = plan.save(tmp_path / "plan.json")
    loaded = LoraPlan.load(path)
    assert loaded.to_json() == path.read_text() and loaded == plan
    data = json.loads(path.read_text())
    assert loaded.model_fingerprint.stacks == data["model"]["stacks"] == ["encoder.block", "decoder.block"]
    assert loaded.model_fingerprint.layers_path is None and loaded.cost.unavailable == data["cost"]["unavailable"]
    assert loaded.calibration.pooling == data["calibration"]["pooling"] and loaded.calibration.base_rank == 8
    for one, entry in zip(loaded.stacks, data["stacks"]):
        assert one.stack.name == entry["name"] == entry["layers"]["name"] and one.stack.path == entry["path"]
        assert one.stack.pooling == entry["layers"]["pooling"] and one.calibration.base_rank == 8
        assert one.model_fingerprint.layers_path == entry["path"] and one.model_fingerprint.stacks is None
