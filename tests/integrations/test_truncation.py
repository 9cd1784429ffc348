"""Truncated backward inside real trainers: HF ``Trainer`` and TRL ``SFTTrainer`` enable checkpointing and input
grads after the plan was applied (in ``train()`` / ``__init__``), and the run must still be the stock PEFT run:
the same logged losses and the same LoRA weights after two steps, while the layers below the lowest planned layer
record nothing."""

from __future__ import annotations

import pytest
import torch

from loraplan import make_plan
from loraplan.integrations.hf import LoraPlanCallback
from loraplan.layers import find_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(texts, tokenizer):
    from datasets import Dataset

    return Dataset.from_dict({"text": texts[:16]}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=24), batched=True, remove_columns=["text"]
    )


def plan_of(model_dir, texts, tokenizer, checks, **settings):
    config = {"calibration_samples": 8, "max_length": 24, "ratio": 0.5, **settings}
    return make_plan(checks.lora_model(model_dir), texts, config, tokenizer, progress=False)


class Records:
    """Whether each layer's output required grad, for every training forward."""

    def __init__(self, model):
        self.seen: dict[int, set[bool]] = {}
        for index, layer in enumerate(find_layers(model).layers):
            layer.register_forward_hook(self._hook(index))

    def _hook(self, index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.seen.setdefault(index, set()).add(bool(hidden.requires_grad))

        return hook


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_run(stock, ours, checks) -> None:
    (stock_trainer, stock_records), (trainer, records) = stock, ours
    assert trainer.state.global_step == stock_trainer.state.global_step == 2
    steps, losses = zip(*checks.losses(trainer))
    stock_steps, stock_losses = zip(*checks.losses(stock_trainer))
    assert steps == stock_steps == (1, 2) and losses == pytest.approx(stock_losses, rel=1e-6)
    want, got = lora_state(stock_trainer.model), lora_state(trainer.model)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, name=name: f"{name}: {m}")
    moved = [n for n in got if "lora_B" in n and float(got[n].abs().max()) > 0]
    assert moved, "lora_B never left zero: the steps trained nothing"
    lowest = min(trainer.model.loraplan_plan.selected_layers)
    assert lowest > 0
    assert all(stock_records.seen[i] == {True} for i in stock_records.seen)
    assert all(records.seen[i] == {False} for i in range(lowest))
    assert all(records.seen[i] == {True} for i in range(lowest, len(records.seen)))


@pytest.mark.parametrize(
    ("settings", "reentrant"),
    [({"selector": "top", "share": "angular", "share_threshold": 0.0}, False), ({"selector": "top"}, True)],
    ids=["shared-non-reentrant", "reentrant"],
)
def test_hf_trainer_with_activation_checkpointing(tmp_path, model_dir, tokenizer, texts, checks, settings, reentrant):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    plan = plan_of(model_dir, texts, tokenizer, checks, **settings)
    runs = []
    for truncate in (False, True):
        model = checks.lora_model(model_dir)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(tmp_path / str(truncate)),
                max_steps=2,
                per_device_train_batch_size=4,
                learning_rate=1e-2,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                seed=0,
                activation_checkpointing=True,
                activation_checkpointing_kwargs={"use_reentrant": reentrant},
            ),
            train_dataset=dataset(texts, tokenizer),
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            processing_class=tokenizer,
            callbacks=[LoraPlanCallback(plan=plan.__class__.from_dict(plan.to_dict()), truncate_backward=truncate)],
        )
        records = Records(model)
        trainer.train()
        runs.append((trainer, records))
    assert_same_run(*runs, checks)
    # checkpointing really ran as asked, on the layers that are back-propagated
    funcs = [
        m._gradient_checkpointing_func
        for m in runs[1][0].model.modules()
        if getattr(m, "gradient_checkpointing", False)
    ]
    assert funcs and all(f.keywords["use_reentrant"] is reentrant for f in funcs)


def test_trl_sft_trainer_with_gradient_checkpointing(tmp_path, model_dir, tokenizer, texts, checks):
    """TRL wraps the model itself, calls `enable_input_require_grads` in `__init__` and the deprecated
    `gradient_checkpointing_enable` in `train()`."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    every_other = plan_of(model_dir, texts, tokenizer, checks, selector="every_other")  # layers 0 and 2
    plan = every_other.from_dict({**every_other.to_dict(), "selected_layers": [1, 3]})  # the odd ones instead
    runs = []
    for truncate in (False, True):
        trainer = SFTTrainer(
            model=str(model_dir),
            args=SFTConfig(
                output_dir=str(tmp_path / str(truncate)),
                max_steps=2,
                per_device_train_batch_size=4,
                learning_rate=1e-2,
                max_length=24,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                bf16=False,
                seed=0,
                gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": True},
            ),
            train_dataset=Dataset.from_dict({"text": texts[:16]}),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
            callbacks=[LoraPlanCallback(plan=plan.__class__.from_dict(plan.to_dict()), truncate_backward=truncate)],
        )
        records = Records(trainer.model)
        trainer.train()
        runs.append((trainer, records))
    assert_same_run(*runs, checks)
    funcs = [
        m._gradient_checkpointing_func
        for m in runs[1][0].model.modules()
        if getattr(m, "gradient_checkpointing", False)
    ]
    assert funcs and all(f.keywords["use_reentrant"] is True for f in funcs)
