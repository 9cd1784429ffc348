"""Plans across two real gloo processes (torchrun): every rank ends with rank 0's plan, rank 0's errors reach every
rank, and calibration works on weights DeepSpeed ZeRO-3 has already partitioned."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loraplan import LoraPlan

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(mode: str, out: Path, model_dir: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(WORKER),
            mode,
            str(out),
            str(model_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_every_rank_gets_rank0s_plan_and_errors(tmp_path, model_dir):
    ranks = torchrun("broadcast", tmp_path, model_dir)
    assert [f["world_size"] for f in ranks] == [2, 2]
    assert [f["value"] for f in ranks] == [1, 1]  # rank 0's result (0 * 10 + 1) on both
    for facts in ranks:
        assert facts["error"][0] == "CalibrationError" and "no real token" in facts["error"][1]
    # the two ranks held different calibration data, so their own plans differ ...
    assert ranks[0]["own_plan"]["calibration"]["data_hash"] != ranks[1]["own_plan"]["calibration"]["data_hash"]
    # ... and both trained with rank 0's
    assert ranks[0]["plan"] == ranks[1]["plan"] == ranks[0]["own_plan"]
    assert ranks[1]["loaded"] == ranks[0]["plan"]
    LoraPlan.from_dict(ranks[1]["plan"]).validate()


@pytest.mark.heavy
def test_calibration_on_zero3_partitioned_weights(tmp_path, model_dir):
    ranks = torchrun("zero3", tmp_path, model_dir)
    for facts in ranks:
        assert facts["partitioned"] is True
        assert facts["local_numel"] < facts["full_numel"]  # each rank holds a slice only
        assert facts["still_partitioned_after"] == facts["local_numel"]  # gathers were released
    assert ranks[0]["plan"] == ranks[1]["plan"]
    plan, reference = ranks[0]["plan"], ranks[0]["reference_plan"]
    # the same decisions and scores as calibrating an ordinary (unpartitioned) copy of the weights
    assert plan["selected_layers"] == reference["selected_layers"]
    assert plan["share_groups"] == reference["share_groups"]
    for name, values in reference["scores"].items():
        assert plan["scores"][name] == pytest.approx(values, rel=1e-4, abs=1e-6)
    assert plan["similarity"] is not None
    for row, want in zip(plan["similarity"], reference["similarity"]):
        assert row == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.heavy
def test_truncated_backward_under_fsdp2(tmp_path, model_dir):
    """FSDP2 shards every layer after the plan was applied; its hooks run before loraplan's. Two SGD steps with and
    without truncation end with the same losses and LoRA weights on both ranks, and layers 0-1 recorded nothing."""
    ranks = torchrun("fsdp2", tmp_path, model_dir)
    for facts in ranks:
        stock, ours = facts["stock"], facts["truncated"]
        assert ours["losses"] == pytest.approx(stock["losses"], rel=1e-5)
        assert ours["lora"].keys() == stock["lora"].keys() and ours["lora"]
        for name, values in stock["lora"].items():
            assert ours["lora"][name] == pytest.approx(values, rel=1e-4, abs=1e-6), name
        assert stock["output_requires_grad"] == {str(i): [True] for i in range(4)}
        assert ours["output_requires_grad"] == {"0": [False], "1": [False], "2": [True], "3": [True]}
    assert ranks[0]["truncated"]["lora"] == ranks[1]["truncated"]["lora"]


@pytest.mark.heavy
def test_encoder_decoder_and_qlora_under_ddp_in_hf_trainer(tmp_path, model_dir):
    """Two gloo ranks, HF Trainer with the callback: a T5 (both stacks planned) and the tiny Llama in 4-bit NF4."""
    ranks = torchrun("trainer_ddp", tmp_path, model_dir)
    for name in ("t5", "qlora"):
        assert ranks[0][name]["plan"] == ranks[1][name]["plan"]  # rank 0's plan on both ranks
        for facts in ranks:
            assert facts[name]["ddp"] == "DISTRIBUTED" and len(facts[name]["losses"]) == 2
            assert facts[name]["ties"] and all(facts[name]["ties"])
    t5 = LoraPlan.from_dict(ranks[0]["t5"]["plan"])
    assert [one.stack_path for one in t5.stacks] == ["encoder.block", "decoder.block"]
    assert LoraPlan.load(tmp_path / "t5" / "loraplan.json") == t5
    assert all(facts["qlora"]["unchanged"] for facts in ranks)  # no 4-bit weight changed through training and saving
    assert LoraPlan.from_dict(ranks[0]["qlora"]["plan"]).calibration["quantization"] == "4-bit nf4"
