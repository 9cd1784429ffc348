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
from loraplan.layers import LayerStack, find_layers, linear_modules
from loraplan.strategies import ACTIVATIONS, HIDDEN

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
            tf.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=3, vocab_size=101,
                         word_embed_proj_dim=32, max_position_embeddings=64)
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
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     num_hidden_layers=2, image_size=32, patch_size=8)
        text = tf.LlamaConfig(**SMALL, num_key_value_heads=2)
        return tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=100))
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
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]
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


def test_a_hook_returning_the_wrong_type_is_an_error(pm):
    class Wrong:
        @hookimpl
        def loraplan_find_layers(self, model):
            return "model.layers"

    pm.register(Wrong(), name="wrong")
    with pytest.raises(LayerDiscoveryError, match="must return a loraplan.layers.LayerStack"):
        find_layers(_Odd(), pm)
