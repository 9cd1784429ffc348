"""`make bench-gpu` at smoke settings on the CPU: every part of the GPU suite runs end to end and reports ok, its
results and doc blocks written into its own directory and never into the docs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy

REPO = Path(__file__).resolve().parents[1]


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
    for block in ("speed.md", "calibration.md", "results.md"):
        assert (tmp_path / block).read_text().strip()
    speed = (tmp_path / "speed.md").read_text()
    assert "| limit |" in speed and "predicted (fitted)" in speed  # the hand-made limit rows and the fitted model
    assert docs == {p: p.read_bytes() for p in (REPO / "docs").rglob("*.md")}  # the docs are untouched
