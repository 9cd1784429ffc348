"""`make bench-gpu` at smoke settings on the CPU: every part of the GPU suite runs end to end and reports ok, its
results and doc blocks written into its own directory and never into the docs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


BENCHMARKS = REPO / "benchmarks"


def test_every_sft_configuration_of_the_suite_runs_on_the_sft_task(script):
    """The suite names its SFT rows with --methods; a task's own `methods` list must not drop one in silence (it
    dropped CKA + shared rest and the time-budget plan, whose six cells then ran nothing)."""
    suite, quality = (
        script(BENCHMARKS / "gpu_suite.py", "bench_gpu_suite"),
        script(BENCHMARKS / "quality.py", "bench_quality"),
    )
    config = yaml.safe_load((REPO / "benchmarks" / "quality.yaml").read_text())
    task = config["tasks"]["smollm2_sft"]
    assert not set(suite.SFT_METHODS) <= set(task["methods"])  # the case that was broken: not all are listed there
    chosen = [m["name"] for m in quality.task_methods(config, task, list(suite.SFT_METHODS))]
    assert chosen == [m["name"] for m in config["methods"] if m["name"] in suite.SFT_METHODS]
    assert set(chosen) == set(suite.SFT_METHODS)
    assert [m["name"] for m in quality.task_methods(config, task, None)] == task["methods"]  # the default is kept


def test_the_parts_fit_the_nine_minutes_and_one_device_command(script):
    suite = script(BENCHMARKS / "gpu_suite.py", "bench_gpu_suite")
    assert set(suite.LIMITS) == set(suite.PARTS)
    assert sum(suite.LIMITS.values()) <= 9 * 60 < 600
    assert sum(suite.STEP_SHARE.values()) == pytest.approx(1.0)


def test_the_zero3_block_lists_every_check_or_says_the_run_did_not_finish(script):
    suite = script(BENCHMARKS / "gpu_suite.py", "bench_gpu_suite")
    checks = {"engine_ok": True, "losses": [10.8, 10.7], "saved_ties_equal": True, "ALL_OK": True}
    block = suite.zero3_block({"status": "ok", "seconds": 12.5, "checks": checks}, 20, smoke=True)
    assert block.startswith("<!-- zero3:gpu:begin") and block.endswith("<!-- zero3:gpu:end -->")
    assert "| `saved_ties_equal` | True |" in block and "2 losses, first 10.8000, last 10.7000" in block
    stopped = suite.zero3_block({"status": "stopped at its limit (60 s)", "seconds": 60.0}, 20, smoke=True)
    assert "stopped at its limit" in stopped and "did not finish" in stopped


@pytest.mark.heavy
def test_the_gpu_suite_runs_end_to_end_at_smoke_settings(tmp_path):
    docs = {p: p.read_bytes() for p in (REPO / "docs").rglob("*.md")}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log = (tmp_path / "suite.log").read_text() if (tmp_path / "suite.log").is_file() else ""
    assert done.returncode == 0, done.stdout[-3000:] + log[-5000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"step_time", "calibration", "zero3", "sft"}
    assert summary["zero3"]["checks"]["ALL_OK"] is True
    assert summary["sft"]["cells"] == 2
    checks = summary["zero3"]["checks"]
    assert checks["saved_ties_equal"] is True and checks["shared_lora_B_moved"] is True
    for block in ("speed.md", "calibration.md", "results.md", "deepspeed.md"):
        assert (tmp_path / block).read_text().strip()
    speed = (tmp_path / "speed.md").read_text()
    assert "| limit |" in speed and "predicted (fitted)" in speed  # the hand-made limit rows and the fitted model
    assert docs == {p: p.read_bytes() for p in (REPO / "docs").rglob("*.md")}  # the docs are untouched
