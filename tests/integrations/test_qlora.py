"""QLoRA through the trainers: a bitsandbytes 4-bit NF4 model (double quantization, on the CPU), and an 8-bit one,
planned by
``LoraPlanCallback`` in HF ``Trainer`` (the user wraps it after ``prepare_model_for_kbit_training``) and by
``plan_trainer`` in TRL's ``SFTTrainer`` (which prepares and wraps it itself). Two real steps with a checkpoint at
each; no quantized weight or quantization state changes at any point; LoRA where the plan says; the saved adapter
reloads in stock PEFT onto a fresh 4-bit load with the trained model's logits."""

from __future__ import annotations

import pytest
import torch

from loraplan.integrations.hf import TRAIN_DATASET, LoraPlanCallback, plan_trainer
from loraplan.truncate import truncation_of

QUANT = {
    "4-bit nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "8-bit": dict(load_in_8bit=True),
}


def _load(path, quant="4-bit nf4"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {"bnb_4bit_compute_dtype": torch.float32} if "4-bit" in quant else {}
    quantization = BitsAndBytesConfig(**QUANT[quant], **extra)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)


def _logits(model, tokenizer):
    """As training computes them: train mode under no_grad (an eval-mode forward would let bitsandbytes repack)."""
    batch = tokenizer(["A fine cup of tea.", "Stale and bitter, never again."], return_tensors="pt", padding=True)
    model.train()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_qlora_round_trip_through_the_trainers(
    kind, quant, tmp_path, model_dir, tokenizer, texts, shared, checks, quantized_state
):
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    model = _load(model_dir, quant)
    fresh = quantized_state(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    common = dict(max_steps=2, save_steps=1, gradient_checkpointing=True, learning_rate=1e-2)
    if kind == "trainer":
        model = get_peft_model(prepare_model_for_kbit_training(model), lora)
        callback = LoraPlanCallback(shared, calibration_data=texts[:16])
        trainer = checks.make_trainer(
            model, tmp_path, tokenizer, checks.tokenised(texts, tokenizer), callback, **common
        )
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(output_dir=str(tmp_path), max_length=32, report_to=[], use_cpu=True, bf16=False, **common),
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=tokenizer,
            peft_config=lora,
        )
        callback = plan_trainer(trainer, shared, TRAIN_DATASET)
    plan = callback.plan
    assert plan.calibration["quantization"] == quant
    assert quantized_state(trainer.model) == fresh, "planning changed a quantized weight"
    checks.plan_realised(trainer.model, plan)
    assert truncation_of(trainer.model).active == (min(plan.adapted_layers) > 0)
    trainer.train()
    assert (
        trainer.state.global_step == 2 and (tmp_path / "checkpoint-1").is_dir() and (tmp_path / "checkpoint-2").is_dir()
    )
    checks.plan_realised(trainer.model, plan)
    checks.trained(trainer.model, plan)
    assert quantized_state(trainer.model) == fresh, "training or a checkpoint save changed a quantized weight"
    trainer.save_model()
    assert quantized_state(trainer.model) == fresh, "the final save changed a quantized weight"
    want = _logits(trainer.model, tokenizer)
    stock = PeftModel.from_pretrained(_load(model_dir, quant), str(tmp_path))
    assert checks.lora_layers(stock) == plan.adapted_layers
    trained = dict(trainer.model.named_parameters(remove_duplicate=False))
    for name, p in stock.named_parameters():
        if "lora_" in name:  # TRL trains a quantized model's LoRA in bf16 (its own cast); the saved values are exact
            assert torch.equal(p.to(trained[name].dtype), trained[name]), name
            p.data = p.data.to(trained[name].dtype)
    torch.testing.assert_close(_logits(stock, tokenizer), want, rtol=0, atol=0)
