"""Layer discovery on tiny models of every supported family; the pooled statistics equal an independent
computation with ``output_hidden_states``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplan import PlanConfig, hookimpl
from loraplan.calibration import calibrate
from loraplan.data import prepare_batches
from loraplan.errors import LayerDiscoveryError
from loraplan.layers import (
    LayerStack,
    base_layer,
    features,
    find_layers,
    hidden_size,
    linear_modules,
    parameter_device,
    parameter_dtype,
    target_shapes,
    text_config,
)
from loraplan.strategies import ACTIVATIONS, HIDDEN

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, vocab_size=101)


def _build(name):
    import transformers as tf

    torch.manual_seed(0)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=2))
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**SMALL, num_key_value_heads=2))
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, num_key_value_heads=2))
    if name == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=8))
    if name == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=8))
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=101, n_positions=64))
    if name == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SMALL))
    if name == "opt":
        return tf.OPTForCausalLM(
            tf.OPTConfig(
                hidden_size=32,
                ffn_dim=64,
                num_attention_heads=4,
                num_hidden_layers=3,
                vocab_size=101,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
            )
        )
    if name == "falcon":
        return tf.FalconForCausalLM(
            tf.FalconConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=3, vocab_size=101)
        )
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(**SMALL, max_position_embeddings=64))
    if name == "roberta":
        return tf.RobertaModel(tf.RobertaConfig(**SMALL, max_position_embeddings=64, pad_token_id=1))
    if name == "deberta-v2":
        return tf.DebertaV2Model(tf.DebertaV2Config(**SMALL, max_position_embeddings=64))
    if name == "llava":
        vision = tf.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        )
        text = tf.LlamaConfig(**SMALL, num_key_value_heads=2)
        return tf.LlavaForConditionalGeneration(
            tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=100)
        )
    raise KeyError(name)


CASES = [
    ("llama", "model.layers", "last"),
    ("mistral", "model.layers", "last"),
    ("qwen2", "model.layers", "last"),
    ("gemma", "model.layers", "last"),
    ("gemma3", "model.layers", "last"),
    ("gpt2", "transformer.h", "last"),
    ("gpt_neox", "gpt_neox.layers", "last"),
    ("opt", "model.decoder.layers", "last"),
    ("falcon", "transformer.h", "last"),
    ("bert", "bert.encoder.layer", "first"),
    ("roberta", "encoder.layer", "first"),
    ("deberta-v2", "encoder.layer", "first"),
    ("llava", "model.language_model.layers", "last"),
]


@pytest.mark.parametrize(("name", "path", "pooling"), CASES, ids=[c[0] for c in CASES])
def test_discovery_and_pooled_states_equal_output_hidden_states(name, path, pooling, pm, make_batches):
    model = _build(name).eval()
    stack = find_layers(model, pm)
    assert stack.path == path
    assert stack.num_layers == 3
    assert stack.pooling == pooling
    assert stack.ambiguous == (name == "llava")  # the vision tower also has `layers`
    batches = make_batches(n_batches=2, batch=3, length=10)
    data = prepare_batches(batches, PlanConfig(calibration_samples=6, batch_size=3))
    stats = calibrate(model, stack, data, {HIDDEN, ACTIVATIONS}, PlanConfig(), progress=False)
    assert len(stats.hidden) == 4 and stats.activation_sums.shape == (6, 3)

    # independent computation: the full forward with output_hidden_states, pooled by hand
    expected = [[] for _ in range(4)]
    with torch.no_grad():
        for batch in data.batches:
            out = model(**batch, output_hidden_states=True)
            hidden = out.hidden_states if out.hidden_states is not None else out.language_model_outputs.hidden_states
            if pooling == "first":
                pos = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
            else:
                pos = batch["attention_mask"].sum(dim=1) - 1
            rows = torch.arange(batch["input_ids"].shape[0])
            for i, h in enumerate(hidden):
                expected[i].append(h[rows, pos].float())
    for i in range(4):
        torch.testing.assert_close(stats.hidden[i], torch.cat(expected[i]), rtol=1e-5, atol=1e-5)


def test_linear_modules_see_through_lora_wrappers(make_llama):
    from peft import LoraConfig, get_peft_model

    model = make_llama(layers=2)
    plain = linear_modules(model.model.layers[0])
    assert sorted(plain) == sorted(
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    found = linear_modules(wrapped.base_model.model.model.layers[0])
    assert sorted(found) == sorted(plain)  # lora_A / lora_B are not counted, the wrapper stands for its base
    assert find_layers(wrapped).path == "model.layers"


class _Odd(nn.Module):
    """A model loraplan cannot read on its own: blocks in a list named `stages` of class `Stage`."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.stages = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(3)])


def test_unknown_architecture_names_the_class_and_the_hook(pm):
    with pytest.raises(LayerDiscoveryError) as exc:
        find_layers(_Odd(), pm)
    assert "_Odd" in str(exc.value)
    assert "loraplan_find_layers" in str(exc.value)


@pytest.mark.parametrize("cls", ["ViTModel", "ViTForImageClassification"])
def test_a_vision_only_model_is_refused_as_such(cls, pm):
    import transformers as tf

    config = tf.ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    model = getattr(tf, cls)(config)
    with pytest.raises(LayerDiscoveryError) as exc:
        find_layers(model, pm)
    message = str(exc.value)
    assert f"{cls} is not a text model (its main input is `pixel_values`" in message
    assert "vision-only and audio-only models are not planned" in message and "no nn.ModuleList" not in message


def test_a_plugin_teaches_an_unknown_architecture(pm):
    class Teach:
        @hookimpl
        def loraplan_find_layers(self, model):
            if isinstance(model, _Odd):
                return LayerStack(layers=model.stages, path="stages", backbone=model)
            return None

    pm.register(Teach(), name="teach-odd")
    stack = find_layers(_Odd(), pm)
    assert stack.path == "stages" and stack.num_layers == 3


def test_without_a_manager_only_the_built_in_discovery_runs_and_no_manager_is_built(pm, make_llama, monkeypatch):
    import loraplan.hooks.manager as manager

    class Teach:
        @hookimpl
        def loraplan_find_layers(self, model):
            return LayerStack(layers=model.stages, path="stages", backbone=model) if isinstance(model, _Odd) else None

    pm.register(Teach(), name="teach-odd")

    def no_manager(**_):
        raise AssertionError("find_layers built a plugin manager of its own")

    monkeypatch.setattr(manager, "get_plugin_manager", no_manager)
    model = make_llama(layers=3)
    assert find_layers(model).path == find_layers(model, pm).path == "model.layers"
    # the architecture the caller's plugin teaches is found with that manager only, never behind its back
    assert find_layers(_Odd(), pm).path == "stages"
    with pytest.raises(LayerDiscoveryError, match="loraplan_find_layers"):
        find_layers(_Odd())


def test_a_hook_returning_the_wrong_type_is_an_error(pm):
    class Wrong:
        @hookimpl
        def loraplan_find_layers(self, model):
            return "model.layers"

    pm.register(Wrong(), name="wrong")
    with pytest.raises(LayerDiscoveryError, match="must return a loraplan.layers.LayerStack"):
        find_layers(_Odd(), pm)


# -- what a model's modules look like -----------------------------------------------------------------------------


def test_base_layer_is_the_module_under_a_peft_wrapper(make_llama):
    from peft import LoraConfig, get_peft_model

    linear = nn.Linear(3, 5)
    assert base_layer(linear) is linear
    model = make_llama(layers=2)
    attention = model.model.layers[1].self_attn
    q_proj, k_proj = attention.q_proj, attention.k_proj
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert attention.q_proj is not q_proj  # replaced by PEFT's wrapper
    assert base_layer(attention.q_proj) is q_proj
    assert attention.k_proj is k_proj and base_layer(k_proj) is k_proj  # not a target: not wrapped


def test_features_of_linear_wrapped_and_conv1d_modules():
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    assert features(nn.Linear(3, 5)) == (3, 5)
    conv = Conv1D(5, 3)  # nf (out) = 5, nx (in) = 3
    assert tuple(conv.weight.shape) == (3, 5)  # GPT-2 keeps the weight as (in, out)
    assert features(conv) == (3, 5)
    gpt2 = get_peft_model(_build("gpt2"), LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    block = gpt2.get_base_model().transformer.h[0]
    assert features(block.attn.c_attn) == (32, 96)  # the wrapped Conv1D: 3 projections of 32
    assert features(block.mlp.c_proj) == (128, 32)  # GPT-2's MLP is 4 x n_embd wide
    llama = get_peft_model(_build("llama"), LoraConfig(r=2, target_modules=["k_proj"]))
    assert features(llama.get_base_model().model.layers[0].self_attn.k_proj) == (32, 16)  # 2 KV heads of 8


def test_target_shapes_of_one_block_by_name():
    layer = _build("llama").model.layers[0]
    assert target_shapes(layer, ["q_proj", "k_proj"]) == {"self_attn.k_proj": (32, 16), "self_attn.q_proj": (32, 32)}
    assert list(target_shapes(layer, ["q_proj", "k_proj"])) == ["self_attn.k_proj", "self_attn.q_proj"]  # sorted
    every = target_shapes(layer, None)
    assert every == {
        "mlp.down_proj": (64, 32),
        "mlp.gate_proj": (32, 64),
        "mlp.up_proj": (32, 64),
        "self_attn.k_proj": (32, 16),
        "self_attn.o_proj": (32, 32),
        "self_attn.q_proj": (32, 32),
        "self_attn.v_proj": (32, 16),
    }
    assert target_shapes(layer, ["no_such_module"]) == {}
    assert target_shapes(_build("gpt2").transformer.h[0], ["c_attn"]) == {"attn.c_attn": (32, 96)}


def test_text_config_and_hidden_size_of_text_and_multimodal_models():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config

    llama = _build("llama")
    assert text_config(llama) is llama.config
    assert hidden_size(text_config(llama)) == 32
    wrapped = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    assert text_config(wrapped) is llama.config  # a PEFT wrapper is looked through
    assert hidden_size(GPT2Config(n_embd=48, n_head=4)) == 48
    assert hidden_size(text_config(_build("gpt2"))) == 32
    llava = _build("llava")
    assert text_config(llava) is llava.config.text_config
    assert hidden_size(llava.config) is None  # the multimodal config itself declares none
    assert hidden_size(text_config(llava)) == 32
    assert text_config(nn.Linear(2, 2)) is None
    assert hidden_size(None) is None


def test_parameter_dtype_and_device_with_and_without_default():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert parameter_dtype(model) == torch.float32
    assert parameter_dtype(model.to(torch.bfloat16), torch.float16) == torch.bfloat16
    assert parameter_device(model) == torch.device("cpu")
    assert parameter_device(model, torch.device("meta")) == torch.device("cpu")
    # the first floating-point parameter counts: an integer one is passed over
    mixed = nn.Module()
    mixed.steps = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    mixed.scale = nn.Parameter(torch.ones(2, dtype=torch.float16))
    assert parameter_dtype(mixed) == torch.float16
    only_int = nn.Module()
    only_int.steps = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    assert parameter_dtype(only_int) is None and parameter_dtype(only_int, torch.float32) == torch.float32
    assert parameter_device(only_int) == torch.device("cpu")
    empty = nn.Module()
    assert parameter_dtype(empty) is None
    assert parameter_dtype(empty, torch.bfloat16) == torch.bfloat16
    assert parameter_device(empty) is None
    assert parameter_device(empty, torch.device("meta")) == torch.device("meta")
    assert parameter_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
