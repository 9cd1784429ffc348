"""Realising a plan with real PEFT: LoraConfig, narrowing, tying, saving, stock loading, LoRA variants."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraplan import LoraPlan, PlanConfig, apply_plan, hookimpl, load_adapter, make_plan, save_adapter
from loraplan.apply import OUTSIDE_NOTE, lora_modules_by_layer
from loraplan.errors import ConfigError, PlanMismatchError
from loraplan.layout import stack_exclusion

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _plan(make_llama, make_batches, pm, **cfg):
    settings = dict(selector="cka", share="angular", share_threshold=0.5, calibration_samples=16)
    settings.update(cfg)
    return make_plan(make_llama(layers=6), make_batches(), PlanConfig(**settings), plugin_manager=pm, progress=False)


def _lora_layers(model) -> set[int]:
    found = set()
    for name, _ in model.named_modules():
        m = re.search(r"\.layers\.(\d+)\..*lora_A$", name)
        if m:
            found.add(int(m.group(1)))
    return found


def test_to_lora_config_realises_the_selection(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, share=None)
    base = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    cfg = plan.to_lora_config(base)
    assert cfg is not base and base.exclude_modules is None and base.layers_to_transform is None
    # the user's targets stay; the stack's container and its unplanned layers are excluded
    # (never layers_to_transform=[])
    assert cfg.target_modules == base.target_modules and cfg.layers_to_transform is None
    assert cfg.exclude_modules == stack_exclusion(plan) == r"model\.layers(?:\.(?:0|1|2)(?:\..*)?)?"
    assert cfg.r == 4
    model = get_peft_model(make_llama(layers=6), cfg)
    assert _lora_layers(model) == set(plan.selected_layers)
    assert plan.to_lora_config(cfg) == cfg  # a config made for the plan is its own result


def test_all_linear_gives_every_linear_module_of_the_planned_layers(pm, make_llama, make_batches):
    # calibrated on q/v only: the plan's targets decide what is scored, the LoraConfig's what gets LoRA
    plan = _plan(make_llama, make_batches, pm, share=None, selector="top", target_modules=["q_proj", "v_proj"])
    cfg = plan.to_lora_config(LoraConfig(r=2, target_modules="all-linear"))
    model = get_peft_model(make_llama(layers=6), cfg)
    adapted = [n for n, _ in model.named_modules(remove_duplicate=False) if n.endswith(".lora_A")]
    assert len(adapted) == 3 * 7  # seven linear modules in each of the three planned layers
    assert _lora_layers(model) == {3, 4, 5}
    assert not any("lm_head.lora" in n for n, _ in model.named_modules())


def test_a_regex_target_is_narrowed_not_replaced(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, share=None, selector="bottom")
    cfg = plan.to_lora_config(LoraConfig(r=2, target_modules=r".*\.(q_proj|v_proj)"))
    assert cfg.target_modules == r".*\.(q_proj|v_proj)" and cfg.layers_to_transform is None
    model = get_peft_model(make_llama(layers=6), cfg)
    assert _lora_layers(model) == {0, 1, 2}
    names = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert names == {"q_proj", "v_proj"}


def test_a_vision_tower_keeps_the_lora_its_config_gives_it(pm, make_batches, caplog):
    import transformers as tf

    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4, image_size=32, patch_size=8
    )
    text = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=101,
    )

    def build():
        return tf.LlavaForConditionalGeneration(
            tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=100)
        )

    plan = make_plan(
        build(), make_batches(), PlanConfig(selector="top", calibration_samples=8), plugin_manager=pm, progress=False
    )
    assert plan.stack["ambiguous"] and plan.selected_layers == [2, 3]
    # PEFT's layers_to_transform would also hit the vision tower's layers 2 and 3 (it has q_proj too); the exclusion
    # names the language model's layers by their full path
    cfg = plan.to_lora_config(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(build(), cfg)
    adapted = sorted({n.split(".lora_A")[0] for n, _ in model.named_modules() if n.endswith("lora_A")})
    language = [n for n in adapted if ".language_model.layers." in n]
    tower = [n for n in adapted if ".vision_tower." in n]
    assert {int(re.search(r"layers\.(\d+)", n).group(1)) for n in language} == {2, 3}
    assert len(tower) == 4 * 2 and len(adapted) == len(language) + len(tower)  # q and v of all 4 tower layers
    # the same through apply_plan, which says what it kept outside the stack
    with caplog.at_level(logging.INFO, logger="loraplan"):
        wrapped = apply_plan(get_peft_model(build(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), plan)
    assert sorted({n.split(".lora_A")[0] for n, _ in wrapped.named_modules() if n.endswith("lora_A")}) == adapted
    note = next(n for n in plan.notes if n.startswith(OUTSIDE_NOTE))
    assert "model.vision_tower.encoder.layers.{0-3}.self_attn.q_proj" in note
    assert any("outside the stack" in r.getMessage() and "vision_tower" in r.getMessage() for r in caplog.records)


def test_apply_plan_narrows_ties_and_trains_one_tensor(pm, make_llama, make_batches, train_steps):
    plan = _plan(make_llama, make_batches, pm)
    assert plan.share_groups, "the threshold must form groups for this test"
    model = get_peft_model(make_llama(layers=6), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    apply_plan(model, plan)
    assert _lora_layers(model) == set(plan.selected_layers)
    assert model.peft_config["default"].exclude_modules == stack_exclusion(plan)
    by_layer = lora_modules_by_layer(model)
    for group in plan.share_groups:
        for name in by_layer[group[0]]:
            for member in group[1:]:
                assert by_layer[member][name].lora_A["default"] is by_layer[group[0]][name].lora_A["default"]
                assert by_layer[member][name].lora_B["default"] is by_layer[group[0]][name].lora_B["default"]
    per_layer = 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert after == plan.num_modules() * per_layer < before
    lead, member = plan.share_groups[0][0], plan.share_groups[0][1]
    weight_before = by_layer[lead]["self_attn.q_proj"].lora_B["default"].weight.detach().clone()
    train_steps(model)
    by_layer = lora_modules_by_layer(model)
    a = by_layer[lead]["self_attn.q_proj"].lora_B["default"].weight
    b = by_layer[member]["self_attn.q_proj"].lora_B["default"].weight
    assert a.data_ptr() == b.data_ptr() and not torch.equal(a.detach(), weight_before)


def test_save_then_stock_peft_load_gives_the_same_logits_with_sharing(
    tmp_path, pm, make_llama, make_batches, train_steps, reloaded
):
    plan = _plan(make_llama, make_batches, pm)
    assert plan.share_groups
    model = get_peft_model(make_llama(layers=6, seed=0), LoraConfig(r=4, target_modules=TARGETS))
    apply_plan(model, plan)
    train_steps(model)
    stock, ours = reloaded(model, tmp_path / "adapter", lambda: make_llama(layers=6, seed=0), is_trainable=True)
    assert (tmp_path / "adapter" / "loraplan.json").is_file()
    assert LoraPlan.load(tmp_path / "adapter") == plan

    assert _lora_layers(stock) == set(plan.selected_layers)
    lead, member = plan.share_groups[0][:2]
    stock_layers = lora_modules_by_layer(stock)
    assert (
        stock_layers[member]["self_attn.q_proj"].lora_A["default"]
        is not stock_layers[lead]["self_attn.q_proj"].lora_A["default"]
    )

    our_layers = lora_modules_by_layer(ours)
    assert (
        our_layers[member]["self_attn.q_proj"].lora_A["default"]
        is our_layers[lead]["self_attn.q_proj"].lora_A["default"]
    )
    assert ours.loraplan_plan == plan


def test_loading_an_adapter_trained_untied_with_a_sharing_plan_is_refused(
    tmp_path, pm, make_llama, make_batches, train_steps
):
    plan = _plan(make_llama, make_batches, pm)
    model = get_peft_model(make_llama(layers=6), plan.to_lora_config(LoraConfig(r=4, target_modules=TARGETS)))
    train_steps(model)  # trained with stock PEFT: the group's copies drift apart
    save_adapter(model, tmp_path / "adapter", plan=plan)
    with pytest.raises(PlanMismatchError, match="was not trained with these groups tied"):
        load_adapter(make_llama(layers=6), tmp_path / "adapter")


def test_budget_rank_recreates_modules_at_the_raised_rank(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, rank_policy="budget")
    r = plan.resolve_rank(4)
    assert r > 4
    model = get_peft_model(make_llama(layers=6), LoraConfig(r=4, target_modules=TARGETS))
    apply_plan(model, plan)
    assert model.peft_config["default"].r == r
    for modules in lora_modules_by_layer(model).values():
        for module in modules.values():
            assert module.r["default"] == r and module.lora_A["default"].weight.shape[0] == r
            assert module.lora_A["default"].weight.requires_grad


@pytest.mark.parametrize(
    "variant",
    [dict(use_dora=True), dict(use_rslora=True), dict(init_lora_weights="pissa")],
    ids=["dora", "rslora", "pissa"],
)
def test_lora_variants_keep_the_function_and_the_ties(variant, tmp_path, pm, make_llama, make_batches, train_steps):
    plan = _plan(make_llama, make_batches, pm)
    reference = make_llama(layers=6, seed=0)
    model = get_peft_model(make_llama(layers=6, seed=0), LoraConfig(r=4, target_modules=TARGETS, **variant))
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        untouched = reference(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, untouched, rtol=1e-4, atol=1e-4)
    apply_plan(model, plan)
    with torch.no_grad():  # narrowing and tying (with the base-weight correction for PiSSA) keep the function
        torch.testing.assert_close(model(input_ids=ids).logits, untouched, rtol=1e-4, atol=1e-4)
    train_steps(model)
    by_layer = lora_modules_by_layer(model)
    lead, member = plan.share_groups[0][:2]
    assert by_layer[member]["mlp.down_proj"].lora_B["default"] is by_layer[lead]["mlp.down_proj"].lora_B["default"]
    if "use_dora" in variant:
        assert (
            by_layer[member]["mlp.down_proj"].lora_magnitude_vector["default"]
            is not by_layer[lead]["mlp.down_proj"].lora_magnitude_vector["default"]
        )


def test_loraplus_optimizer_with_tied_modules(pm, make_llama, make_batches):
    from peft.optimizers import create_loraplus_optimizer

    plan = _plan(make_llama, make_batches, pm)
    model = get_peft_model(make_llama(layers=6), LoraConfig(r=4, target_modules=TARGETS))
    apply_plan(model, plan)
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len({id(p) for p in params}) == len(params)  # each shared tensor once
    assert len(params) == len([p for p in model.parameters() if p.requires_grad])
    lrs = {group["lr"] for group in opt.param_groups if group["params"]}
    assert 1e-3 in lrs and 16e-3 in lrs
    ids = torch.randint(3, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def test_an_optimizer_built_before_apply_plan_is_refused_before_anything_changes(pm, make_llama, make_batches):
    # the budget rule raises the rank, so apply_plan re-creates the planned modules (and narrows and ties): an
    # optimizer over the wrapped model's parameters would hold none of the tensors that train afterwards
    plan = _plan(make_llama, make_batches, pm, rank_policy="budget", share_threshold=0.0)
    model = get_peft_model(make_llama(layers=6), LoraConfig(r=4, target_modules=TARGETS))
    before = {name: p for name, p in model.named_parameters()}
    config = model.peft_config["default"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(
        ConfigError, match=r"`optimizer`: an optimizer \(AdamW\) built before apply_plan holds"
    ) as caught:
        apply_plan(model, plan)
    assert "Nothing was changed" in str(caught.value) and "then build the optimizer" in str(caught.value)
    assert dict(model.named_parameters()) == before and model.peft_config["default"] is config
    del optimizer, caught  # the documented order: apply_plan first, then the optimizer
    apply_plan(model, plan)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    start = [p.detach().clone() for p in trainable]
    ids = torch.randint(3, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, q) for p, q in zip(trainable, start))  # every live LoRA tensor trains


def test_a_wrapper_built_around_the_model_before_apply_plan_is_refused(pm, make_llama, make_batches):
    # DataParallel, DDP, FSDP and a DeepSpeed engine take the parameters over: built first, they would train the old
    plan = _plan(make_llama, make_batches, pm, share_threshold=0.0)
    model = get_peft_model(make_llama(layers=6), LoraConfig(r=4, target_modules=TARGETS))
    before = dict(model.named_parameters())
    wrapper = torch.nn.DataParallel(model)  # on the CPU it just calls the model
    with pytest.raises(ConfigError, match=r"`model`: a DataParallel was built around the model before apply_plan"):
        apply_plan(model, plan)
    assert dict(model.named_parameters()) == before
    del wrapper
    apply_plan(model, plan)  # the documented order: the plan first, then the wrapper
    assert _lora_layers(model) == set(plan.adapted_layers)


def test_an_optimizer_over_parameters_apply_plan_keeps_is_no_reason_to_refuse(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, share=None)
    model = get_peft_model(make_llama(layers=6), plan.to_lora_config(LoraConfig(r=4, target_modules=TARGETS)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    apply_plan(model, plan)  # nothing to narrow, re-create or tie: the optimizer's parameters are the live ones
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_apply_plan_errors(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm)
    with pytest.raises(ConfigError, match="needs a PEFT LoRA model"):
        apply_plan(make_llama(layers=6), plan)
    with pytest.raises(PlanMismatchError, match="does not fit"):
        apply_plan(get_peft_model(make_llama(layers=4), LoraConfig(r=2, target_modules=TARGETS)), plan)
    narrowed = LoraConfig(r=2, target_modules=TARGETS, layers_to_transform=[0], layers_pattern="layers")
    with pytest.raises(PlanMismatchError, match="no LoRA module there"):
        apply_plan(get_peft_model(make_llama(layers=6), narrowed), plan)
    with pytest.raises(ConfigError, match="`adapter_name` 'other'"):
        apply_plan(
            get_peft_model(make_llama(layers=6), LoraConfig(r=2, target_modules=TARGETS)), plan, adapter_name="other"
        )


class _Stage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)
        self.v_proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.v_proj(self.q_proj(x)))


class _Staged(torch.nn.Module):
    """A model only a plugin can read: blocks of class `_Stage` in a list named `stages`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(101, 8)
        self.stages = torch.nn.ModuleList([_Stage() for _ in range(4)])

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for stage in self.stages:
            h = stage(h)
        return h


def test_a_stack_found_by_a_plugin_on_the_callers_manager_is_found_when_applying(tmp_path, pm, make_batches):
    from loraplan.integrations._common import check_applied
    from loraplan.layers import LayerStack

    class Teach:
        @hookimpl
        def loraplan_find_layers(self, model):
            if isinstance(model, _Staged):
                return LayerStack(layers=model.stages, path="stages", backbone=model)
            return None

    pm.register(Teach(), name="teach-staged")
    plan = make_plan(
        _Staged(),
        make_batches(),
        PlanConfig(selector="top", ratio=0.5, share="odd_even", calibration_samples=16),
        plugin_manager=pm,
        progress=False,
    )
    assert plan.stack["path"] == "stages" and plan.selected_layers == [2, 3] and plan.share_groups == [[2, 3]]
    # none of these is given the manager: they read the stack from the path the plan records
    model = apply_plan(get_peft_model(_Staged(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), plan)
    check_applied(model, plan)
    assert sorted(n for n, _ in model.named_modules(remove_duplicate=False) if n.endswith(".lora_A")) == [
        f"base_model.model.stages.{i}.{m}.lora_A" for i in (2, 3) for m in ("q_proj", "v_proj")
    ]
    ids = torch.randint(3, 100, (2, 6))
    model(input_ids=ids).pow(2).mean().backward()
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(_Staged(), tmp_path / "adapter")
    lead, member = loaded.base_model.model.stages[2], loaded.base_model.model.stages[3]
    assert member.q_proj.lora_A["default"] is lead.q_proj.lora_A["default"]
    # and the backward truncation below it comes off again without the manager
    from loraplan import remove_truncation

    assert remove_truncation(loaded) == 3  # layers 0 and 1 below the cut, 2 the boundary


def test_a_bf16_model_round_trips_through_training_and_stock_reload(pm, make_llama, make_batches, tmp_path):
    from peft import PeftModel

    model = make_llama(layers=6).to(torch.bfloat16)
    plan = make_plan(model, make_batches(), PlanConfig(share="angular", share_threshold=0.0, calibration_samples=16),
                     plugin_manager=pm)  # fmt: skip
    assert plan.calibration["dtype"] == "bfloat16"
    peft_model = apply_plan(get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS)), plan)
    assert _lora_layers(peft_model) == set(plan.adapted_layers)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 100, (4, 10))
    for _ in range(2):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    save_adapter(peft_model, tmp_path)
    stock = PeftModel.from_pretrained(make_llama(layers=6).to(torch.bfloat16), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, want, rtol=0, atol=0)
