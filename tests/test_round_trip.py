"""The round trip, on every architecture family and every LoraConfig feature a user brings.

Each case: a plan, the user's own ``LoraConfig``, a path (``plan.to_lora_config`` then ``get_peft_model`` then
``apply_plan``, as the README shows; or ``apply_plan`` on a model the user wrapped), two real AdamW steps, a save and
a reload in stock PEFT. What must hold, checked against stock PEFT rather than against loraplan's own code:

- LoRA sits exactly where stock PEFT puts it with the user's config, minus the stack's unplanned layers (sites
  counted with ``named_modules(remove_duplicate=False)``, which lists a shared module under every layer);
- every LoRA module keeps the rank stock PEFT gives it with the user's config (``rank_pattern`` included);
- share groups are one tensor after the steps;
- the saved adapter config alone puts LoRA on the same sites (``get_peft_model`` with it), and
  ``PeftModel.from_pretrained`` on a fresh base model gives the trained model's logits.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loraplan import PlanConfig, apply_plan, hookimpl, load_adapter, make_plan, save_adapter
from loraplan.strategies import Selector

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_LAYERS = 6
PLANNED = [1, 4, 5]  # a gap (layers 2, 3), the lowest planned layer above 0 (truncation), a pair to share (4, 5)
GROUPS = [[4, 5]]
VOCAB = 101


class Fixed(Selector):
    """Selects ``options["layers"]``: the same plan on every architecture, so that each case checks the round trip
    and nothing else."""

    name = "fixed"
    data_dependent = False

    def score(self, ctx):
        return {"importance": [1.0 if i in ctx.config.options["layers"] else 0.0 for i in range(ctx.num_layers)]}

    def choose(self, ctx, importance):
        return list(ctx.config.options["layers"])


class FixedPlugin:
    @hookimpl
    def loraplan_register_selectors(self, register):
        register(Fixed())


# -- tiny models of each family -----------------------------------------------------------------------------------

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=NUM_LAYERS,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


def _vision_clip():
    import transformers as tf

    return tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8
    )


def build(arch: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(
                n_embd=32,
                n_layer=NUM_LAYERS,
                n_head=4,
                vocab_size=VOCAB,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    elif arch == "bert_cls":
        model = tf.BertForSequenceClassification(
            tf.BertConfig(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=NUM_LAYERS,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                num_labels=2,
            )
        )
    elif arch == "llava":
        model = tf.LlavaForConditionalGeneration(
            tf.LlavaConfig(vision_config=_vision_clip(), text_config=tf.LlamaConfig(**TEXT), image_token_id=VOCAB - 1)
        )
    elif arch == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2))
    elif arch == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(
            tf.Qwen3MoeConfig(**TEXT, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
        )
    elif arch == "gpt_oss":
        model = tf.GptOssForCausalLM(tf.GptOssConfig(**TEXT, head_dim=8, num_local_experts=4, num_experts_per_tok=2))
    elif arch == "qwen2_vl":
        text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=0, eos_token_id=0)
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            mlp_ratio=2,
            patch_size=2,
            spatial_merge_size=1,
            temporal_patch_size=1,
            in_channels=3,
        )
        model = tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vision))
    elif arch == "gemma3":
        text = tf.Gemma3TextConfig(**TEXT, head_dim=8, bos_token_id=0, eos_token_id=0)
        vision = tf.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        )
        model = tf.Gemma3ForConditionalGeneration(
            tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
        )
    else:
        raise KeyError(arch)
    return model.eval()


STACK = {
    "llama": "model.layers",
    "gpt2": "transformer.h",
    "bert_cls": "bert.encoder.layer",
    "llava": "model.language_model.layers",
    "mixtral": "model.layers",
    "qwen3_moe": "model.layers",
    "gpt_oss": "model.layers",
    "qwen2_vl": "model.language_model.layers",
    "gemma3": "model.language_model.layers",
}

# (architecture, feature id, LoraConfig settings)
CASES = [
    ("llama", "list", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", "all-linear", dict(target_modules="all-linear")),
    (
        "llama",
        "rank-alpha-pattern",
        dict(
            r=4,
            target_modules=["q_proj", "v_proj", "up_proj"],
            rank_pattern={"v_proj": 8},
            alpha_pattern={"up_proj": 3},
        ),
    ),
    ("llama", "modules_to_save", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ("llama", "lm_head", dict(target_modules=["q_proj", "v_proj", "lm_head"])),
    ("llama", "dora", dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    (
        "llama",
        "layers_pattern",
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=list(range(NUM_LAYERS)), layers_pattern="layers"),
    ),
    ("llama", "regex", dict(target_modules=r".*\.(q_proj|o_proj)")),
    ("gpt2", "conv1d", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    ("gpt2", "all-linear", dict(target_modules="all-linear", fan_in_fan_out=True)),
    ("bert_cls", "all-linear", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("bert_cls", "modules_to_save", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    ("llava", "list", dict(target_modules=["q_proj", "v_proj"])),
    ("llava", "all-linear", dict(target_modules="all-linear")),
    (
        "mixtral",
        "target_parameters",
        dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    ),
    ("mixtral", "all-linear", dict(target_modules="all-linear")),
    (
        "qwen3_moe",
        "target_parameters",
        dict(
            target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        ),
    ),
    ("gpt_oss", "target_parameters", dict(target_modules=["q_proj"], target_parameters=["experts.down_proj"])),
    ("qwen2_vl", "list", dict(target_modules=["q_proj", "v_proj"])),
    ("qwen2_vl", "all-linear", dict(target_modules="all-linear")),
    ("gemma3", "list", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
]

#: the cases whose config also reaches modules outside the planned stack
OUTSIDE = {
    ("llama", "lm_head"),
    ("bert_cls", "all-linear"),
    ("llava", "list"),
    ("llava", "all-linear"),
    ("qwen2_vl", "all-linear"),
    ("gemma3", "list"),
}


# -- independent reading of a PEFT model ----------------------------------------------------------------------------


def layer_of(site: str, arch: str) -> int | None:
    match = re.match(rf"^{re.escape(STACK[arch])}\.(\d+)\.", site)
    return int(match.group(1)) if match else None


def stock_expectation(arch: str, settings: dict, sites) -> dict[str, int]:
    """Stock PEFT with the user's config, minus the stack's unplanned layers: where LoRA must sit, at which rank."""
    stock = get_peft_model(build(arch), LoraConfig(**copy.deepcopy(settings)))
    return {s: r for s, r in sites(stock).items() if layer_of(s, arch) is None or layer_of(s, arch) in PLANNED}


def inputs(arch: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (2, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "gemma3":
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def train(model, arch: str, steps: int = 2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(steps):
        batch = inputs(arch, seed=100 + step)
        labels = torch.tensor([0, 1]) if arch == "bert_cls" else batch["input_ids"]
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits(model, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(arch, seed=7)).logits


def groups_are_one_tensor(model, arch: str) -> None:
    by_layer: dict[int, dict[str, torch.nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        match = re.match(r"^(?:base_model\.model\.)?(?P<site>.+)\.lora_A$", name)
        if match and "default" in module and (index := layer_of(match["site"], arch)) is not None:
            relative = match["site"].split(f"{STACK[arch]}.{index}.", 1)[1]
            by_layer.setdefault(index, {})[relative] = module["default"]
    for group in GROUPS:
        lead = by_layer[group[0]]
        assert lead
        for member in group[1:]:
            assert by_layer[member].keys() == lead.keys()
            for relative, a in by_layer[member].items():
                assert a is lead[relative] and a.weight.data_ptr() == lead[relative].weight.data_ptr(), relative
    for relative, a in by_layer[PLANNED[0]].items():  # layer 1 shares with no one
        assert all(a is not by_layer[j][relative] for j in PLANNED[1:] if relative in by_layer[j])


@pytest.fixture
def plans(pm):
    pm.register(FixedPlugin(), name="fixed")
    made = {}

    def plan_for(arch: str, share: bool):
        key = (arch, share)
        if key not in made:
            config = PlanConfig(
                selector="fixed",
                options={"layers": PLANNED},
                share="odd_even" if share else None,
                calibration_samples=4,
                max_length=12,
                stability=False,
            )
            batches = [inputs(arch, seed=1), inputs(arch, seed=2)]
            made[key] = make_plan(build(arch), batches, config, plugin_manager=pm, progress=False)
        return copy.deepcopy(made[key])

    return plan_for


@pytest.mark.parametrize("path", ["to_lora_config", "apply_plan"])
@pytest.mark.parametrize("share", [False, True], ids=["unshared", "shared"])
@pytest.mark.parametrize(("arch", "feature", "settings"), CASES, ids=[f"{a}-{f}" for a, f, _ in CASES])
def test_round_trip(arch, feature, settings, share, path, plans, tmp_path, read_sites):
    sites = read_sites
    plan = plans(arch, share)
    assert plan.selected_layers == PLANNED and plan.share_groups == (GROUPS if share else [])
    want = stock_expectation(arch, settings, sites)
    # the cases that also put LoRA outside the stack (a pooler, lm_head, a vision tower) really do
    assert any(layer_of(s, arch) is None for s in want) == ((arch, feature) in OUTSIDE)
    user = LoraConfig(**copy.deepcopy(settings))
    if path == "to_lora_config":
        model = get_peft_model(build(arch), plan.to_lora_config(user, model=build(arch)))
        assert sites(model) == want  # before apply_plan: the config alone puts LoRA where it belongs
        apply_plan(model, plan)  # ties the groups; changes nothing else
    else:
        model = apply_plan(get_peft_model(build(arch), user), plan)
    assert sites(model) == want

    train(model, arch)
    assert sites(model) == want
    if share:
        groups_are_one_tensor(model, arch)
    expected = logits(model, arch)
    save_adapter(model, tmp_path / "adapter")
    # the saved config alone says where LoRA sits (stock PEFT also loads by the weights' names, which would hide a
    # config that says something else)
    assert sites(get_peft_model(build(arch), LoraConfig.from_pretrained(tmp_path / "adapter"))) == want

    stock = PeftModel.from_pretrained(build(arch), tmp_path / "adapter").eval()
    assert type(stock).__module__.startswith("peft.")
    assert sites(stock) == want
    torch.testing.assert_close(logits(stock, arch), expected)

    ours = load_adapter(build(arch), tmp_path / "adapter")
    assert sites(ours) == want
    if share:
        groups_are_one_tensor(ours, arch)
    torch.testing.assert_close(logits(ours, arch), expected)
