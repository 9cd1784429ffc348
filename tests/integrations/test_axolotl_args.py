"""The `loraplan:` block's pydantic model (no Axolotl needed): generated from PlanConfig, validated by it."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from loraplan import PlanConfig
from loraplan.integrations.axolotl.args import LoraPlanArgs, LoraPlanAxolotlConfig


def test_fields_and_defaults_come_from_plan_config():
    fields = LoraPlanAxolotlConfig.model_fields
    for f in dataclasses.fields(PlanConfig):
        assert f.name in fields
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert fields[f.name].get_default(call_default_factory=True) == default
        assert fields[f.name].description, f"{f.name} has no description"
    assert set(fields) - {f.name for f in dataclasses.fields(PlanConfig)} == {"plan_path", "truncate_backward"}


def test_block_builds_the_core_config():
    args = LoraPlanArgs(loraplan={"selector": "activation", "ratio": 0.25, "share": "angular", "plan_path": "p.json"})
    assert args.loraplan.plan_config() == PlanConfig(selector="activation", ratio=0.25, share="angular")
    assert args.loraplan.plan_path == "p.json"
    assert args.loraplan.truncate_backward is None  # unset: the plugin truncates (apply_plan's default)
    assert LoraPlanArgs(loraplan={}).loraplan.plan_config() == PlanConfig()
    off = LoraPlanArgs(loraplan={"truncate_backward": False}).loraplan
    assert off.truncate_backward is False and off.plan_config() == PlanConfig()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"ratoi": 0.5}, r"`ratoi` \(did you mean `ratio`\?\).*also takes `plan_path`"),
        ({"ratio": 0}, r"`ratio` must be a number in \(0, 1\], got 0"),
        ({"share_threshold": "high"}, r"`share_threshold` must be a number"),
        ("cka", r"`loraplan` must be a mapping of settings"),
        (None, r"no `loraplan:` block.*`loraplan: \{\}` for the defaults \(selector=cka, ratio=0.5, share=None\)"),
    ],
    ids=["misspelt-key", "out-of-range", "wrong-type", "not-a-mapping", "missing-block"],
)
def test_bad_blocks_name_the_key(block, message):
    with pytest.raises(ValidationError, match=message):
        LoraPlanArgs(loraplan=block)
