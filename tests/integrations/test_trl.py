"""LoraPlanCallback in TRL's SFTTrainer: TRL loads the model from a path, wraps it with ``peft_config`` and formats
the data; the plan is calibrated on that formatted data. 2 CPU steps, resume, TRL's forced reentrant setting."""

from __future__ import annotations

import logging
import math

import pytest

from loraplan import LoraPlan, PlanConfig
from loraplan.integrations.hf import TRAIN_DATASET, LoraPlanCallback


def sft(model_dir, out, texts, callback, **overrides):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    settings = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_length=32,
        save_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        gradient_checkpointing=True,
    )
    settings.update(overrides)
    trainer = SFTTrainer(
        model=str(model_dir),
        args=SFTConfig(**settings),
        train_dataset=Dataset.from_dict({"text": texts}),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
        callbacks=[callback],
    )
    callback.attach(trainer)  # the trainer's own rows (TRAIN_DATASET) are planned on here; otherwise a no-op
    return trainer


def test_sft_two_steps_on_its_own_formatted_data(tmp_path, model_dir, tokenizer, texts, checks, shared):
    from loraplan.data import prepare_batches

    callback = LoraPlanCallback(shared, calibration_data=TRAIN_DATASET)
    trainer = sft(model_dir, tmp_path, texts, callback)
    plan = callback.plan
    # calibrated on the first N rows of TRL's tokenised training data
    config = PlanConfig.from_dict(shared)
    assert "input_ids" in trainer.train_dataset.column_names
    rows = trainer.train_dataset.select(range(config.calibration_samples)).select_columns(["input_ids"])
    assert plan.calibration["data_hash"] == prepare_batches(rows, config, tokenizer).data_hash
    trainer.train()
    model = trainer.model
    assert trainer.state.global_step == 2
    assert all(math.isfinite(loss) for _, loss in checks.losses(trainer))
    checks.plan_realised(model, plan)
    checks.trained(model, plan)
    assert LoraPlan.load(tmp_path / "checkpoint-2" / "loraplan.json") == plan
    trainer.save_model()
    checks.stock_reload(model, model_dir, tmp_path, tokenizer)


def test_sft_resume_reuses_plan(tmp_path, model_dir, texts, checks, shared, caplog):
    first = sft(model_dir, tmp_path, texts, LoraPlanCallback(shared, calibration_data=TRAIN_DATASET))
    first.train()
    saved = (tmp_path / "loraplan.json").read_bytes()
    callback = LoraPlanCallback(shared)  # nothing to calibrate on: the saved plan must be reused
    with caplog.at_level(logging.INFO, logger="loraplan"):
        second = sft(model_dir, tmp_path, texts, callback, max_steps=4)
        second.train(resume_from_checkpoint=True)
    assert (tmp_path / "loraplan.json").read_bytes() == saved
    assert any("not recomputed" in r.getMessage() for r in caplog.records)
    assert second.state.global_step == 4
    steps = checks.losses(second)
    assert [s for s, _ in steps] == [1, 2, 3, 4] and steps[:2] == checks.losses(first)
    checks.plan_realised(second.model, callback.plan)


def test_reentrant_kwargs_as_trl_forces_them_are_switched(tmp_path, model_dir, texts, checks, shared, caplog):
    """TRL writes ``use_reentrant=True`` into ``gradient_checkpointing_kwargs`` for PEFT + ZeRO-3 (only the
    deprecated name; transformers reads ``activation_checkpointing_kwargs``). Sharing must survive it."""
    callback = LoraPlanCallback(shared, calibration_data=TRAIN_DATASET)
    with caplog.at_level(logging.WARNING, logger="loraplan"):
        trainer = sft(model_dir, tmp_path, texts, callback, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert trainer.args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert any("switched from reentrant" in r.getMessage() for r in caplog.records)
    trainer.train()
    funcs = [
        m._gradient_checkpointing_func for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False)
    ]
    assert funcs and all(f.keywords["use_reentrant"] is False for f in funcs)
    checks.plan_realised(trainer.model, callback.plan)


def test_sft_with_a_peft_model_and_no_peft_config(tmp_path, model_dir, texts, checks, shared):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = checks.lora_model(model_dir)
    callback = LoraPlanCallback(shared, calibration_data=texts)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            max_length=32,
            report_to=[],
            use_cpu=True,
            bf16=False,
            save_strategy="no",
        ),
        train_dataset=Dataset.from_dict({"text": texts}),
        callbacks=[callback],
    )
    trainer.train()
    checks.plan_realised(model, callback.plan)


@pytest.mark.parametrize("settings", [{"ratoi": 0.5}], ids=["misspelt-key"])
def test_misspelt_setting_is_refused_at_construction(settings):
    from loraplan import ConfigError

    with pytest.raises(ConfigError, match=r"`ratoi` \(did you mean `ratio`\?\)"):
        LoraPlanCallback(settings, calibration_data=TRAIN_DATASET)


def test_a_single_string_as_calibration_data_is_refused():
    from loraplan import ConfigError

    with pytest.raises(ConfigError, match=r"`calibration_data` is the string 'reviews.jsonl'.*TRAIN_DATASET"):
        LoraPlanCallback(calibration_data="reviews.jsonl")


def test_the_readme_snippet_reads_the_token_before_trls_eos(tmp_path, model_dir, tokenizer, texts):
    """The README's `plan_trainer(trainer, {"selector": "cka", "share": "angular"})`: every TRL row ends with EOS, and
    the default last_token='auto' reads the token before it (the reference mode's token on rows without an inner
    EOS), so layer 0 is scorable; last_token='mask' reads EOS in every row, which the warning and the flag name."""
    from trl import SFTConfig, SFTTrainer

    from loraplan.integrations.hf import plan_trainer

    def planned(tag, **settings):
        from datasets import Dataset
        from peft import LoraConfig

        trainer = SFTTrainer(
            model=str(model_dir),
            args=SFTConfig(output_dir=str(tmp_path / tag), max_length=256, report_to=[], use_cpu=True, bf16=False),
            train_dataset=Dataset.from_dict({"text": texts}),
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        )
        assert all(row[-1] == tokenizer.eos_token_id for row in trainer.train_dataset["input_ids"][:16])
        return plan_trainer(trainer, {"selector": "cka", "share": "angular", "calibration_samples": 16, **settings})

    auto = planned("auto").plan
    reference = planned("reference", last_token="reference").plan
    assert auto.config["last_token"] == "auto" and not auto.flagged_layers
    assert not any("degenerate" in w for w in auto.warnings)
    assert auto.scores == reference.scores and auto.selected_layers == reference.selected_layers
    mask = planned("mask", last_token="mask").plan
    eos = f"token id {tokenizer.eos_token_id} (the EOS token), with last_token='mask'"
    assert 0 in mask.flagged_layers and eos in mask.flagged_layers[0] and "last_token='auto'" in mask.flagged_layers[0]
    assert any(eos in w and "calibration is degenerate" in w for w in mask.warnings)
