"""The saved adapter says how it was made: a loraplan section in the PEFT model card and the `loraplan` tag."""

from __future__ import annotations

import copy

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

from loraplan import PlanConfig, apply_plan, load_adapter, make_plan, save_adapter
from loraplan.card import BEGIN, END, card_section, lora_parameters
from loraplan.report import parameter_count

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def planned(pm, make_llama, make_batches):
    config = PlanConfig(selector="top", count=4, share="odd_even", rank_policy="budget", calibration_samples=8)
    plan = make_plan(make_llama(layers=6), make_batches(), config, plugin_manager=pm, lora_rank=4, progress=False)
    model = apply_plan(get_peft_model(make_llama(layers=6, seed=0), LoraConfig(r=4, target_modules=TARGETS)), plan)
    return plan, model


def test_lora_parameters_count_a_shared_module_once(planned):
    plan, model = planned
    attention = model.get_base_model().model.layers[0].self_attn
    per_layer = sum(plan.rank * (m.in_features + m.out_features) for m in (attention.q_proj, attention.v_proj))
    assert plan.share_groups == [[2, 3], [4, 5]] and plan.num_modules() == 2
    assert lora_parameters(model, "default") == plan.num_modules() * per_layer
    assert lora_parameters(model, "other") == 0


def test_save_adapter_writes_the_section_and_the_tag_and_stock_peft_still_loads_it(planned, make_llama, tmp_path):
    plan, model = planned
    save_adapter(model, tmp_path / "a")
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert {"loraplan", "lora"} <= set(card.data.tags) and card.data.library_name == "peft"
    assert card.text.count(BEGIN) == 1 and card.text.count(END) == 1
    section = card.text[card.text.index(BEGIN) : card.text.index(END)]
    assert "selector `top` (count 4), sharer `odd_even`" in section
    assert "**Layers with LoRA**: 4 of 6 (`model.layers.{2-5}`)" in section
    assert "**Share groups** (one LoRA module per target module for each group): 2-3; 4-5" in section
    assert f"**Rank**: r={plan.rank} (rank policy `budget`)" in section
    count = parameter_count(plan)
    assert f"{count.plan:,} planned against {count.all_layers:,}" in section
    assert f"**In this adapter**: {lora_parameters(model, 'default'):,} distinct LoRA parameters" in section
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        stock = PeftModel.from_pretrained(make_llama(layers=6, seed=0), tmp_path / "a")
        torch.testing.assert_close(stock(input_ids=ids).logits, expected)


def test_every_save_pretrained_replaces_the_section_and_keeps_the_rest(planned, tmp_path):
    plan, model = planned
    model.save_pretrained(tmp_path / "b")
    readme = tmp_path / "b" / "README.md"
    readme.write_text(readme.read_text() + "\nNotes the user wrote.\n")
    copy.deepcopy(model).save_pretrained(tmp_path / "b")
    text = readme.read_text()
    assert text.count(BEGIN) == 1 and "Notes the user wrote." in text and "Layers with LoRA" in text


def test_a_loaded_adapter_keeps_writing_the_section(planned, make_llama, tmp_path):
    plan, model = planned
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(make_llama(layers=6, seed=0), tmp_path / "a")
    loaded.save_pretrained(tmp_path / "again")
    assert BEGIN in (tmp_path / "again" / "README.md").read_text()
    assert "loraplan" in loaded.get_base_model().model_tags


def test_the_section_of_a_plan_without_sharing_or_known_rank(pm, make_llama, make_batches):
    plan = make_plan(
        make_llama(layers=6),
        make_batches(),
        PlanConfig(selector="bottom", ratio=0.5, calibration_samples=8),
        plugin_manager=pm,
        progress=False,
    )
    section = card_section(plan)
    assert section.startswith(BEGIN) and section.endswith(END)
    assert "selector `bottom` (ratio 0.5), no sharing" in section and "**Share groups** (" in section
    assert ": none" in section and "the LoRA config's r" in section and "In this adapter" not in section


def test_the_section_names_the_shared_rest_and_the_per_layer_ranks(pm, make_llama, make_batches):
    config = PlanConfig(
        selector="top",
        ratio=0.5,
        share="lora_drop",
        rank_policy="importance",
        target_modules=TARGETS,
        calibration_samples=8,
    )
    plan = make_plan(make_llama(layers=6), make_batches(), config, plugin_manager=pm, lora_rank=4, progress=False)
    model = apply_plan(get_peft_model(make_llama(layers=6, seed=0), LoraConfig(r=4, target_modules=TARGETS)), plan)
    section = card_section(plan, lora_parameters(model, "default"))
    assert plan.shared_rest == [0, 1, 2] and plan.selected_layers == [3, 4, 5]
    assert plan.rank_pattern == {3: 3, 4: 4, 5: 5}  # 12 rank units over importance 3:4:5 (the `top` baseline's)
    assert "**Layers with LoRA**: 6 of 6 (`model.layers.{0-5}`), of which 0-2 through one shared module set" in section
    assert "per layer " + ", ".join(f"{i}: {r}" for i, r in sorted(plan.rank_pattern.items())) in section
    # four module sets: the three selected layers at their ranks, the rest at r=4, each counted once
    attention = model.get_base_model().model.layers[0].self_attn
    per_rank = sum(m.in_features + m.out_features for m in (attention.q_proj, attention.v_proj))
    assert lora_parameters(model, "default") == (sum(plan.rank_pattern.values()) + 4) * per_rank
    assert parameter_count(plan).plan == lora_parameters(model, "default")
