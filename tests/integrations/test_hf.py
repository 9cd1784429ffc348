"""LoraPlanCallback in a real ``transformers.Trainer``: 2 CPU steps on a tiny Llama, resume, and bad input."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch

from loraplan import ConfigError, LoraPlan, PlanConfig, PlanMismatchError, make_plan
from loraplan.integrations.hf import TRAIN_DATASET, LoraPlanCallback


def test_two_steps_plan_ties_checkpoints_and_stock_reload(
    tmp_path, model_dir, tokenizer, texts, checks, shared, caplog
):
    model = checks.lora_model(model_dir)
    callback = LoraPlanCallback(shared, calibration_data=texts)
    with caplog.at_level(logging.WARNING, logger="loraplan"):
        trainer = checks.make_trainer(
            model,
            tmp_path,
            tokenizer,
            checks.tokenised(texts, tokenizer),
            callback,
            activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": True},
        )
    plan = callback.plan
    # sharing is on and reentrant checkpointing was asked for: switched, under both names, and said so
    assert trainer.args.activation_checkpointing_kwargs["use_reentrant"] is False
    assert trainer.args.gradient_checkpointing_kwargs["use_reentrant"] is False
    assert any("switched from reentrant to non-reentrant" in r.getMessage() for r in caplog.records)
    assert LoraPlan.load(tmp_path / "loraplan.json") == plan
    assert plan.calibration["num_samples"] == shared["calibration_samples"]
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(math.isfinite(loss) for _, loss in checks.losses(trainer))
    # checkpointing ran non-reentrant on the model itself
    funcs = [m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert funcs and all(f.keywords["use_reentrant"] is False for f in funcs)
    checks.plan_realised(model, plan)
    checks.trained(model, plan)
    for step in (1, 2):
        assert LoraPlan.load(tmp_path / f"checkpoint-{step}" / "loraplan.json") == plan
    trainer.save_model()
    checks.stock_reload(model, model_dir, tmp_path, tokenizer)


RESUMED = {
    "shared": {},
    "shared_rest": {"share": "lora_drop"},
    "importance_ranks": {"share": None, "rank_policy": "importance", "param_budget": 0.75},
}


@pytest.mark.parametrize("variant", list(RESUMED))
def test_resume_reuses_plan_and_ties(variant, tmp_path, model_dir, tokenizer, texts, checks, shared, caplog):
    shared = {**shared, **RESUMED[variant]}
    dataset = checks.tokenised(texts, tokenizer)
    first = checks.make_trainer(
        checks.lora_model(model_dir), tmp_path, tokenizer, dataset, LoraPlanCallback(shared, calibration_data=texts)
    )
    first.train()
    saved = (tmp_path / "loraplan.json").read_bytes()
    before = checks.losses(first)

    # no calibration data this time: a recomputation would have nothing to calibrate on
    callback = LoraPlanCallback(shared)
    model = checks.lora_model(model_dir)
    with caplog.at_level(logging.INFO, logger="loraplan"):
        second = checks.make_trainer(model, tmp_path, tokenizer, dataset, callback, max_steps=4)
        second.train(resume_from_checkpoint=True)
    assert (tmp_path / "loraplan.json").read_bytes() == saved
    messages = [r.getMessage() for r in caplog.records]
    assert any("reused" in m and "not recomputed" in m for m in messages)
    assert any("resumed from" in m and "checkpoint-2" in m for m in messages)
    assert second.state.global_step == 4
    after = checks.losses(second)
    assert [s for s, _ in after] == [1, 2, 3, 4] and after[:2] == before
    assert all(math.isfinite(loss) for _, loss in after)
    checks.plan_realised(model, callback.plan, sharing=variant != "importance_ranks")
    assert bool(callback.plan.shared_rest) == (variant == "shared_rest")
    assert bool(callback.plan.rank_pattern) == (variant == "importance_ranks")
    assert LoraPlan.load(tmp_path / "checkpoint-4" / "loraplan.json") == callback.plan


def test_resume_from_checkpoint_of_another_plan_is_an_error(tmp_path, model_dir, tokenizer, texts, checks, shared):
    dataset = checks.tokenised(texts, tokenizer)
    checks.make_trainer(
        checks.lora_model(model_dir),
        tmp_path / "a",
        tokenizer,
        dataset,
        LoraPlanCallback(shared, calibration_data=texts),
    ).train()
    other = make_plan(checks.lora_model(model_dir), texts, {**shared, "ratio": 0.75}, tokenizer, progress=False)
    other.save(tmp_path / "other.json")
    trainer = checks.make_trainer(
        checks.lora_model(model_dir),
        tmp_path / "b",
        tokenizer,
        dataset,
        LoraPlanCallback(plan_path=tmp_path / "other.json"),
        max_steps=4,
    )
    with pytest.raises(PlanMismatchError, match="selected_layers"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_callback_added_after_construction_fails_at_train(tmp_path, model_dir, tokenizer, texts, checks, shared):
    trainer = checks.make_trainer(
        checks.lora_model(model_dir), tmp_path, tokenizer, checks.tokenised(texts, tokenizer), None
    )
    trainer.add_callback(LoraPlanCallback(shared, calibration_data=texts))
    with pytest.raises(ConfigError, match=r"added after the Trainer was constructed.*callbacks=\[LoraPlanCallback"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_neither_data_nor_plan_explains_both(tmp_path, model_dir, tokenizer, texts, checks, shared):
    with pytest.raises(ConfigError, match=r"`calibration_data`.*calibration_data=.*TRAIN_DATASET.*plan_path="):
        checks.make_trainer(
            checks.lora_model(model_dir),
            tmp_path,
            tokenizer,
            checks.tokenised(texts, tokenizer),
            LoraPlanCallback(shared),
        )


def test_plan_for_another_model_is_an_error(tmp_path, model_dir, tokenizer, texts, checks, shared):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = 6
    bigger = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=["q_proj"]))
    make_plan(bigger, texts, shared, tokenizer, progress=False).save(tmp_path / "six.json")
    with pytest.raises(PlanMismatchError, match="num_layers: plan 6, model 4"):
        checks.make_trainer(
            checks.lora_model(model_dir),
            tmp_path / "out",
            tokenizer,
            checks.tokenised(texts, tokenizer),
            LoraPlanCallback(plan_path=tmp_path / "six.json"),
        )


def test_changed_settings_with_a_saved_plan_is_an_error(tmp_path, model_dir, tokenizer, texts, checks, shared):
    dataset = checks.tokenised(texts, tokenizer)
    checks.make_trainer(
        checks.lora_model(model_dir), tmp_path, tokenizer, dataset, LoraPlanCallback(shared, calibration_data=texts)
    )
    with pytest.raises(ConfigError, match=r"ratio: plan 0\.5, now 0\.25.*delete that file or use a fresh output"):
        checks.make_trainer(
            checks.lora_model(model_dir),
            tmp_path,
            tokenizer,
            dataset,
            LoraPlanCallback({**shared, "ratio": 0.25}, calibration_data=texts),
        )


def test_user_optimizer_is_refused(tmp_path, model_dir, tokenizer, texts, checks, shared):
    from transformers import Trainer, TrainingArguments

    model = checks.lora_model(model_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ConfigError, match="`optimizers`"):
        Trainer(
            model=model,
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            train_dataset=checks.tokenised(texts, tokenizer),
            optimizers=(optimizer, None),
            callbacks=[LoraPlanCallback(shared, calibration_data=texts)],
        )


def test_unwrapped_model_is_refused(tmp_path, model_dir, tokenizer, texts, checks, shared):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ConfigError, match="needs a LoRA-wrapped model.*get_peft_model"):
        checks.make_trainer(
            AutoModelForCausalLM.from_pretrained(model_dir),
            tmp_path,
            tokenizer,
            checks.tokenised(texts, tokenizer),
            LoraPlanCallback(shared, calibration_data=texts),
        )


def test_train_dataset_calibration_uses_the_trainers_rows(tmp_path, model_dir, tokenizer, texts, checks, shared):
    from loraplan.data import prepare_batches

    dataset = checks.tokenised(texts, tokenizer)
    callback = LoraPlanCallback(shared, calibration_data=TRAIN_DATASET)
    callback.attach(checks.make_trainer(checks.lora_model(model_dir), tmp_path, tokenizer, dataset, callback))
    config = PlanConfig.from_dict(shared)
    expected = prepare_batches(dataset.select(range(config.calibration_samples)), config, tokenizer)
    assert callback.plan.calibration["num_samples"] == config.calibration_samples
    assert callback.plan.calibration["data_hash"] == expected.data_hash


def test_model_already_checkpointing_reentrantly_is_switched(tmp_path, model_dir, tokenizer, texts, checks, shared):
    model = checks.lora_model(model_dir)
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    checks.make_trainer(
        model, tmp_path, tokenizer, checks.tokenised(texts, tokenizer), LoraPlanCallback(shared, calibration_data=texts)
    )
    funcs = [m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert funcs and all(isinstance(f, functools.partial) and f.keywords["use_reentrant"] is False for f in funcs)


def test_custom_checkpointing_with_sharing_is_refused(tmp_path, model_dir, tokenizer, texts, checks, shared):
    model = checks.lora_model(model_dir)
    model.base_model.model.activation_checkpointing_enable()

    def offloaded_checkpoint(function, *args, **kwargs):  # stands for an offloading autograd function
        return function(*args)

    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = offloaded_checkpoint
    with pytest.raises(ConfigError, match="offloaded_checkpoint, not torch's checkpoint.*share: null"):
        checks.make_trainer(
            model,
            tmp_path,
            tokenizer,
            checks.tokenised(texts, tokenizer),
            LoraPlanCallback(shared, calibration_data=texts),
        )


def test_model_init_is_refused_at_train(tmp_path, model_dir, tokenizer, texts, checks, shared):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    trainer = Trainer(
        model_init=lambda: checks.lora_model(model_dir),
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True),
        train_dataset=checks.tokenised(texts, tokenizer),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[LoraPlanCallback(shared, calibration_data=texts)],
    )
    with pytest.raises(ConfigError, match="`model_init`"):
        trainer.train()


def test_calibration_progress_follows_the_trainers_disable_tqdm(
    tmp_path, model_dir, tokenizer, texts, checks, shared, capfd
):
    dataset = checks.tokenised(texts, tokenizer)
    for disable in (False, True):
        callback = LoraPlanCallback(shared, calibration_data=texts)
        checks.make_trainer(
            checks.lora_model(model_dir), tmp_path / str(disable), tokenizer, dataset, callback, disable_tqdm=disable
        )
        assert callback.plan is not None
        assert ("loraplan calibration" in capfd.readouterr().err) is not disable


def test_trainer_checkpoints_carry_the_plan_and_the_model_card_section(
    tmp_path, model_dir, tokenizer, texts, checks, shared
):
    from huggingface_hub import ModelCard

    from loraplan.card import BEGIN

    callback = LoraPlanCallback(shared, calibration_data=texts)
    checks.make_trainer(
        checks.lora_model(model_dir), tmp_path, tokenizer, checks.tokenised(texts, tokenizer), callback, max_steps=1
    ).train()
    checkpoint = tmp_path / "checkpoint-1"
    card = ModelCard.load(checkpoint / "README.md")
    assert "loraplan" in card.data.tags and card.text.count(BEGIN) == 1
    assert f"{len(callback.plan.selected_layers)} of {callback.plan.num_layers}" in card.text
    assert (checkpoint / "loraplan.json").is_file()


def test_resume_from_a_checkpoint_outside_output_dir_is_checked_where_it_was_loaded(
    tmp_path, model_dir, tokenizer, texts, checks, shared, caplog
):
    import shutil

    dataset = checks.tokenised(texts, tokenizer)
    first = LoraPlanCallback(shared, calibration_data=texts)
    checks.make_trainer(checks.lora_model(model_dir), tmp_path / "a", tokenizer, dataset, first).train()
    moved = tmp_path / "kept" / "step-2"
    shutil.copytree(tmp_path / "a" / "checkpoint-2", moved)
    callback = LoraPlanCallback(plan=first.plan)
    model = checks.lora_model(model_dir)
    with caplog.at_level(logging.INFO, logger="loraplan"):
        checks.make_trainer(model, tmp_path / "b", tokenizer, dataset, callback, max_steps=3).train(
            resume_from_checkpoint=str(moved)
        )
    assert any(f"resumed from {moved}" in r.getMessage() for r in caplog.records)
    checks.plan_realised(model, first.plan)


def test_train_dataset_without_the_trainer_is_refused_before_training(
    tmp_path, model_dir, tokenizer, texts, checks, shared
):
    callback = LoraPlanCallback(shared, calibration_data=TRAIN_DATASET)
    trainer = checks.make_trainer(
        checks.lora_model(model_dir), tmp_path, tokenizer, checks.tokenised(texts, tokenizer), callback
    )
    assert callback.plan is None  # a callback is not told the trainer's dataset: nothing planned, nothing applied
    with pytest.raises(ConfigError, match=r"'train_dataset'.*plan_trainer\(trainer, settings\).*attach\(trainer\)"):
        trainer.train()


def test_plan_trainer_plans_on_the_trainers_rows_and_stays_for_the_run(
    tmp_path, model_dir, tokenizer, texts, checks, shared
):
    from loraplan.data import prepare_batches
    from loraplan.integrations.hf import plan_trainer

    dataset = checks.tokenised(texts, tokenizer)
    model = checks.lora_model(model_dir)
    trainer = checks.make_trainer(model, tmp_path, tokenizer, dataset, None)
    callback = plan_trainer(trainer, shared)
    assert any(cb is callback for cb in trainer.callback_handler.callbacks)
    config = PlanConfig.from_dict(shared)
    expected = prepare_batches(dataset.select(range(config.calibration_samples)), config, tokenizer)
    assert callback.plan.calibration["data_hash"] == expected.data_hash
    checks.plan_realised(model, callback.plan)
    trainer.train()
    checks.plan_realised(model, callback.plan)
    assert LoraPlan.load(tmp_path / "checkpoint-2" / "loraplan.json") == callback.plan
    with pytest.raises(ConfigError, match="`attach` takes a transformers Trainer"):
        callback.attach(model)


def test_attach_plans_a_callback_added_after_construction(tmp_path, model_dir, tokenizer, texts, checks, shared):
    model = checks.lora_model(model_dir)
    trainer = checks.make_trainer(model, tmp_path, tokenizer, checks.tokenised(texts, tokenizer), None)
    callback = LoraPlanCallback(shared, calibration_data=texts)
    trainer.add_callback(callback)
    callback.attach(trainer)
    trainer.train()
    checks.plan_realised(model, callback.plan)


@pytest.mark.parametrize(
    ("fsdp", "share", "message"),
    [
        (("1", "FULL_STATE_DICT"), None, "`fsdp_version` is 1: loraplan is tested with FSDP2 only"),
        (("2", "FULL_STATE_DICT"), "angular", "`share` is 'angular': under FSDP2 every decoder layer"),
        (("2", "SHARDED_STATE_DICT"), None, "`fsdp_state_dict_type` is SHARDED_STATE_DICT"),
    ],
    ids=["fsdp1", "sharing", "sharded"],
)
def test_what_fsdp_cannot_train_is_refused(fsdp, share, message):
    from loraplan.errors import ConfigError
    from loraplan.integrations._common import Fsdp, refuse_under_fsdp

    with pytest.raises(ConfigError, match=message):
        refuse_under_fsdp(Fsdp(int(fsdp[0]), fsdp[1]), share=share)
    refuse_under_fsdp(Fsdp(2, "FULL_STATE_DICT"))  # FSDP2, no sharing, a full state dict: trained as planned
    refuse_under_fsdp(None, share="angular")  # no FSDP: nothing to refuse


def test_an_encoder_decoder_model_in_hf_trainer(tmp_path, tokenizer, texts):
    """T5 (random init, the SmolLM2 tokenizer) under HF Trainer with the callback: both stacks planned on the texts
    (the decoder reads each text too), two steps, the adapter reloads in stock PEFT with the trained logits."""
    import torch
    import transformers as tf
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
    config = tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4, vocab_size=len(tokenizer), **ids)
    base = tf.T5ForConditionalGeneration(config)
    base.save_pretrained(tmp_path / "t5")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wo"]))
    data = Dataset.from_dict({"text": texts[:16]}).map(
        lambda b: {
            **tokenizer(b["text"], truncation=True, max_length=24),
            "labels": tokenizer(b["text"], truncation=True, max_length=12)["input_ids"],
        },
        batched=True,
        remove_columns=["text"],
    )
    settings = {"selector": "cka", "share": "angular", "share_threshold": 0.0, "calibration_samples": 12}
    callback = LoraPlanCallback(settings, calibration_data=texts[:12])
    trainer = tf.Trainer(
        model=model,
        args=tf.TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            save_steps=2,
            dataloader_num_workers=0,
        ),  # fmt: skip
        train_dataset=data,
        data_collator=tf.DataCollatorForSeq2Seq(tokenizer, model=base),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    plan = callback.plan
    assert [one.stack_path for one in plan.stacks] == ["encoder.block", "decoder.block"]
    trainer.train()
    assert trainer.state.global_step == 2
    trainer.save_model()
    assert LoraPlan.load(tmp_path / "out" / "loraplan.json") == plan
    batch = tokenizer(["A fine cup of tea.", "Stale and bitter."], return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"]
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
        stock = PeftModel.from_pretrained(
            tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5"), str(tmp_path / "out")
        )
        torch.testing.assert_close(stock.eval()(**batch).logits, want)
    for one in plan.stacks:
        layers = stock.get_base_model().get_submodule(one.stack_path)
        with_lora = [i for i, layer in enumerate(layers) if any(".lora_A" in n for n, _ in layer.named_modules())]
        assert with_lora == one.adapted_layers


@pytest.mark.parametrize(
    ("engine", "encoder_decoder", "quantized", "message"),
    [
        ("DeepSpeed", True, None, "`deepspeed`: training an encoder-decoder model under DeepSpeed is not tested"),
        ("FSDP", False, "4-bit nf4", "`fsdp`: training a 4-bit nf4 \\(bitsandbytes\\) model under FSDP is not tested"),
    ],
    ids=["encoder-decoder-deepspeed", "qlora-fsdp"],
)
def test_untested_engine_combinations_are_refused(engine, encoder_decoder, quantized, message):
    from loraplan.errors import ConfigError
    from loraplan.integrations._common import refuse_untested_engine

    with pytest.raises(ConfigError, match=message):
        refuse_untested_engine(engine, encoder_decoder, quantized)
    refuse_untested_engine(None, encoder_decoder, quantized)  # one process or DDP: tested
    refuse_untested_engine(engine)  # a full-precision decoder under DeepSpeed or FSDP2: tested
