"""FSDP2 through the trainers on two CPU processes (gloo): the TRL recipe launched with ``accelerate launch
--config_file recipes/accelerate/fsdp2.yaml``, and HF ``Trainer`` with ``TrainingArguments(fsdp=..., fsdp_config=
{"fsdp_version": 2})``. accelerate sets FSDP up only on accelerators; on the CPU the recipe's ``cpu_fsdp`` keeps the
FSDP plugin on accelerate's gloo processes, so torch's ``fully_shard`` runs for real (docs/integrations/fsdp.md).

Checked: the same plan on both ranks and on disk, LoRA only in the planned layers, the layers below the plan run
without autograd and give the losses and LoRA weights of stock (untruncated) training on the same data, the saved
adapter reloads in stock PEFT with the trained model's outputs, resume, and sharing refused before training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loraplan import LoraPlan

pytestmark = pytest.mark.heavy

REPO = Path(__file__).resolve().parents[2]
TINY = "recipes/configs/trl/tiny_cpu.yaml"
FSDP2 = "recipes/accelerate/fsdp2.yaml"
WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(out: Path, report: Path, *overrides: str, resume: bool = False, check: bool = True):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        FSDP2,
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "recipes/trl_sft.py",
        "--config",
        TINY,
        "--report",
        str(report),
        *(["--resume"] if resume else []),
        f"training.output_dir={out}",
        "loraplan.share=null",
        "training.max_steps=4",
        "training.save_steps=2",
        *overrides,
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if not check:
        return done
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads(report.with_name(f"{report.stem}.rank{r}{report.suffix}").read_text()) for r in (0, 1)]


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def truncated_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("fsdp2")
    return work, accelerate_launch(work / "out", work / "report.json")


def test_fsdp2_trl_recipe_trains_the_plan_on_two_cpu_ranks(truncated_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work, ranks = truncated_run
    out = work / "out"
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["fsdp_version"] == 2 and r["engine"].startswith("FSDP") for r in ranks)
    # the same plan bytes on both ranks, and on disk beside the adapter and every checkpoint
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["plan_sha256"] == ranks[1]["plan_sha256"]
    assert hashlib.sha256((out / "loraplan.json").read_bytes()).hexdigest() == ranks[0]["plan_sha256"]
    plan = LoraPlan.from_dict(ranks[0]["plan"])
    assert not plan.share_groups and min(plan.adapted_layers) > 0
    for where in (out, out / "checkpoint-2", out / "checkpoint-4"):
        assert LoraPlan.load(where / "loraplan.json") == plan
    # LoRA only in the planned layers, live on every rank and in the saved adapter
    for facts in ranks:
        assert sorted(int(i) for i, modules in facts["layers"].items() if modules) == plan.adapted_layers
        assert facts["global_step"] == 4 and len(facts["losses"]) == 4
        # the truncated backward: the layers below the plan ran without autograd
        assert facts["truncation"]["active"] and facts["truncation"]["layers"] == list(range(min(plan.adapted_layers)))
        for layer, seen in facts["output_requires_grad"].items():
            assert seen == ([False] if int(layer) < min(plan.adapted_layers) else [True])
    weights = _adapter(out)
    assert sorted({int(k.split(".layers.")[1].split(".")[0]) for k in weights}) == plan.adapted_layers
    # the saved adapter (full tensors, FULL_STATE_DICT) reloads in stock PEFT with the trained model's outputs
    base = AutoModelForCausalLM.from_pretrained(ranks[0]["base_model"])
    stock = PeftModel.from_pretrained(base, str(out)).eval()
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(ranks[0]["base_model"])
    batch = tokenizer(["A fine cup of tea.", "Stale and bitter, never again."], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = stock(**batch).logits[..., :256]
    torch.testing.assert_close(got, torch.tensor(ranks[0]["probe_logits"]), rtol=1e-5, atol=1e-5)


def test_fsdp2_truncated_backward_equals_stock_training_in_the_recipe(truncated_run, tmp_path):
    work, truncated = truncated_run
    stock = accelerate_launch(tmp_path / "out", tmp_path / "report.json", "loraplan.truncate_backward=false")
    assert all(not facts["truncation"]["active"] for facts in stock)
    assert all(seen == [True] for f in stock for seen in f["output_requires_grad"].values())
    for ours, theirs in zip(truncated, stock):
        assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-6, abs=1e-6)
        # every LoRA gradient of the first step, this rank's shard of it: equal to stock's
        assert ours["first_gradients"] and ours["first_gradients"].keys() == theirs["first_gradients"].keys()
        # lora_B starts at zero, so at the first step its gradients carry everything: they must not be zero
        assert any(v > 0 for name, v in ours["first_gradients"].items() if "lora_B" in name)
        for name, value in ours["first_gradients"].items():
            assert value == pytest.approx(theirs["first_gradients"][name], rel=1e-6, abs=1e-12), name
    # after four optimizer steps the LoRA weights agree: the gradients were the same
    import torch

    ours, theirs = _adapter(work / "out"), _adapter(tmp_path / "out")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fsdp2_trl_recipe_resumes_with_the_saved_plan(truncated_run, tmp_path):
    import torch

    work, full = truncated_run
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(work / "out" / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(work / "out" / "loraplan.json", out / "loraplan.json")
    saved = (out / "loraplan.json").read_bytes()
    resumed = accelerate_launch(out, tmp_path / "report.json", resume=True)
    assert (out / "loraplan.json").read_bytes() == saved
    assert resumed[0]["plan"] == full[0]["plan"] and resumed[0]["global_step"] == 4
    # steps 1 and 2 from the checkpoint's log, 3 and 4 trained again: as in the uninterrupted run, same final adapter
    assert resumed[0]["losses"] == pytest.approx(full[0]["losses"], rel=1e-6, abs=1e-6)
    ours, theirs = _adapter(out), _adapter(work / "out")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fsdp2_trl_recipe_refuses_a_shared_plan_before_training(tmp_path):
    done = accelerate_launch(tmp_path / "out", tmp_path / "report.json", "loraplan.share=angular", check=False)
    assert done.returncode != 0
    assert (
        "ConfigError: `share` is 'angular': under FSDP2 every decoder layer is its own fully_shard unit" in done.stderr
    )
    assert "loraplan calibration" not in done.stderr  # refused before any calibration was spent
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_fsdp2_trainer_from_its_training_arguments(tmp_path, model_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(WORKER), "trainer_fsdp2", str(tmp_path), str(model_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["plan"] == ranks[1]["plan"]
    plan = LoraPlan.from_dict(ranks[0]["plan"])
    for facts in ranks:
        assert facts["fsdp"] and facts["fsdp_version"] == 2 and facts["model_class"].startswith("FSDP")
        assert facts["layers"] == plan.adapted_layers and facts["global_step"] == 2
        assert facts["truncation"] == {"active": True, "layers": list(range(min(plan.adapted_layers)))}
    assert LoraPlan.load(tmp_path / "run" / "loraplan.json") == plan
    weights = _adapter(tmp_path / "run")
    assert sorted({int(k.split(".layers.")[1].split(".")[0]) for k in weights}) == plan.adapted_layers
