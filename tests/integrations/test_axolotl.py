"""LoraPlanPlugin in the real Axolotl 0.21.0, which lives in its own venv (``make test-axolotl`` builds it).

Training runs go through Axolotl's Python entry point in that venv (tests/integrations/axolotl_driver.py, the
steps ``axolotl train`` takes) on the tiny CPU recipe; bad configs go through the ``axolotl.cli.train`` CLI.
Point LORAPLAN_AXOLOTL_PYTHON at the venv's python if it is not ``.venv-axolotl/bin/python``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from loraplan import LoraPlan
from loraplan.layout import stack_exclusion

pytestmark = pytest.mark.axolotl

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("axolotl_driver.py")
TINY = REPO / "recipes" / "axolotl" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def axolotl_python() -> str:
    python = Path(os.environ.get("LORAPLAN_AXOLOTL_PYTHON", REPO / ".venv-axolotl" / "bin" / "python"))
    if not python.is_file():
        pytest.fail(
            f"no Axolotl venv at {python}: run `make test-axolotl` (it builds .venv-axolotl) or set "
            "LORAPLAN_AXOLOTL_PYTHON to the python of a venv with axolotl 0.21.0."
        )
    return str(python)


def run(python: str, args: list, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run([python, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_config(tiny_dir: Path, work: Path, **changes) -> Path:
    """recipes/axolotl/tiny_cpu.yaml with its paths pointed at the test's files, plus ``changes``."""
    config = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    config["base_model"] = str(tiny_dir / "model")
    config["datasets"][0]["path"] = str(tiny_dir / "fine_foods_train.jsonl")
    config["dataset_prepared_path"] = str(work / "prepared")
    config["output_dir"] = str(work / "out")
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = work / "config.yml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def train(python: str, config: Path, work: Path) -> tuple[dict, str]:
    done = run(python, [DRIVER, "train", config, work / "report.json"], cwd=work)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return json.loads((work / "report.json").read_text()), output


def assert_ties(report: dict, plan: LoraPlan) -> None:
    assert sorted(int(i) for i in report["layers"]) == plan.adapted_layers
    assert plan.share_groups
    for group in plan.share_groups:
        lead = report["layers"][str(group[0])]
        for member in group[1:]:
            modules = report["layers"][str(member)]
            assert modules.keys() == lead.keys()
            for name, ids in modules.items():
                assert ids["lora_A_id"] == lead[name]["lora_A_id"] and ids["lora_B_id"] == lead[name]["lora_B_id"]
                assert ids["lora_A_data_ptr"] == lead[name]["lora_A_data_ptr"]
                assert ids["lora_B_data_ptr"] == lead[name]["lora_B_data_ptr"]
        assert any(ids["lora_B_absmax"] > 0 for ids in lead.values()), "the shared modules did not train"


@pytest.fixture(scope="module")
def first_run(axolotl_python, tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("axolotl")
    # reentrant asked for on purpose: sharing must switch it; TensorBoard on to see the plan reach the trackers
    config = tiny_config(tiny_dir, work, gradient_checkpointing_kwargs={"use_reentrant": True}, use_tensorboard=True)
    report, output = train(axolotl_python, config, work)
    return work, report, output


def test_two_steps_with_the_loraplan_block(first_run, model_dir, checks):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work, report, output = first_run
    out = work / "out"
    plan = LoraPlan.load(out / "loraplan.json")
    assert plan.config["selector"] == "cka" and plan.config["share"] == "angular"
    # LoRA on the configured targets of the planned layers only, and the saved config alone says so
    planned = {
        f"model.layers.{i}.{m}"
        for i in plan.selected_layers
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert set(report["sites"]) == planned and set(report["sites"].values()) == {4}
    assert report["config_sites"] == report["sites"]
    assert report["saved_exclude_modules"] == stack_exclusion(plan)
    assert "`gradient_checkpointing_kwargs.use_reentrant` was True; set to false" in output
    assert "loraplan calibration" in output and "computed from the calibration data" in output
    assert report["gradient_checkpointing_kwargs"]["use_reentrant"] is False
    assert report["checkpointing"] == ["{'use_reentrant': False}"]
    assert report["global_step"] == 2 and all(math.isfinite(loss) for _, loss in report["losses"])
    assert_ties(report, plan)
    assert report["stock_reload_class"].startswith("peft.")
    assert report["stock_reload_layers"] == plan.selected_layers
    assert report["stock_reload_max_abs_diff"] < 1e-5
    for step in (1, 2):
        assert LoraPlan.load(out / f"checkpoint-{step}" / "loraplan.json") == plan
    # and stock PEFT of the main venv (newer transformers) reads the adapter too
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out))
    assert checks.lora_layers(fresh) == plan.selected_layers
    # use_tensorboard: the plugin's LoraPlanCallback put the plan in the trainer's TensorBoard event file (no figure
    # is asserted: the Axolotl venv has no matplotlib, and the figure is then left out without an error)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = out.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert {"loraplan/layers/text_summary", "loraplan/plan/text_summary"} <= set(tags["tensors"])
    assert {"loraplan/lora_parameter_ratio", "loraplan/predicted_step_time_ratio"} <= set(tags["scalars"])


def test_resume_reuses_plan_and_reties(first_run, axolotl_python, tiny_dir, tmp_path):
    work, first, _ = first_run
    shutil.copytree(work / "out", tmp_path / "out")
    saved = (tmp_path / "out" / "loraplan.json").read_bytes()
    config = tiny_config(tiny_dir, tmp_path, max_steps=4, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    report, output = train(axolotl_python, config, tmp_path)
    assert (tmp_path / "out" / "loraplan.json").read_bytes() == saved
    assert "not recomputed" in output and "loraplan calibration" not in output
    assert f"resumed from {tmp_path / 'out' / 'checkpoint-2'}" in output
    assert report["global_step"] == 4
    assert [s for s, _ in report["losses"]] == [1, 2, 3, 4] and report["losses"][:2] == first["losses"]
    assert_ties(report, LoraPlan.load(tmp_path / "out" / "loraplan.json"))


def test_all_linear_with_per_module_ranks_and_the_budget_rank(axolotl_python, tiny_dir, tmp_path):
    # lora_target_linear and lora_rank_pattern reach PEFT as the user wrote them; the plan narrows the layers and its
    # budget rule scales every rank (two planned layers in one group: doubled)
    config = tiny_config(
        tiny_dir,
        tmp_path,
        lora_target_modules=None,
        lora_target_linear=True,
        lora_rank_pattern={"v_proj": 8},
        loraplan={
            "selector": "cka",
            "ratio": 0.5,
            "share": "angular",
            "share_threshold": 0.0,
            "rank_policy": "budget",
            "calibration_samples": 16,
            "max_length": 64,
            "last_token": "reference",
        },
    )
    report, _ = train(axolotl_python, config, tmp_path)
    plan = LoraPlan.load(tmp_path / "out" / "loraplan.json")
    assert len(plan.selected_layers) == 2 and plan.share_groups == [plan.selected_layers] and plan.rank == 8
    names = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    assert report["sites"] == {
        f"model.layers.{i}.{m}": 16 if m.endswith("v_proj") else 8 for i in plan.selected_layers for m in names
    }
    assert report["config_sites"] == report["sites"]
    assert report["stock_reload_max_abs_diff"] < 1e-5
    assert_ties(report, plan)


def test_shared_rest_and_per_layer_ranks(axolotl_python, tiny_dir, tmp_path):
    # LoRA-drop's shared rest beside ranks from CKA importance: the selected layers at their planned ranks, every
    # other layer through one shared module set at lora_r
    config = tiny_config(
        tiny_dir,
        tmp_path,
        loraplan={
            "selector": "cka",
            "ratio": 0.5,
            "share": "lora_drop",
            "rank_policy": "importance",
            "rank_multiple": 2,
            "calibration_samples": 16,
            "max_length": 64,
            "last_token": "reference",
        },
    )
    report, _ = train(axolotl_python, config, tmp_path)
    plan = LoraPlan.load(tmp_path / "out" / "loraplan.json")
    r = yaml.safe_load(config.read_text())["lora_r"]
    assert plan.shared_rest and plan.adapted_layers == list(range(plan.num_layers))
    assert sum(plan.rank_pattern.values()) <= len(plan.selected_layers) * r and set(plan.rank_pattern) == set(
        plan.selected_layers
    )
    targets = yaml.safe_load(config.read_text())["lora_target_modules"]
    expected = {}
    for name in report["sites"]:
        layer = int(name.split(".")[2])
        assert name.rsplit(".", 1)[-1] in targets
        expected[name] = plan.rank_pattern.get(layer, r)
    assert report["sites"] == expected and {int(n.split(".")[2]) for n in expected} == set(plan.adapted_layers)
    assert report["config_sites"] == report["sites"]
    assert report["stock_reload_max_abs_diff"] < 1e-5
    assert_ties(report, plan)


def cli_failure(python: str, config: Path, cwd: Path) -> str:
    done = run(python, ["-m", "axolotl.cli.train", config], cwd=cwd)
    assert done.returncode != 0
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    ("changes", "quantization"),
    [({"adapter": "qlora", "load_in_4bit": True}, "4-bit nf4"), ({"load_in_8bit": True}, "8-bit")],
    ids=["qlora-4bit", "lora-8bit"],
)
def test_quantized_models_with_the_loraplan_block(changes, quantization, axolotl_python, tiny_dir, tmp_path):
    # Axolotl's single-GPU default, on the CPU: `adapter: qlora`, `load_in_4bit: true` (bitsandbytes NF4, double
    # quantization), and 8-bit LoRA; the plan is made on the quantized model and no 4-bit weight changes through
    # training and saving
    config = tiny_config(tiny_dir, tmp_path, **changes)
    report, output = train(axolotl_python, config, tmp_path)
    plan = LoraPlan.load(tmp_path / "out" / "loraplan.json")
    assert plan.calibration["quantization"] == quantization
    assert report["quantized_weights"] == 28  # every linear of the 4 layers, 4-bit or 8-bit, digested and compared
    assert report["quantized_weights_changed"] == []
    assert sorted({int(site.split(".")[2]) for site in report["sites"]}) == plan.adapted_layers
    assert report["config_sites"] == report["sites"]
    assert report["global_step"] == 2 and all(math.isfinite(loss) for _, loss in report["losses"])
    assert_ties(report, plan)
    assert report["stock_reload_max_abs_diff"] == 0.0  # a fresh 4-bit load plus the saved adapter: the same logits


def test_misspelt_key_names_the_key(axolotl_python, tiny_dir, tmp_path):
    config = tiny_config(tiny_dir, tmp_path, loraplan={"selector": "cka", "ratoi": 0.5})
    output = cli_failure(axolotl_python, config, tmp_path)
    assert "`ratoi` (did you mean `ratio`?)" in output


def test_invalid_value_names_the_key_and_range(axolotl_python, tiny_dir, tmp_path):
    config = tiny_config(tiny_dir, tmp_path, loraplan={"ratio": 1.5})
    assert "`ratio` must be a number in (0, 1], got 1.5" in cli_failure(axolotl_python, config, tmp_path)


def test_plugin_without_block_is_an_error(axolotl_python, tiny_dir, tmp_path):
    config = tiny_config(tiny_dir, tmp_path, loraplan=None)
    output = cli_failure(axolotl_python, config, tmp_path)
    assert "no `loraplan:` block" in output and "`loraplan: {}`" in output


def test_custom_reentrant_offloading_with_sharing_is_refused(axolotl_python, tiny_dir, tmp_path):
    config = tiny_config(tiny_dir, tmp_path, activation_offloading="legacy")
    output = cli_failure(axolotl_python, config, tmp_path)
    assert "`activation_offloading: legacy`" in output and "cannot train shared LoRA modules" in output


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "`share` is 'angular': under FSDP2 every decoder layer is its own fully_shard unit"),
        ({"share": None, "state_dict_type": "SHARDED_STATE_DICT"}, "`fsdp_state_dict_type` is SHARDED_STATE_DICT"),
    ],
    ids=["sharing", "sharded-state-dict"],  # fsdp_version 1: Axolotl 0.21 itself refuses it
)
def test_what_fsdp_cannot_train_is_refused_before_the_model_loads(changes, message, axolotl_python, tiny_dir, tmp_path):
    # Axolotl's fsdp_config: loraplan refuses what FSDP2 cannot keep exact before any weight loads (Axolotl's FSDP
    # itself needs GPUs: accelerate sets FSDP up only on accelerators)
    fsdp = {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
    if "state_dict_type" in changes:
        fsdp["state_dict_type"] = changes["state_dict_type"]
    block = yaml.safe_load(TINY.read_text(encoding="utf-8"))["loraplan"]
    if "share" in changes:
        block["share"] = changes["share"]
    config = tiny_config(tiny_dir, tmp_path, fsdp_config=fsdp, fsdp_version=2, loraplan=block)
    output = cli_failure(axolotl_python, config, tmp_path)
    assert message in output and "loraplan calibration" not in output


def test_every_axolotl_recipe_validates(axolotl_python, tmp_path):
    recipes = sorted((REPO / "recipes" / "axolotl").glob("*.yaml"))
    done = run(axolotl_python, [DRIVER, "validate", *recipes], cwd=REPO)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    checked = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [Path(c["config"]).name for c in checked] == [p.name for p in recipes]
    for entry in checked:
        assert entry["loraplan"]["selector"] in ("cka", "all")
