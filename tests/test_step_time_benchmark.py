"""The step-time benchmark (benchmarks/step_time.py) end to end on a micro model, so that it cannot rot: every
configuration runs, the reference rows are 1, loraplan's rows ran with the layers below the cut truncated and
stock PEFT's without, and the report block replaces itself in a doc. No timing is asserted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
MICRO = dict(
    model="tiny",
    layers=4,
    hidden=32,
    intermediate=64,
    heads=4,
    kv_heads=2,
    vocab=128,
    batch=1,
    seq_len=16,
    dtype="float32",
    device="cpu",
    rank=2,
    repeats=1,
    warmup=0,
    cka_samples=8,
    cka_max_length=16,
)


@pytest.fixture(scope="module")
def bench(script):
    return script(SCRIPT, "step_time_benchmark")


def test_presets_cover_the_design_settings(bench):
    cpu, gpu = bench.PRESETS["cpu"], bench.PRESETS["gpu"]
    assert (cpu["model"], cpu["batch"], cpu["seq_len"], cpu["dtype"], cpu["rank"], cpu["repeats"]) == (
        "smollm2",
        4,
        256,
        "float32",
        16,
        5,
    )
    assert (gpu["layers"], gpu["hidden"], gpu["batch"], gpu["seq_len"], gpu["dtype"], gpu["repeats"]) == (
        22,
        2048,
        8,
        1024,
        "bfloat16",
        8,
    )


def test_one_micro_run_measures_every_configuration(bench, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bench.run(dict(MICRO), time_budget=0.9, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    plans = ["top half", "bottom half", "every other", "CKA", "CKA, time_budget=0.9"]
    assert set(result["plans"]) == set(plans)
    assert result["plans"]["top half"] == [2, 3] and result["plans"]["bottom half"] == [0, 1]
    seen = {(r["plan"], r["mode"], r["checkpointing"]) for r in rows}
    for checkpointing in (True, False):
        assert ("all layers", "all layers", checkpointing) in seen
        for plan in plans:
            assert {(plan, "stock PEFT", checkpointing), (plan, "loraplan", checkpointing)} <= seen
    # a limit row (the blocks below the cut under no_grad by hand) beside loraplan for every plan with a cut
    cut = [plan for plan in plans if min(result["plans"][plan]) > 0]
    assert cut and {(plan, "limit", c) for plan in cut for c in (True, False)} <= seen
    assert ("top half", "stock PEFT, input grads off", False) in seen and len(rows) == 23 + 2 * len(cut)
    for r in rows:
        assert len(r["times_s"]) == 1 and r["median_s"] > 0 and r["peak_bytes"] > 0
        assert all(
            math.isfinite(r[k])
            for k in (
                "time_ratio",
                "predicted_time_ratio",
                "flops_time_ratio",
                "fitted_time_ratio",
                "memory_ratio",
                "predicted_memory_ratio",
            )
        )
        if r["mode"] == "all layers":
            assert r["time_ratio"] == 1.0 and r["predicted_time_ratio"] == pytest.approx(1.0)
        expected = list(range(r["lowest"])) if r["mode"] == "loraplan" else []
        assert r["truncated"] == expected, r
    assert "time_budget 0.9" in result["budget"]["CKA, time_budget=0.9"]
    doc = tmp_path / "speed.md"
    doc.write_text("# Speed\n\nintro\n", encoding="utf-8")
    block = bench.markdown(result, "smoke")
    assert "| top half | 2 (2) | yes | loraplan |" in block
    bench.write_doc(doc, block, "smoke")
    bench.write_doc(doc, block, "smoke")  # replaced, not appended twice
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Speed\n\nintro\n") and text.count("<!-- step_time:smoke:begin") == 1
