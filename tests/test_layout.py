"""loraplan.layout: the LoraConfig of a plan (ranks, exclusions, parameters), what it refuses, and the whole-model
check of where LoRA sits."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loraplan import ConfigError, PlanConfig, PlanMismatchError, apply_plan, make_plan
from loraplan.layout import stack_exclusion
from loraplan.sites import lora_sites

pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(make_llama, make_batches, pm, **settings):
    config = dict(selector="top", ratio=0.5, share="odd_even", calibration_samples=16)
    config.update(settings)
    return make_plan(make_llama(layers=6), make_batches(), PlanConfig(**config), plugin_manager=pm, progress=False)


def _ranks(model) -> dict[str, int]:
    return {name: module.r["default"] for (_, name), module in lora_sites(model, "default").items()}


def test_the_budget_rule_scales_per_module_ranks_and_keeps_alphas(pm, make_llama, make_batches, tmp_path):
    from peft import PeftModel

    from loraplan import save_adapter

    plan = _plan(make_llama, make_batches, pm, rank_policy="budget")
    assert plan.selected_layers == [3, 4, 5] and plan.share_groups == [[4, 5]]
    # 3 layers in 2 modules: r' = floor(3 r / 2)
    user = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8}, alpha_pattern={"v_proj": 4}
    )
    cfg = plan.to_lora_config(user)
    assert cfg.r == 6 and cfg.rank_pattern == {"v_proj": 12} and cfg.alpha_pattern == {"v_proj": 4}
    assert cfg.lora_alpha == 8 and user.rank_pattern == {"v_proj": 8}  # the user's config is not touched
    model = get_peft_model(make_llama(layers=6), cfg)
    ranks = _ranks(model)
    assert {n: r for n, r in ranks.items() if n.endswith("q_proj")} == {
        f"model.layers.{i}.self_attn.q_proj": 6 for i in (3, 4, 5)
    }
    assert {n: r for n, r in ranks.items() if n.endswith("v_proj")} == {
        f"model.layers.{i}.self_attn.v_proj": 12 for i in (3, 4, 5)
    }
    # the README flow: apply_plan on a model wrapped with the plan's config changes no rank (it is idempotent)
    apply_plan(model, plan)
    assert _ranks(model) == ranks and model.peft_config["default"] == cfg
    # the same from the user's own config on a wrapped model: re-created at the scaled ranks
    wrapped = apply_plan(get_peft_model(make_llama(layers=6), copy.deepcopy(user)), plan)
    assert _ranks(wrapped) == ranks
    assert all(
        m.scaling["default"] == (4 / 12 if n.endswith("v_proj") else 8 / 6)
        for (_, n), m in lora_sites(wrapped, "default").items()
    )
    save_adapter(wrapped, tmp_path / "a")
    assert _ranks(PeftModel.from_pretrained(make_llama(layers=6), tmp_path / "a")) == ranks


def test_settings_that_cannot_be_honoured_are_refused_naming_the_key(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, rank_policy=16)
    with pytest.raises(ConfigError, match=r"`rank_policy` is 16.*`rank_pattern` \{'v_proj': 8\}"):
        plan.to_lora_config(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8}))
    plan = _plan(make_llama, make_batches, pm)
    with pytest.raises(
        ConfigError, match=r"`layers_to_transform` is \[0, 1, 2, 3\], which leaves out planned layers \[4, 5\]"
    ):
        plan.to_lora_config(LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 1, 2, 3]))
    with pytest.raises(ConfigError, match=r"`target_parameters`.*model=model"):
        plan.to_lora_config(LoraConfig(target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]))
    with pytest.raises(ConfigError, match="`base_lora_config` must be a peft.LoraConfig"):
        plan.to_lora_config({"r": 4})


def test_moe_targets_that_peft_turns_into_parameters_need_the_model(pm, make_batches):
    import transformers as tf

    def mixtral():
        torch.manual_seed(0)
        return tf.MixtralForCausalLM(
            tf.MixtralConfig(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=4,
                vocab_size=101,
                num_local_experts=4,
                num_experts_per_tok=2,
            )
        )

    plan = make_plan(
        mixtral(), make_batches(), PlanConfig(selector="top", calibration_samples=8), plugin_manager=pm, progress=False
    )
    with pytest.raises(ConfigError, match=r"turns these targets into expert parameters.*model=model"):
        plan.to_lora_config(LoraConfig(target_modules="all-linear"))
    cfg = plan.to_lora_config(LoraConfig(target_modules="all-linear"), model=mixtral())
    expert_keys = [k for k in cfg.target_parameters if "experts" in k]
    assert expert_keys and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in expert_keys)
    model = get_peft_model(mixtral(), cfg)
    assert {name.split(".")[2] for (_, name) in lora_sites(model, "default")} == {"2", "3"}
    # without conversion (no fused-expert names among the targets) the model is not needed
    assert plan.to_lora_config(LoraConfig(target_modules=["q_proj"])).exclude_modules == stack_exclusion(plan)


def test_the_users_exclusions_are_kept(pm, make_llama, make_batches):
    plan = _plan(make_llama, make_batches, pm, share=None)
    for exclude in (["layers.4.self_attn.q_proj"], r"model\.layers\.4\.self_attn\.q_proj"):
        cfg = plan.to_lora_config(LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=exclude))
        names = {name for (_, name) in lora_sites(get_peft_model(make_llama(layers=6), cfg), "default")}
        assert names == {f"model.layers.{i}.self_attn.{m}" for i in (3, 4, 5) for m in ("q_proj", "v_proj")} - {
            "model.layers.4.self_attn.q_proj"
        }
        assert plan.to_lora_config(cfg) == cfg


def test_check_applied_checks_the_whole_model(pm, make_llama, make_batches):
    from peft.tuners.lora import Linear as LoraLinear

    from loraplan.integrations._common import check_applied

    plan = _plan(make_llama, make_batches, pm)
    model = apply_plan(get_peft_model(make_llama(layers=6), LoraConfig(target_modules=["q_proj"])), plan)
    check_applied(model, plan)
    # LoRA added behind the config's back outside the stack (on lm_head) is found, though every layer is right
    base = model.get_base_model()
    base.lm_head = LoraLinear(base.lm_head, "default", config=LoraConfig(), r=2, lora_alpha=2)
    with pytest.raises(PlanMismatchError, match=r"LoRA on lm_head, which its config does not reach"):
        check_applied(model, plan)
