"""The quality benchmark's plans and training runs: calibrating a classifier's plan, one HF ``Trainer`` run of
the classifier, one TRL ``SFTTrainer`` run (the plan made or given by ``LoraPlanCallback``), and their evaluation."""

from __future__ import annotations

import tempfile
import time
from typing import Any

from quality_config import plan_settings
from quality_data import answer, batched, count_params, load_classifier, lora_config, lora_layout, model_path, quiet

# -- plans -----------------------------------------------------------------------------------------------------------


def plan_summary(plan: Any) -> dict[str, Any]:
    return {
        "selected_layers": plan.selected_layers,
        "share_groups": plan.share_groups,
        "rank": plan.rank,
        **({"rank_pattern": {str(k): v for k, v in plan.rank_pattern.items()}} if plan.rank_pattern else {}),
        **({"shared_rest": plan.shared_rest} if plan.shared_rest else {}),
        "num_modules": plan.num_modules(),
        "stability": plan.stability,
        "warnings": plan.warnings,
    }


def classifier_plan(
    config: dict[str, Any], task_name: str, method: dict[str, Any], seed: int, ctx: dict[str, Any]
) -> tuple[Any, float]:
    """Calibrate on the first ``calibration_samples`` training examples (tokens + labels, for the gradient pass)
    of the classifier whose head is initialised with seed 0 (the plan is reused for every training seed)."""
    from loraplan import PlanConfig, make_plan

    task = config["tasks"][task_name]
    settings = PlanConfig.from_dict(plan_settings(config, task_name, method, seed))
    model = load_classifier(task, ctx["tokenizer"], seed=0)
    rows = ctx["train_rows"][: settings.calibration_samples]
    batches = batched(rows, settings.batch_size, ctx["tokenizer"].pad_token_id)
    lora = lora_config(task)
    settings = settings.replace(target_modules=settings.target_modules or sorted(lora.target_modules))
    started = time.perf_counter()
    plan = make_plan(model, batches, settings, ctx["tokenizer"], lora_rank=lora.r, progress=False)
    return plan, time.perf_counter() - started


# -- training: classifier -------------------------------------------------------------------------------------------


def training_args(task: dict[str, Any], seed: int, output_dir: str, sft: bool = False) -> Any:
    import torch

    settings = dict(task.get("training") or {})
    gpu = torch.cuda.is_available()
    common = dict(
        output_dir=output_dir,
        seed=seed,
        data_seed=seed,
        use_cpu=not gpu,  # the device the run has; training.use_cpu / training.bf16 in the task override both
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=settings.pop("logging_steps", 10),
        bf16=gpu and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
    )
    common.update(settings)
    if sft:
        from trl import SFTConfig

        common.setdefault("max_length", int(task["review_tokens"]) + 48)
        common["model_init_kwargs"] = {"dtype": "float32"}
        common.setdefault("dataset_num_proc", None)
        return SFTConfig(**common)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def evaluate_classifier(model: Any, rows: list[dict], batch_size: int, pad_id: int) -> tuple[float, float]:
    import torch

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    batches = batched([rows[i] for i in order], batch_size, pad_id)
    model.eval()
    correct = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            labels = batch.pop("labels").to(model.device)
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
            correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(rows), time.perf_counter() - started


def run_classifier(config: dict[str, Any], task_name: str, plan: Any, seed: int, ctx: dict[str, Any]) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer

    from loraplan.apply import tie_share_groups

    task = config["tasks"][task_name]
    tokenizer = ctx["tokenizer"]
    model = load_classifier(task, tokenizer, seed)
    torch.manual_seed(seed)
    # selection and rank are in the LoraConfig; only the share groups are left to tie (apply_plan would tie them too,
    # and also truncate the backward, which the recorded runs did not do)
    model = get_peft_model(model, plan.to_lora_config(lora_config(task)))
    tie_share_groups(model, plan)
    model.loraplan_plan = plan
    layout = lora_layout(model)
    params = count_params(model)
    from datasets import Dataset

    train = Dataset.from_list(ctx["train_rows"])
    with tempfile.TemporaryDirectory(prefix="quality-") as out:
        args = training_args(task, seed, out)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer))
        started, cpu = time.perf_counter(), time.process_time()
        output = trainer.train()
        train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    accuracy, eval_seconds = evaluate_classifier(
        model, ctx["test_rows"], int(task.get("eval_batch_size", 32)), tokenizer.pad_token_id
    )
    return {
        "accuracy": accuracy,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu,
        "eval_seconds": eval_seconds,
        "steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        **params,
        **layout,
    }


# -- training: TRL SFT ----------------------------------------------------------------------------------------------


def evaluate_generator(
    model: Any, tokenizer: Any, prompts: list[str], labels: list[int], batch_size: int
) -> tuple[float, float, dict[str, int]]:
    """Greedy answers to the prompts; correct when the answer, stripped, is exactly "great"/"other"."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    correct = 0
    answers: dict[str, int] = {}
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                enc = tokenizer(
                    [prompts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(model.device)  # the prompts go where the model is (a GPU run)
                out = model.generate(
                    **enc,
                    max_new_tokens=3,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for i, text in zip(index, texts):
                    said = text.strip()
                    answers[said if said in ("great", "other") else "(other text)"] = (
                        answers.get(said if said in ("great", "other") else "(other text)", 0) + 1
                    )
                    correct += int(said == answer(labels[i]))
    finally:
        tokenizer.padding_side = side
    return correct / len(prompts), time.perf_counter() - started, answers


def run_sft(
    config: dict[str, Any], task_name: str, method: dict[str, Any], plan: Any, seed: int, ctx: dict[str, Any]
) -> tuple[dict, Any, float | None]:
    """One TRL SFT run. Without ``plan`` the callback calibrates on TRL's formatted rows (``TRAIN_DATASET``);
    with one it is given the plan (``LoraPlanCallback(plan=...)``). Returns the result, the plan, the seconds the
    trainer's construction took (calibration included) when it calibrated."""
    from datasets import Dataset
    from trl import SFTTrainer

    from loraplan.integrations.hf import TRAIN_DATASET, LoraPlanCallback

    task = config["tasks"][task_name]
    tokenizer = ctx["tokenizer"]
    if plan is None:
        callback = LoraPlanCallback(
            plan_settings(config, task_name, method, seed), calibration_data=TRAIN_DATASET, progress=False
        )
    else:
        callback = LoraPlanCallback(plan=plan, progress=False)
    train = Dataset.from_list(ctx["sft_train"])
    with tempfile.TemporaryDirectory(prefix="quality-sft-") as out:
        args = training_args(task, seed, out, sft=True)
        started = time.perf_counter()
        with quiet():
            trainer = SFTTrainer(
                model=model_path(task["model"]),
                args=args,
                train_dataset=train,
                peft_config=lora_config(task),
                processing_class=tokenizer,
                callbacks=[callback],
            )
            callback.attach(trainer)  # calibrates on TRL's formatted rows when it has no plan
        init_seconds = time.perf_counter() - started
        model = trainer.model
        layout = lora_layout(model)
        params = count_params(model)
        started, cpu = time.perf_counter(), time.process_time()
        output = trainer.train()
        train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    accuracy, eval_seconds, answers = evaluate_generator(
        model, tokenizer, ctx["sft_test_prompts"], ctx["test_labels"], int(task.get("eval_batch_size", 32))
    )
    result = {
        "accuracy": accuracy,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu,
        "eval_seconds": eval_seconds,
        "init_seconds": init_seconds,
        "steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "answers": answers,
        **params,
        **layout,
    }
    return result, callback.plan, (init_seconds if plan is None else None)
