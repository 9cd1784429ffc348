"""The plan in the trainer's trackers: one real 1-step ``Trainer`` run per tracker (TensorBoard, W&B offline, MLflow
file store), read back from what each wrote to disk."""

from __future__ import annotations

import builtins
import glob
import importlib
import json
import struct

import pytest

from loraplan import LoraPlan
from loraplan.integrations import hf as hf_module
from loraplan.integrations.hf import LoraPlanCallback
from loraplan.integrations.trackers import plan_rows, plan_summary
from loraplan.report import format_plan, parameter_count

TRACKER_MODULES = ("wandb", "mlflow", "torch.utils.tensorboard", "tensorboard")


@pytest.fixture
def reports(monkeypatch):
    """What each ``report_plan`` call inside the callback returned (the trackers written to)."""
    calls: list[list[str]] = []
    original = hf_module.report_plan

    def recording(*args, **kwargs):
        written = original(*args, **kwargs)
        calls.append(written)
        return written

    monkeypatch.setattr(hf_module, "report_plan", recording)
    return calls


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh HOME under tmp_path, so a tracker's per-user files (config, cache) cannot land elsewhere."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    return path


def stray(home) -> list[str]:
    """Files under the test's HOME other than matplotlib's font cache (which it builds on first import)."""
    return [str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and "matplotlib" not in p.parts]


def train(tmp_path, model_dir, tokenizer, texts, checks, shared, report_to, attach=True):
    callback = LoraPlanCallback(shared, calibration_data=texts, progress=False)
    trainer = checks.make_trainer(
        checks.lora_model(model_dir),
        tmp_path / "out",
        tokenizer,
        checks.tokenised(texts, tokenizer),
        callback,
        max_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to=report_to,
    )
    if attach:  # the callback then knows the trainer's TensorBoardCallback (a callback is not told its siblings)
        callback.attach(trainer)
    trainer.train()
    return callback.plan


def selected_in(columns, rows) -> list[int]:
    return [row[columns.index("layer")] for row in rows if row[columns.index("selected")]]


# -- TensorBoard ----------------------------------------------------------------------------------------------------
def test_tensorboard_event_file_has_table_figure_and_ratios(
    tmp_path, model_dir, tokenizer, texts, checks, shared, reports, home, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    plan = train(tmp_path, model_dir, tokenizer, texts, checks, shared, ["tensorboard"])
    assert reports == [["tensorboard"]]
    # the trainer's own writer: one event file, in the run folder TensorBoardCallback made under output_dir/runs
    events = glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(events[0], size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    texts_by_tag = {
        tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in tags["tensors"] if "loraplan" in tag
    }
    assert set(texts_by_tag) == {"loraplan/layers/text_summary", "loraplan/plan/text_summary"}
    table = texts_by_tag["loraplan/layers/text_summary"].splitlines()
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    assert columns == plan_rows(plan)[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert len(cells) == plan.num_layers
    assert [int(r[0]) for r in cells if r[columns.index("selected")] == "yes"] == plan.selected_layers
    for number, group in enumerate(plan.share_groups):
        assert [int(r[0]) for r in cells if r[columns.index("group")] == f"G{number}"] == group
    report = texts_by_tag["loraplan/plan/text_summary"]
    assert [line.removeprefix("    ") for line in report.splitlines()] == format_plan(plan).splitlines()
    (image,) = acc.Images("loraplan/plan_figure")
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100 and image.height > 100
    predicted = plan.cost["predicted"]["no_checkpointing"]["loraplan"]
    want = {
        "loraplan/lora_parameter_ratio": parameter_count(plan).ratio,
        "loraplan/predicted_step_time_ratio": predicted["time"],
        "loraplan/predicted_peak_memory_ratio": predicted["memory"],
    }
    for tag, value in want.items():
        (scalar,) = acc.Scalars(tag)
        assert scalar.step == 0 and scalar.value == pytest.approx(value, rel=1e-6)
    assert 0 < want["loraplan/lora_parameter_ratio"] < 1
    assert stray(home) == []


# -- W&B (offline) --------------------------------------------------------------------------------------------------
def wandb_records(path):
    """The protobuf records of an offline run's ``.wandb`` file (the LevelDB log format W&B writes: a 7-byte file
    header, then 32 KiB blocks of records with 7-byte headers: CRC, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        chunk, pos = raw[pos : pos + length], pos + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_has_config_table_figure_and_artifact(
    tmp_path, model_dir, tokenizer, texts, checks, shared, reports, home, monkeypatch
):
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    for name, folder in (
        ("WANDB_DIR", wandb_dir),
        ("WANDB_CACHE_DIR", wandb_dir / "cache"),
        ("WANDB_CONFIG_DIR", wandb_dir / "config"),
        ("WANDB_DATA_DIR", wandb_dir / "data"),
        ("WANDB_ARTIFACT_DIR", wandb_dir / "artifacts"),
    ):
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "loraplan-test")
    import wandb

    try:
        plan = train(tmp_path, model_dir, tokenizer, texts, checks, shared, ["wandb"])
        run_id = wandb.run.id
    finally:
        wandb.finish()
        wandb.teardown()  # stops wandb-core, which writes the run's .wandb file to its end
    assert reports == [["wandb"]]
    (run_dir,) = glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{run_id}"))
    # the per-layer table, as the run's media file
    (table_file,) = glob.glob(f"{run_dir}/files/media/table/loraplan/layers_*.table.json")
    table = json.loads(open(table_file).read())
    assert table["columns"] == plan_rows(plan)[0]
    assert len(table["data"]) == plan.num_layers
    assert selected_in(table["columns"], table["data"]) == plan.selected_layers
    # the figure
    (figure,) = glob.glob(f"{run_dir}/files/media/images/loraplan/plan_figure_*.png")
    assert open(figure, "rb").read(4) == b"\x89PNG"
    records = list(wandb_records(glob.glob(f"{run_dir}/run-{run_id}.wandb")[0]))
    # the config key
    configs = [
        json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
        if item.key == "loraplan"
    ]
    assert configs
    config = configs[-1]
    assert config == json.loads(json.dumps(plan_summary(plan)))
    assert config["selected_layers"] == plan.selected_layers and config["share_groups"] == plan.share_groups
    assert config["settings"]["selector"] == "cka"
    assert config["predicted_step_time_ratio"] == pytest.approx(
        plan.cost["predicted"]["no_checkpointing"]["loraplan"]["time"]
    )
    # the artifact: the plan JSON (as staged for upload), its text report and the figure
    artifacts = [
        r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "loraplan"
    ]
    assert [a.name for a in artifacts] == [f"loraplan-{run_id}"]
    contents = {c.path: c.local_path for c in artifacts[0].manifest.contents}
    assert set(contents) == {"loraplan.json", "plan.txt", "plan.png"}
    assert LoraPlan.from_dict(json.loads(open(contents["loraplan.json"]).read())) == plan
    assert all(path.startswith(str(tmp_path)) for path in contents.values())
    assert stray(home) == []


# -- MLflow (file store) --------------------------------------------------------------------------------------------
def test_mlflow_run_has_params_and_artifacts(
    tmp_path, model_dir, tokenizer, texts, checks, shared, reports, home, monkeypatch
):
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses the file store without it
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # restored afterwards: the callback sets it
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(name, raising=False)
    try:
        plan = train(tmp_path, model_dir, tokenizer, texts, checks, shared, ["mlflow"])
    finally:
        if mlflow.active_run() is not None:
            mlflow.end_run()
    assert reports == [["mlflow"]]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(experiment_ids=["0"])
    params = run.data.params
    assert json.loads(params["loraplan.selected_layers"]) == plan.selected_layers
    assert json.loads(params["loraplan.share_groups"]) == plan.share_groups
    assert params["loraplan.settings.selector"] == "cka"
    assert params["loraplan.settings.share"] == "angular"
    assert float(params["loraplan.lora_parameter_ratio"]) == pytest.approx(parameter_count(plan).ratio)
    assert float(params["loraplan.predicted_step_time_ratio"]) == pytest.approx(
        plan.cost["predicted"]["no_checkpointing"]["loraplan"]["time"]
    )
    assert {k for k in params if k.startswith("loraplan.")} == {
        f"loraplan.{k}" for k in plan_summary(plan) if k != "settings"
    } | {f"loraplan.settings.{k}" for k in plan.config}
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "loraplan")}
    assert paths == {"loraplan/loraplan.json", "loraplan/plan.txt", "loraplan/plan.png"}
    local = client.download_artifacts(run.info.run_id, "loraplan/loraplan.json", str(tmp_path / "download"))
    assert LoraPlan.load(local) == plan
    assert stray(home) == []


# -- nothing -------------------------------------------------------------------------------------------------------
def test_report_to_none_writes_and_imports_nothing(
    tmp_path, model_dir, tokenizer, texts, checks, shared, reports, home, monkeypatch
):
    imported: list[str] = []
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def tracker(name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in TRACKER_MODULES)

    def recording_import(name, *args, **kwargs):
        if tracker(name):
            imported.append(name)
        return real_import(name, *args, **kwargs)

    def recording_import_module(name, *args, **kwargs):
        if tracker(name):
            imported.append(name)
        return real_import_module(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", recording_import)
    monkeypatch.setattr(importlib, "import_module", recording_import_module)
    train(tmp_path, model_dir, tokenizer, texts, checks, shared, "none")
    monkeypatch.undo()
    assert reports == [[]]
    assert imported == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["loraplan.json"]
    assert stray(home) == []


# -- without the trainer's integrations -------------------------------------------------------------------------------
def test_without_trainer_runs_only_tensorboard_writes(
    tmp_path, model_dir, tokenizer, texts, checks, shared, monkeypatch
):
    """Called outside a Trainer: no W&B or MLflow run is active, so neither is written to (and none is started);
    TensorBoard gets a writer of its own in output_dir/runs/loraplan."""
    from types import SimpleNamespace

    import mlflow
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loraplan import make_plan
    from loraplan.integrations.trackers import report_plan

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert wandb.run is None and mlflow.active_run() is None
    plan = make_plan(checks.lora_model(model_dir), texts, shared, tokenizer, progress=False)
    args = SimpleNamespace(report_to=["wandb", "mlflow", "tensorboard"], output_dir=str(tmp_path), process_index=0)
    assert report_plan(plan, args) == ["tensorboard"]
    assert wandb.run is None and mlflow.active_run() is None
    (events,) = (tmp_path / "runs" / "loraplan").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    assert "loraplan/lora_parameter_ratio" in acc.Tags()["scalars"]
    # not the main process: nothing at all
    assert report_plan(plan, SimpleNamespace(**{**vars(args), "process_index": 1})) == []


def test_a_callback_never_attached_writes_tensorboard_into_a_run_of_its_own(
    tmp_path, model_dir, tokenizer, texts, checks, shared, reports, home, monkeypatch
):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    train(tmp_path, model_dir, tokenizer, texts, checks, shared, ["tensorboard"], attach=False)
    assert reports == [["tensorboard"]]
    (ours,) = (tmp_path / "out" / "runs" / "loraplan").glob("events.out.tfevents.*")
    curves = [p for p in (tmp_path / "out" / "runs").glob("*/events.out.tfevents.*") if p.parent.name != "loraplan"]
    assert len(curves) == 1 and ours.stat().st_size > 0
