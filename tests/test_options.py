"""One source for every option: each PlanConfig setting reaches the CLI, the Axolotl `loraplan:` block and the TRL
recipe's `loraplan:` section, each described with the field's own help text."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from loraplan import PlanConfig
from loraplan.cli import _parser, plan_settings
from loraplan.config import TRUNCATE_BACKWARD_HELP, settings

REPO = Path(__file__).resolve().parents[1]

#: a valid value other than the default for every setting, and how it is written on the command line
SAMPLES = {
    "selector": ("activation", ["--selector", "activation"]),
    "ratio": (0.25, ["--ratio", "0.25"]),
    "count": (2, ["--count", "2"]),
    "cumulative": (0.9, ["--cumulative", "0.9"]),
    "share": ("angular", ["--share", "angular"]),
    "share_threshold": (0.8, ["--share-threshold", "0.8"]),
    "rank_policy": (4, ["--rank-policy", "4"]),
    "min_rank": (4, ["--min-rank", "4"]),
    "rank_multiple": (8, ["--rank-multiple", "8"]),
    "max_rank": (32, ["--max-rank", "32"]),
    "calibration_samples": (16, ["--samples", "16"]),
    "max_length": (64, ["--max-length", "64"]),
    "batch_size": (4, ["--batch-size", "4"]),
    "seed": (3, ["--seed", "3"]),
    "target_modules": (["q_proj", "v_proj"], ["--target-modules", "q_proj,v_proj"]),
    "text_field": ("review", ["--text-field", "review"]),
    "target_field": ("summary", ["--target-field", "summary"]),
    "image_field": ("picture", ["--image-field", "picture"]),
    "pooling": ("first", ["--pooling", "first"]),
    "last_token": ("reference", ["--last-token", "reference"]),
    "debiased": (True, ["--debiased"]),
    "stability": (False, ["--no-stability"]),
    "time_budget": (0.6, ["--time-budget", "0.6"]),
    "param_budget": (0.5, ["--param-budget", "0.5"]),
    "lora_drop_steps": (3, ["--lora-drop-steps", "3"]),
    "cost_model": ("timed", ["--cost-model", "timed"]),
    "cost_checkpointing": (False, ["--no-checkpointing"]),
    "cost_shape": ([2, 32], ["--cost-shape", "2x32"]),
    "stacks": (
        {"encoder": {"selector": "top", "count": 2}, "decoder": {"selector": "all"}},
        ["--stacks", "encoder.selector=top", "--stacks", "encoder.count=2", "--stacks", "decoder.selector=all"],
    ),
    "options": ({"window": 4, "mode": "fast"}, ["--options", "window=4", "--options", "mode=fast"]),
}


def _words(text: str) -> str:
    return " ".join(text.split())


def test_every_setting_has_a_sample_and_a_description():
    names = [f.name for f in dataclasses.fields(PlanConfig)]
    assert sorted(SAMPLES) == sorted(names), "a new PlanConfig setting needs a sample value here"
    for item in settings():
        assert item.help and item.help == PlanConfig.__dataclass_fields__[item.name].metadata["help"]
        assert _words(item.help) in _words(PlanConfig.__doc__), f"{item.name} is missing from the generated Args"
        assert PlanConfig(**{item.name: SAMPLES[item.name][0]}) != PlanConfig()


@pytest.mark.parametrize("name", list(SAMPLES))
def test_the_cli_takes_every_setting_with_its_help(name):
    value, flags = SAMPLES[name]
    args = _parser().parse_args(["analyze", "model", "--data", "d.jsonl", *flags])
    assert plan_settings(args) == {name: value}
    assert PlanConfig.from_dict(plan_settings(args)) == PlanConfig(**{name: value})
    analyze = next(a for a in _parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("analyze"))
    helps = [a.help for a in analyze._actions if a.dest == name and a.help]
    described = next(s for s in settings() if s.name == name).help
    assert any(_words(described) in _words(h.replace("%%", "%")) for h in helps)


def test_absent_flags_leave_every_default_to_plan_config():
    args = _parser().parse_args(["analyze", "model", "--data", "d.jsonl"])
    assert plan_settings(args) == {} and PlanConfig.from_dict(plan_settings(args)) == PlanConfig()


def test_a_bad_value_on_the_command_line_is_refused_by_plan_config(capsys):
    from loraplan.cli import main

    assert main(["analyze", str(REPO), "--data", "d.jsonl", "--ratio", "1.5"]) == 2
    assert "`ratio` must be a number in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(Exception, match="`--options` takes KEY=VALUE, got 'window'"):
        plan_settings(_parser().parse_args(["analyze", "m", "--data", "d", "--options", "window"]))


@pytest.mark.parametrize("name", list(SAMPLES))
def test_the_axolotl_block_takes_every_setting_with_its_help(name):
    from loraplan.integrations.axolotl.args import LoraPlanAxolotlConfig

    value = SAMPLES[name][0]
    block = LoraPlanAxolotlConfig.model_validate({name: value})
    assert block.plan_config() == PlanConfig(**{name: value})
    assert (
        LoraPlanAxolotlConfig.model_fields[name].description == PlanConfig.__dataclass_fields__[name].metadata["help"]
    )
    assert LoraPlanAxolotlConfig.model_fields["truncate_backward"].description == TRUNCATE_BACKWARD_HELP


@pytest.mark.parametrize("name", list(SAMPLES))
def test_the_trl_recipe_takes_every_setting_with_its_help(name, tmp_path, script):
    import yaml

    recipe = script(REPO / "recipes" / "trl_sft.py", "recipes_trl_sft_options")
    config = tmp_path / "run.yaml"
    config.write_text("model: {name_or_path: packaged:smollm2}\nlora: {r: 4}\nloraplan: {}\n")
    value = SAMPLES[name][0]
    loaded = recipe.load_config(config, [f"loraplan.{name}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    assert PlanConfig.from_dict(loaded["loraplan"]) == PlanConfig(**{name: value})
    section = _words(recipe.loraplan_section_help())
    described = next(s for s in settings() if s.name == name).help
    assert re.search(rf"\b{name} \(default: ", section) and _words(described) in section
    assert _words(TRUNCATE_BACKWARD_HELP) in section


def test_the_help_names_every_built_in_choice(pm):
    """The one description of `selector`, `share` and `rank_policy` (and so the CLI, the Axolotl field and the
    docstring built from it) names every built-in strategy and rank policy."""
    from loraplan.config import RANK_POLICIES
    from loraplan.hooks import selectors, sharers

    helps = {item.name: item.help for item in settings()}
    assert all(f"`{name}`" in helps["selector"] for name in selectors(pm)), helps["selector"]
    assert all(f"`{name}`" in helps["share"] for name in sharers(pm)), helps["share"]
    assert all(f'`"{policy}"`' in helps["rank_policy"] for policy in RANK_POLICIES), helps["rank_policy"]
    shown = " ".join(_parser()._subparsers._group_actions[0].choices["analyze"].format_help().split())
    assert "`lora_drop`" in shown and '`"importance"` per-' in shown
