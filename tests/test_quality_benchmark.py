"""The quality benchmark's smoke config, run end to end (real MiniLM and SmolLM2, real reviews, PEFT, HF Trainer,
TRL SFTTrainer with LoraPlanCallback), so benchmarks/quality.py cannot rot. About a minute on 2 CPU cores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraplan.allocation import expanded_rank

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"
SMOKE = ROOT / "benchmarks" / "quality_smoke.yaml"
NUM_LAYERS = {"minilm": 6, "smollm2": 30}

pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(SMOKE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    results = out / "smoke.jsonl"
    _run("--output", str(results))
    records = [json.loads(line) for line in results.read_text().splitlines()]
    return {"dir": out, "results": results, "records": records, "config": yaml.safe_load(SMOKE.read_text())}


def _runs(smoke):
    return {(r["task"], r["method"], r["seed"]): r for r in smoke["records"] if r["type"] == "run"}


def test_every_configuration_ran_with_lora_exactly_where_planned(smoke):
    config, runs = smoke["config"], _runs(smoke)
    methods = {m["name"]: m for m in config["methods"]}
    for task_name, task in config["tasks"].items():
        L = NUM_LAYERS[task["model"]]
        r = task["lora"]["r"]
        listed = task.get("methods") or list(methods)
        for name in listed:
            run = runs.get((task_name, name, 0))
            assert run is not None, f"no result for {task_name}/{name}"
            plan = methods[name]["plan"]
            k = L if plan["selector"] == "all" else math.floor(plan["ratio"] * L)
            assert len(run["selected_layers"]) == k, (task_name, name, run["selected_layers"])
            # what PEFT holds after the plan was applied: LoRA in the planned layers only, groups tied as planned
            assert run["lora_layers"] == run["selected_layers"], (task_name, name)
            assert run["tied_groups"] == run["share_groups"], (task_name, name)
            assert run["plan_matches"] is True
            assert run["modules_per_layer"] == [len(task["lora"]["target_modules"])]
            assert 0.0 <= run["accuracy"] <= 1.0
            assert run["steps"] == task["training"]["max_steps"]
            assert math.isfinite(run["train_loss"])
            if plan.get("share") == "angular":
                assert run["share_groups"], f"{task_name}/{name}: the smoke threshold must form share groups"
            want_rank = expanded_rank(k, run["share_groups"], r) if plan.get("rank_policy") == "budget" else r
            assert run["rank"] == want_rank and run["lora_ranks"] == [want_rank], (task_name, name)
            # shared modules are one tensor: the LoRA parameter count follows the number of distinct modules
            per_module = runs[(task_name, "all", 0)]["lora_params"] // L
            assert run["lora_params"] == per_module * run["num_modules"] * want_rank // r, (task_name, name)
        if task["kind"] == "sft":
            for name in listed:
                answers = runs[(task_name, name, 0)]["answers"]
                assert sum(answers.values()) == task["test_examples"]


def test_plans_are_the_methods_and_reused(smoke):
    config, runs = smoke["config"], _runs(smoke)
    minilm = {m: runs[("minilm_cls", m, 0)] for m in (m["name"] for m in config["methods"])}
    assert minilm["top"]["selected_layers"] == [3, 4, 5]
    assert minilm["bottom"]["selected_layers"] == [0, 1, 2]
    assert minilm["odd_even"]["share_groups"] == [[0, 1], [2, 3], [4, 5]]
    # the CLS embedding is the same for every review: CKA cannot score layer 0 and must not select it
    assert 0 not in minilm["cka"]["selected_layers"] and 0 not in minilm["cka_share"]["selected_layers"]
    assert minilm["cka_share"]["selected_layers"] == minilm["cka"]["selected_layers"]
    plans = [r for r in smoke["records"] if r["type"] == "plan"]
    keys = [(p["task"], p["method"], p["plan_seed"]) for p in plans]
    assert len(keys) == len(set(keys)), "a plan was calibrated twice"
    sft = [p for p in plans if p["task"] == "smollm2_sft" and p["method"] == "cka_share"][0]
    # made by LoraPlanCallback on TRL's rows, which end with EOS: read with last_token=reference
    assert sft["plan"]["config"]["last_token"] == "reference"
    assert sft["plan"]["calibration"]["num_samples"] == smoke["config"]["calibration"]["calibration_samples"]


def test_stability_cells(smoke):
    study = smoke["config"]["stability"]
    cells = [r for r in smoke["records"] if r["type"] == "stability"]
    assert len(cells) == len(study["tasks"]) * len(study["seeds"]) * study["subsets"] * len(study["selectors"])
    for cell in cells:
        assert len(cell["importance"]) == NUM_LAYERS[smoke["config"]["tasks"][cell["task"]]["model"]]
        assert len(cell["selected_layers"]) == 3


def test_resume_skips_finished_cells_and_report_writes_tables(smoke):
    before = sum(r["type"] == "run" for r in smoke["records"])
    _run("--output", str(smoke["results"]), "--only", "minilm_cls")
    records = [json.loads(line) for line in smoke["results"].read_text().splitlines()]
    assert sum(r["type"] == "run" for r in records) == before
    assert sum(r["type"] == "session" for r in records) == 2

    doc, figures = smoke["dir"] / "results.md", smoke["dir"] / "figures"
    _run("--output", str(smoke["results"]), "--report", f"report.doc={doc}", f"report.figures={figures}")
    text = doc.read_text()
    for task_name, task in smoke["config"]["tasks"].items():
        block = text.split(f"<!-- BEGIN quality:results-{task_name} -->")[1].split("<!-- END")[0]
        listed = task.get("methods") or [m["name"] for m in smoke["config"]["methods"]]
        labels = [m["label"] for m in smoke["config"]["methods"] if m["name"] in listed]
        assert all(f"| {label} |" in block for label in labels), block
        assert "⚠" not in block
    assert "<!-- BEGIN quality:stability -->" in text and "| minilm_cls | gradient |" in text
    for model in ("minilm", "smollm2"):
        png = figures / f"smoke_{model}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 150_000
