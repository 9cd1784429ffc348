"""Every recipe loads and validates; the tiny CPU TRL recipe runs 2 steps as users launch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplan import ConfigError, LoraPlan

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
TRL_CONFIGS = sorted((RECIPES / "configs" / "trl").glob("*.yaml"))
ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))
DEEPSPEED = sorted((RECIPES / "deepspeed").glob("*.json"))
AXOLOTL = sorted((RECIPES / "axolotl").glob("*.yaml"))
ALL_YAML = TRL_CONFIGS + ACCELERATE + AXOLOTL


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", ALL_YAML, ids=rel)
def test_yaml_recipes_have_a_torchtune_style_header(path):
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lower())
    text = "\n".join(header)
    assert header, f"{rel(path)} has no header comment"
    assert "to launch" in text, "the header says how to launch"
    assert "override" in text, "the header says how to override values"
    assert "hardware" in text, "the header says what hardware it needs"


@pytest.mark.parametrize("path", TRL_CONFIGS, ids=rel)
def test_trl_configs_validate(path, checks):
    recipe = checks.recipe("trl_sft")
    config = recipe.load_config(path)
    assert config["loraplan"] and config["lora"] and config["training"]["output_dir"]


def test_trl_config_overrides_are_checked(checks):
    recipe = checks.recipe("trl_sft")
    tiny = RECIPES / "configs" / "trl" / "tiny_cpu.yaml"
    assert recipe.load_config(tiny, ["loraplan.ratio=0.25", "training.max_steps=3"])["loraplan"]["ratio"] == 0.25
    with pytest.raises(ConfigError, match=r"`ratoi` \(did you mean `ratio`\?\)"):
        recipe.load_config(tiny, ["loraplan.ratoi=0.25"])
    with pytest.raises(SystemExit, match="max_stepz"):
        recipe.load_config(tiny, ["training.max_stepz=3"])


@pytest.mark.parametrize("path", ACCELERATE, ids=rel)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    if config.distributed_type.value == "DEEPSPEED":
        ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file()
        assert config.deepspeed_config["zero3_init_flag"] is True


@pytest.mark.parametrize("path", DEEPSPEED, ids=rel)
def test_deepspeed_configs_fill_their_auto_values(path, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import LlamaConfig, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    raw = json.loads(path.read_text(encoding="utf-8"))
    assert "auto" in json.dumps(raw), "HF recipes leave batch sizes and buckets to the Trainer ('auto')"
    hf = HfTrainerDeepSpeedConfig(str(path))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        report_to=[],
        use_cpu=True,
    )
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, type("Model", (), {"config": LlamaConfig(hidden_size=64)})(), 100)
    assert "auto" not in json.dumps(hf.config)
    ds = DeepSpeedConfig(hf.config)
    assert ds.zero_optimization_stage == int(path.stem[-1])
    assert ds.train_batch_size == 8


def test_readme_lists_every_recipe():
    readme = (RECIPES / "README.md").read_text(encoding="utf-8")
    files = [p for p in RECIPES.rglob("*") if p.is_file() and p.name != "README.md" and "__pycache__" not in p.parts]
    missing = [str(p.relative_to(RECIPES)) for p in files if str(p.relative_to(RECIPES)) not in readme]
    assert not missing, f"recipes/README.md does not list {missing}"
    assert not (RECIPES / "__init__.py").exists(), "recipes/ is not a package"


def test_tiny_cpu_trl_recipe_runs_two_steps(tmp_path, checks):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [
            sys.executable,
            "recipes/trl_sft.py",
            "--config",
            "recipes/configs/trl/tiny_cpu.yaml",
            "--report",
            str(tmp_path / "report.json"),
            f"training.output_dir={out}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.rank0.json").read_text())
    plan = LoraPlan.from_dict(report["plan"])
    assert report["global_step"] == 2 and len(report["losses"]) == 2
    assert LoraPlan.load(out / "loraplan.json") == plan
    assert sorted(int(i) for i, mods in report["layers"].items() if mods) == plan.selected_layers
    for group in plan.share_groups:
        lead = report["layers"][str(group[0])]
        for member in group[1:]:
            for name, ids in report["layers"][str(member)].items():
                assert ids["lora_A_id"] == lead[name]["lora_A_id"]
                assert ids["lora_B_data_ptr"] == lead[name]["lora_B_data_ptr"]
    # the final adapter: stock PEFT loads it; the shared layers' saved copies are equal and trained
    weights = load_file(out / "adapter_model.safetensors")
    group = plan.share_groups[0]
    for key, tensor in weights.items():
        if f".layers.{group[0]}." in key and "lora_B" in key:
            twin = weights[key.replace(f".layers.{group[0]}.", f".layers.{group[1]}.")]
            assert bool((twin == tensor).all()) and float(tensor.abs().max()) > 0
    base_dir = checks.recipe("trl_sft").tiny_model(
        checks.recipe("trl_sft").load_config(RECIPES / "configs/trl/tiny_cpu.yaml")["model"]["tiny"],
        checks.recipe("trl_sft").resolve_path("packaged:smollm2"),
    )
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out))
    assert checks.lora_layers(fresh) == plan.selected_layers
