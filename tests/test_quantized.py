"""QLoRA: planning, applying, training and saving a bitsandbytes 4-bit (and 8-bit) model on the CPU never change a
quantized weight or its quantization state, LoRA sits where the plan says, and the saved adapter reloads in stock
PEFT onto a fresh quantized load with identical outputs (``loraplan.quantized``)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM as AutoModel  # noqa: E402

from loraplan import ConfigError, PlanConfig, apply_plan, make_plan, remove_truncation  # noqa: E402
from loraplan.quantized import is_quantized, quantization_of, quantized_weights, training_numerics  # noqa: E402
from loraplan.truncate import truncation_of  # noqa: E402

VARIANTS = [
    pytest.param(dict(quant="nf4", double=False, compute=torch.float32), id="nf4-fp32"),
    pytest.param(dict(quant="nf4", double=True, compute=torch.float32), id="nf4-double-fp32"),
    pytest.param(dict(quant="nf4", double=False, compute=torch.bfloat16), id="nf4-bf16"),
    pytest.param(dict(quant="nf4", double=True, compute=torch.bfloat16), id="nf4-double-bf16"),
    pytest.param(dict(quant="fp4", double=False, compute=torch.float32), id="fp4-fp32"),
    pytest.param(dict(quant="fp4", double=True, compute=torch.float32), id="fp4-double-fp32"),
    pytest.param(dict(quant="fp4", double=False, compute=torch.bfloat16), id="fp4-bf16"),
    pytest.param(dict(quant="fp4", double=True, compute=torch.bfloat16), id="fp4-double-bf16"),
    pytest.param(dict(eight_bit=True), id="int8"),
]
SETTINGS = dict(selector="cka", ratio=0.5, share="angular", share_threshold=0.0, calibration_samples=16)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama saved in full precision, to be loaded quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        vocab_size=128,
    )
    path = tmp_path_factory.mktemp("tiny-llama-fp32")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_quantized(path, quant="nf4", double=False, compute=torch.float32, eight_bit=False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if eight_bit:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=double,
            bnb_4bit_compute_dtype=compute,
        )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)


def logits(model, ids):
    """Logits as training computes them (train mode, no dropout in these models), which never repacks a weight."""
    was = model.training
    model.train()
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    model.train(was)
    return out


def calibration_batches():
    g = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(3, 128, (4, 12), generator=g),
            "attention_mask": torch.ones(4, 12, dtype=torch.long),
        }
        for _ in range(4)
    ]


def two_steps(model, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(2):
        ids = torch.randint(3, 128, (4, 10), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("variant", VARIANTS)
def test_planning_applying_training_and_saving_never_change_a_quantized_weight(
    variant, base_dir, tmp_path, pm, quantized_state
):
    model = load_quantized(base_dir, **variant)
    fresh = quantized_state(model)
    assert len(fresh) == 28 and is_quantized(model)

    plan = make_plan(model, calibration_batches(), PlanConfig(**SETTINGS), plugin_manager=pm, lora_rank=4)
    assert quantized_state(model) == fresh, "make_plan changed a quantized weight"
    assert plan.share_groups and plan.calibration["quantization"] == quantization_of(model)

    model = prepare_model_for_kbit_training(model)
    peft_model = get_peft_model(model, plan.to_lora_config(LoraConfig(r=4, target_modules="all-linear")))
    apply_plan(peft_model, plan)
    assert quantized_state(peft_model) == fresh, "applying the plan changed a quantized weight"
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert layers == set(plan.adapted_layers)
    lead, member = plan.share_groups[0][:2]
    base = peft_model.base_model.model.model.layers
    assert base[lead].self_attn.q_proj.lora_A["default"] is base[member].self_attn.q_proj.lora_A["default"]

    two_steps(peft_model)
    assert quantized_state(peft_model) == fresh, "training changed a quantized weight"
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    trained = logits(peft_model, ids)
    for round_ in range(2):  # a Trainer saves at every save_steps
        peft_model.save_pretrained(tmp_path / f"adapter-{round_}")
        assert quantized_state(peft_model) == fresh, f"save {round_ + 1} changed a quantized weight"
        torch.testing.assert_close(logits(peft_model, ids), trained, rtol=0, atol=0)

    reloaded = PeftModel.from_pretrained(load_quantized(base_dir, **variant), tmp_path / "adapter-1")
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=0, atol=0)


def test_the_truncated_backward_on_a_4bit_model_is_exact(base_dir, pm):
    model = prepare_model_for_kbit_training(load_quantized(base_dir))
    plan = make_plan(model, calibration_batches(), PlanConfig(selector="top", ratio=0.5), plugin_manager=pm)
    peft_model = apply_plan(
        get_peft_model(model, plan.to_lora_config(LoraConfig(r=4, target_modules="all-linear"))), plan
    )
    assert truncation_of(peft_model).active and truncation_of(peft_model).layers == [0, 1]

    def loss_and_grads():
        ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(2))
        peft_model.train()
        peft_model.zero_grad()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    peft_model.base_model.model.model.layers[2].self_attn.q_proj.lora_B["default"].weight.data.normal_()
    truncated = loss_and_grads()
    remove_truncation(peft_model)
    stock = loss_and_grads()
    torch.testing.assert_close(truncated[0], stock[0])
    assert truncated[1].keys() == stock[1].keys()
    for name in stock[1]:
        torch.testing.assert_close(truncated[1][name], stock[1][name], msg=name)


@pytest.mark.parametrize(
    ("cost_model", "says"),
    [("flops", "prices 16-bit weights and not the dequantization"), ("timed", "timed the quantized layers")],
)
def test_the_cost_notes_say_what_the_predictions_of_a_4bit_model_mean(cost_model, says, base_dir, pm):
    model = load_quantized(base_dir)
    plan = make_plan(
        model, calibration_batches(), PlanConfig(selector="top", ratio=0.5, cost_model=cost_model), plugin_manager=pm
    )
    notes = [n for n in plan.cost["notes"] if "bitsandbytes" in n]
    assert len(notes) == 1 and "4-bit nf4" in notes[0] and says in notes[0]
    full = make_plan(
        AutoModel.from_pretrained(base_dir), calibration_batches(), PlanConfig(selector="top"), plugin_manager=pm
    )
    assert not [n for n in full.cost["notes"] if "bitsandbytes" in n]  # a 16-bit model gets no such note


def test_gradient_scores_of_a_4bit_model_are_those_of_its_dequantized_weights(base_dir, pm):
    """The gradient selector on 4-bit weights (which cannot require grad) reads dLoss/dW from each module's input and
    output gradient: equal to autograd's weight gradients on a float model holding the dequantized weights."""
    from transformers import AutoModelForCausalLM

    quantized = load_quantized(base_dir)
    dense = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for name, weight in quantized_weights(quantized).items():
            dense.get_submodule(name).weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
    config = PlanConfig(selector="gradient", calibration_samples=16)
    got = make_plan(quantized, calibration_batches(), config, plugin_manager=pm)
    want = make_plan(dense, calibration_batches(), config, plugin_manager=pm)
    assert got.scores["gradient"] == pytest.approx(want.scores["gradient"], rel=1e-4)


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16"
)
def test_the_bitsandbytes_repack_that_planning_must_avoid(base_dir, pm, quantized_state):
    """What loraplan.quantized guards against: on this CPU an eval-mode forward under no_grad repacks every 4-bit
    weight for CPU inference, and the next save changes them. A calibration pass is such a forward; make_plan's is
    not."""
    model = load_quantized(base_dir)
    fresh = quantized_state(model)
    with training_numerics(model):
        model.eval()
        with torch.no_grad():
            model(**calibration_batches()[0])
    assert quantized_state(model) == fresh
    with torch.no_grad():
        model(**calibration_batches()[0])  # outside: bitsandbytes repacks (its own behaviour)
    assert quantized_state(model) != fresh
    # such a model would train wrong: applying a plan to it is refused with the reason
    plan = make_plan(model, calibration_batches(), PlanConfig(selector="top", ratio=0.5), plugin_manager=pm)
    peft_model = get_peft_model(model, plan.to_lora_config(LoraConfig(r=4, target_modules=["q_proj"])))
    with pytest.raises(ConfigError, match="bitsandbytes repacked 28 4-bit weight"):
        apply_plan(peft_model, plan)
