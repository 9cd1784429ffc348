"""loraplan.sites: the sites a wrapped model carries LoRA on, the sites a LoraConfig reaches (checked against what
stock PEFT wraps), and how sites are named, numbered and summarised."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loraplan.sites import (
    MODULE,
    PARAMETER,
    default_targets,
    layer_index,
    layers_carrying,
    lora_sites,
    reached_sites,
    resolved_config,
    show,
    show_all,
    strip_base_layer,
    summarise_sites,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _mixtral(layers: int = 2):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=101,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return tf.MixtralForCausalLM(config).eval()


# -- names --------------------------------------------------------------------------------------------------------


def test_show_marks_parameter_sites_and_show_all_sorts_and_cuts():
    assert show((MODULE, "model.layers.0.self_attn.q_proj")) == "model.layers.0.self_attn.q_proj"
    assert (
        show((PARAMETER, "model.layers.0.mlp.experts.down_proj")) == "model.layers.0.mlp.experts.down_proj (parameter)"
    )
    sites = [(PARAMETER, "a.experts.w"), (MODULE, "b"), (MODULE, "a")]
    assert show_all(sites) == "a, b, a.experts.w (parameter)"  # sorted: modules before parameters
    many = [(MODULE, f"m{i}") for i in range(8)]
    assert show_all(many) == "m0, m1, m2, m3, m4, m5 and 2 more"
    assert show_all(many[:6]) == "m0, m1, m2, m3, m4, m5"
    assert show_all(many, limit=2) == "m0, m1 and 6 more"
    assert show_all([]) == ""


def test_strip_base_layer_removes_only_whole_base_layer_components():
    assert strip_base_layer("model.layers.0.self_attn.q_proj.base_layer") == "model.layers.0.self_attn.q_proj"
    # nested parameter wrappers insert one base_layer each
    assert strip_base_layer("model.layers.1.mlp.experts.base_layer.base_layer") == "model.layers.1.mlp.experts"
    assert strip_base_layer("model.layers.1.mlp.base_layers.x") == "model.layers.1.mlp.base_layers.x"
    assert strip_base_layer("lm_head") == "lm_head"


def test_layer_index_inside_and_outside_the_stack():
    assert layer_index("model.layers.3.self_attn.q_proj", "model.layers") == 3
    assert layer_index("model.layers.12", "model.layers") == 12
    assert layer_index("model.layers.0.mlp.experts.7.w1", "model.layers") == 0  # the first number after the path
    # outside the stack
    assert layer_index("lm_head", "model.layers") is None
    assert layer_index("model.layers", "model.layers") is None
    assert layer_index("model.norm", "model.layers") is None
    assert layer_index("model.layers_extra.3.q_proj", "model.layers") is None  # a prefix, not the stack
    assert layer_index("vision_tower.model.layers.3.q_proj", "model.layers") is None
    assert layer_index("model.layers.norm.weight", "model.layers") is None  # not a numbered layer


def test_summarise_sites_folds_layer_numbers():
    sites = {(MODULE, f"model.layers.{i}.self_attn.q_proj") for i in (0, 1, 2, 5)}
    assert summarise_sites(sites) == ["model.layers.{0-2,5}.self_attn.q_proj"]
    sites |= {(MODULE, f"model.layers.{i}.self_attn.v_proj") for i in (4,)}
    sites |= {(PARAMETER, f"model.layers.{i}.mlp.experts.down_proj") for i in (1, 2, 3, 7, 9, 10)}
    sites |= {(MODULE, "lm_head")}
    assert summarise_sites(sites) == [
        "lm_head",
        "model.layers.{0-2,5}.self_attn.q_proj",
        "model.layers.{4}.self_attn.v_proj",
        "model.layers.{1-3,7,9-10}.mlp.experts.down_proj (parameter)",
    ]
    assert summarise_sites(set()) == []


# -- what PEFT's defaults resolve to -------------------------------------------------------------------------------


def test_default_targets_are_peft_defaults_for_the_model_type():
    assert default_targets("llama") == {"q_proj", "v_proj"}
    assert isinstance(default_targets("llama"), set)
    assert default_targets("gpt2") == {"c_attn"}
    assert default_targets("no-such-model-type") is None
    assert default_targets(None) is None


def test_resolved_config_expands_all_linear_and_defaults_on_a_tiny_llama(make_llama):
    model = make_llama(layers=2)
    user = LoraConfig(target_modules="all-linear")
    resolved = resolved_config(user, model)
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert resolved.target_modules == linear - {"lm_head"}  # PEFT leaves the output head out
    assert len(resolved.target_modules) == 2 * 7
    assert user.target_modules == "all-linear"  # the user's config is a copy, untouched
    # no targets: the model type's default targets
    assert resolved_config(LoraConfig(), model).target_modules == {"q_proj", "v_proj"}
    # explicit targets stay as they are
    assert resolved_config(LoraConfig(target_modules=["o_proj"]), model).target_modules == {"o_proj"}


# -- the sites a config reaches, and the sites a model carries -----------------------------------------------------


def test_reached_sites_are_what_stock_peft_wraps(make_llama):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for config in (
        LoraConfig(target_modules="all-linear"),
        LoraConfig(target_modules=r".*\.(q|v)_proj"),
        LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 2], layers_pattern="layers"),
    ):
        predicted = reached_sites(make_llama(layers=4), config)
        wrapped = get_peft_model(make_llama(layers=4), copy.deepcopy(config))
        actual = {n for n, m in wrapped.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)}
        assert {name for (_, name) in predicted} == actual
        assert reached_sites(wrapped, wrapped.peft_config["default"]) == predicted


def test_lora_sites_of_a_peft_model_are_the_modules_that_own_lora_a(make_llama, read_sites):
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(
        make_llama(layers=3), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    )
    sites = lora_sites(model, "default")
    by_name = read_sites(model)  # every module owning lora_A, from named_modules(remove_duplicate=False)
    assert len(by_name) == 6
    assert {name: module.r["default"] for (_, name), module in sites.items()} == by_name
    assert all(kind == MODULE and isinstance(module, LoraLayer) for (kind, _), module in sites.items())
    assert sites[(MODULE, "model.layers.1.self_attn.v_proj")] is model.get_base_model().model.layers[1].self_attn.v_proj
    # the PEFT model and its base model carry the same sites; any adapter is the same as the only one
    assert lora_sites(model.get_base_model(), "default") == sites
    assert lora_sites(model) == sites
    assert lora_sites(model, "missing") == {}
    assert lora_sites(make_llama(layers=3)) == {}


def test_lora_sites_tell_adapters_apart_and_layers_carrying_reads_the_stack(make_llama):
    model = get_peft_model(make_llama(layers=4), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], layers_to_transform=[1, 3]))
    other = {name for (_, name) in lora_sites(model, "other")}
    assert other == {"model.layers.1.self_attn.v_proj", "model.layers.3.self_attn.v_proj"}
    assert {name for (_, name) in lora_sites(model, "default")} == {
        f"model.layers.{i}.self_attn.q_proj" for i in range(4)
    }
    assert len(lora_sites(model)) == 6
    assert layers_carrying(model, "other", "model.layers") == [1, 3]
    assert layers_carrying(model, "default", "model.layers") == [0, 1, 2, 3]
    assert layers_carrying(model, None, "model.layers") == [0, 1, 2, 3]
    assert layers_carrying(model, "other", "transformer.h") == []


def test_parameter_sites_of_target_parameters_on_a_tiny_moe():
    from peft.tuners.lora import ParamWrapper

    config = LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    predicted = reached_sites(_mixtral(), config)
    expected_parameters = {
        (PARAMETER, f"model.layers.{i}.mlp.experts.{p}") for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    }
    assert predicted == {(MODULE, f"model.layers.{i}.self_attn.q_proj") for i in (0, 1)} | expected_parameters
    model = get_peft_model(_mixtral(), copy.deepcopy(config))
    sites = lora_sites(model, "default")
    assert set(sites) == predicted
    # two parameters of one module: nested wrappers, one site each, each the wrapper of its own parameter
    wrappers = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 4
    assert {id(sites[s]) for s in expected_parameters} == {id(m) for m in wrappers}
    assert all(sites[(kind, name)].parameter_name == name.rsplit(".", 1)[1] for kind, name in expected_parameters)
    assert layers_carrying(model, "default", "model.layers") == [0, 1]
    assert summarise_sites(set(sites)) == [
        "model.layers.{0-1}.self_attn.q_proj",
        "model.layers.{0-1}.mlp.experts.down_proj (parameter)",
        "model.layers.{0-1}.mlp.experts.gate_up_proj (parameter)",
    ]
