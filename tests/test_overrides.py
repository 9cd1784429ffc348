"""Dotted overrides for the YAML configs of the recipes and the benchmarks."""

from __future__ import annotations

import pytest

from loraplan.overrides import apply_overrides, load_yaml


def test_values_are_parsed_as_yaml_and_sections_created(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 2\n")
    config = load_yaml(path, ["training.max_steps=5", "seeds=[0, 1]", "loraplan.share=null", "lora.r=8"])
    assert config == {"training": {"max_steps": 5}, "seeds": [0, 1], "loraplan": {"share": None}, "lora": {"r": 8}}


@pytest.mark.parametrize(
    ("override", "message"),
    [("training.max_steps", "must look like section.key=value"), ("training.max_steps.x=1", "not a section")],
)
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(SystemExit, match=message):
        apply_overrides({"training": {"max_steps": 2}}, [override])


def test_a_top_level_list_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit, match="expected a YAML mapping"):
        load_yaml(path)
