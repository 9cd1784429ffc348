"""Quality benchmark: does a loraplan plan keep accuracy? LoRA fine-tuning of real pretrained models on real data.

Every configuration of issue 5 (all-layer LoRA; CKA, activation, gradient, random, top and bottom 50 %; ShareLoRA
with rank kept and with the budget rank; odd-even sharing; CKA 50 % + ShareLoRA) is trained at the same budget
(steps, batch, sequence length, learning rate) over several training seeds, and evaluated on a fixed subset of the
held-out test split of the Amazon Fine Foods reviews (great vs other). Tasks:

- ``classifier``: ``AutoModelForSequenceClassification`` (fresh head) + LoRA through the core API
  (``make_plan`` -> ``plan.to_lora_config`` -> ``get_peft_model`` -> ``apply_plan``), trained by HF ``Trainer``.
- ``sft``: the instruction-tuned decoder taught to answer "great"/"other" with TRL's ``SFTTrainer``, the plan
  made by ``LoraPlanCallback`` on TRL's own formatted rows (``TRAIN_DATASET``); accuracy by exact answer
  (greedy generation).

A plan is data, not training: it is calibrated once per task and configuration (per plan seed for ``random``)
and reused for every training seed. Results go to a JSON-lines file, one line per plan, run and stability cell,
written as soon as it exists, so a crash loses nothing and a rerun resumes (lines whose settings differ from the
current config are ignored, never reused).

Usage (from the repository root, HF_HUB_OFFLINE=1):

    python benchmarks/quality.py --config benchmarks/quality.yaml              # run or resume everything
    python benchmarks/quality.py --config benchmarks/quality.yaml --report     # tables + figures -> docs
    python benchmarks/quality.py --config benchmarks/quality_smoke.yaml        # the CPU smoke run (~1 min)
    python benchmarks/quality.py --config benchmarks/quality.yaml --only minilm_cls seeds=[0]   (comma-separated lists)

Dotted ``key=value`` overrides after the options change the config (values parsed as YAML), e.g.
``tasks.minilm_cls.training.max_steps=50``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path
from typing import Any

# under a shared, busy CPU, spinning OpenMP threads waste the time slices a niced run gets (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from loraplan.overrides import load_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASK_KINDS = ("classifier", "sft")
MODELS = ("minilm", "smollm2")
TOP_KEYS = {"output", "seeds", "data", "calibration", "methods", "tasks", "stability", "report"}
TASK_KEYS = {"model", "kind", "share_threshold", "lora", "training", "review_tokens", "train_examples",
             "test_examples", "eval_batch_size", "prompt", "methods"}
METHOD_KEYS = {"name", "label", "plan", "plan_seed_from_run"}

logger = logging.getLogger("quality")


# -- config -------------------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML at ``path`` with dotted ``key=value`` overrides applied, validated."""
    return validate_config(load_yaml(path, overrides))


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check every section; loraplan, PEFT and the trainers validate their own settings."""
    from peft import LoraConfig

    from loraplan import PlanConfig

    unknown = sorted(set(config) - TOP_KEYS)
    if unknown:
        raise SystemExit(f"unknown top-level key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    for key in ("output", "seeds", "methods", "tasks"):
        if key not in config:
            raise SystemExit(f"`{key}` is required in the benchmark config")
    seeds = config["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SystemExit(f"`seeds` must be a non-empty list of non-negative integers, got {seeds!r}")
    names = set()
    for method in config["methods"]:
        bad = sorted(set(method) - METHOD_KEYS)
        if bad:
            raise SystemExit(f"method {method.get('name')!r}: unknown key(s) {bad}; known: {sorted(METHOD_KEYS)}")
        if not method.get("name") or method["name"] in names:
            raise SystemExit(f"every method needs a unique `name`, got {method.get('name')!r}")
        names.add(method["name"])
        PlanConfig.from_dict(dict(method.get("plan") or {}))
    for name, task in config["tasks"].items():
        bad = sorted(set(task) - TASK_KEYS)
        if bad:
            raise SystemExit(f"task {name!r}: unknown key(s) {bad}; known: {sorted(TASK_KEYS)}")
        if task.get("model") not in MODELS:
            raise SystemExit(f"task {name!r}: `model` must be one of {MODELS}, got {task.get('model')!r}")
        if task.get("kind") not in TASK_KINDS:
            raise SystemExit(f"task {name!r}: `kind` must be one of {TASK_KINDS}, got {task.get('kind')!r}")
        LoraConfig(**(task.get("lora") or {}))
        bad = sorted(set(task.get("methods") or []) - names)
        if bad:
            raise SystemExit(f"task {name!r}: `methods` names unknown method(s) {bad}; known: {sorted(names)}")
        for method in config["methods"]:
            PlanConfig.from_dict(plan_settings(config, name, method, seed=0))
    return config


def plan_settings(config: dict[str, Any], task_name: str, method: dict[str, Any], seed: int) -> dict[str, Any]:
    """The PlanConfig of ``method`` on ``task_name``: calibration defaults, the task's share threshold, the method."""
    task = config["tasks"][task_name]
    settings = dict(config.get("calibration") or {})
    settings.setdefault("max_length", int(task["review_tokens"]) + 32)
    plan = dict(method.get("plan") or {})
    if plan.get("share") == "angular" and "share_threshold" not in plan:
        if task.get("share_threshold") is None:
            raise SystemExit(f"task {task_name!r}: method {method['name']!r} shares (angular) but the task sets no "
                             "`share_threshold`")
        plan["share_threshold"] = float(task["share_threshold"])
    if task["kind"] == "sft":
        plan.setdefault("last_token", "reference")  # TRL ends every row with EOS (docs/integrations/trl.md)
    if method.get("plan_seed_from_run"):
        plan["seed"] = seed
    settings.update(plan)
    return settings


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_hash(config: dict[str, Any]) -> str:
    """The config without its `report` section (where the tables go does not change the numbers)."""
    return digest({k: v for k, v in config.items() if k != "report"})


def task_hash(config: dict[str, Any], task_name: str) -> str:
    """Changes whenever anything that decides a task's numbers changes."""
    return digest({"task": config["tasks"][task_name], "data": config.get("data"),
                   "calibration": config.get("calibration")})


# -- results file ---------------------------------------------------------------------------------------------------


class Results:
    """Append-only JSON lines; each line is flushed and synced when written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path.is_file():
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: ignore it, the cell reruns
                    logger.warning("%s:%d is not JSON (cut by a crash?); ignored", self.path, number)

    def find(self, **key: Any) -> dict[str, Any] | None:
        found = None
        for record in self.records:
            if all(record.get(k) == v for k, v in key.items()):
                found = record  # the last one wins
        return found

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)
        return record


# -- data -----------------------------------------------------------------------------------------------------------


def model_path(name: str) -> str:
    from loraplan.assets import minilm_path, smollm2_path

    return str(minilm_path() if name == "minilm" else smollm2_path(quiet=True))


def splits(config: dict[str, Any], task: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The training examples (the training split shuffled once with ``data.seed``, the first ``train_examples``)
    and the fixed evaluation subset (the test split shuffled with ``data.seed``, the first ``test_examples``)."""
    from loraplan.assets import fine_foods

    data = config.get("data") or {}
    seed = int(data.get("seed", 0))
    train = fine_foods("train")
    random.Random(seed).shuffle(train)
    test = fine_foods("test")
    random.Random(seed + 1).shuffle(test)
    n_train, n_test = task.get("train_examples"), task.get("test_examples")
    return train[: n_train or len(train)], test[: n_test or len(test)]


def truncate(tokenizer: Any, text: str, tokens: int) -> str:
    """The first ``tokens`` tokens of ``text``, as text (so the SFT prompt never loses its question)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= tokens else tokenizer.decode(ids[:tokens])


def load_tokenizer(task: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(task["model"]))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def classifier_rows(tokenizer: Any, records: list[dict], tokens: int) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        enc = tokenizer(r["text"], truncation=True, max_length=tokens)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": r["label"]})
    return rows


def sft_prompt(task: dict[str, Any], tokenizer: Any, text: str) -> str:
    template = task.get("prompt") or "Review: {review}\nIs this review great or other? Answer:"
    return template.format(review=truncate(tokenizer, text, int(task["review_tokens"])).strip())


def answer(label: int) -> str:
    return "great" if label else "other"


def batched(rows: list[dict[str, Any]], size: int, pad_id: int) -> list[dict[str, Any]]:
    import torch

    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in chunk[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in chunk])
        out.append(batch)
    return out


# -- models ---------------------------------------------------------------------------------------------------------


def load_classifier(task: dict[str, Any], tokenizer: Any, seed: int) -> Any:
    """A sequence classifier with a fresh head initialised from ``seed``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    with quiet():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path(task["model"]), num_labels=2, dtype=torch.float32
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


@contextlib.contextmanager
def quiet():
    """Silence transformers' load reports (missing head weights are expected: the head is new)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)


def lora_config(task: dict[str, Any]) -> Any:
    from peft import LoraConfig

    settings = dict(task.get("lora") or {})
    settings.setdefault("task_type", "SEQ_CLS" if task["kind"] == "classifier" else "CAUSAL_LM")
    return LoraConfig(**settings)


def count_params(model: Any) -> dict[str, int]:
    """Trainable parameters, each tensor once (shared LoRA modules count once): all, LoRA, the rest (head)."""
    seen: set[int] = set()
    total = lora = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if "lora_" in name:
            lora += p.numel()
    return {"trainable_params": total, "lora_params": lora, "other_trainable_params": total - lora}


def lora_layout(model: Any) -> dict[str, Any]:
    """Where LoRA actually is after the plan was applied: layers with LoRA, tied module sets, ranks."""
    from loraplan.apply import lora_modules_by_layer

    by_layer = lora_modules_by_layer(model)
    layers = sorted(i for i, mods in by_layer.items() if mods)
    owners: dict[int, list[int]] = {}
    ranks = set()
    for i in layers:
        for name, module in by_layer[i].items():
            adapter = next(iter(module.lora_A))
            owners.setdefault(id(module.lora_A[adapter].weight), []).append(i)
            ranks.add(int(module.r[adapter]))
    tied = sorted({tuple(sorted(set(v))) for v in owners.values() if len(set(v)) > 1})
    return {"lora_layers": layers, "tied_groups": [list(g) for g in tied], "lora_ranks": sorted(ranks),
            "modules_per_layer": sorted({len(by_layer[i]) for i in layers})}


# -- plans ----------------------------------------------------------------------------------------------------------


def plan_summary(plan: Any) -> dict[str, Any]:
    return {
        "selected_layers": plan.selected_layers,
        "share_groups": plan.share_groups,
        "rank": plan.rank,
        "num_modules": plan.num_modules(),
        "stability": plan.stability,
        "warnings": plan.warnings,
    }


def classifier_plan(config: dict[str, Any], task_name: str, method: dict[str, Any], seed: int,
                    ctx: dict[str, Any]) -> tuple[Any, float]:
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
    settings = dict(task.get("training") or {})
    common = dict(output_dir=output_dir, seed=seed, data_seed=seed, use_cpu=True, report_to=[], save_strategy="no",
                  disable_tqdm=True, logging_steps=settings.pop("logging_steps", 10), bf16=False,
                  dataloader_num_workers=0)
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
            labels = batch.pop("labels")
            logits = model(**batch).logits
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
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer))
        started, cpu = time.perf_counter(), time.process_time()
        output = trainer.train()
        train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    accuracy, eval_seconds = evaluate_classifier(model, ctx["test_rows"], int(task.get("eval_batch_size", 32)),
                                                 tokenizer.pad_token_id)
    return {"accuracy": accuracy, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
            "eval_seconds": eval_seconds, "steps": trainer.state.global_step, "train_loss": output.training_loss,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            **params, **layout}


# -- training: TRL SFT ----------------------------------------------------------------------------------------------


def evaluate_generator(model: Any, tokenizer: Any, prompts: list[str], labels: list[int], batch_size: int
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
                enc = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True,
                                add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for i, text in zip(index, texts):
                    said = text.strip()
                    answers[said if said in ("great", "other") else "(other text)"] = answers.get(
                        said if said in ("great", "other") else "(other text)", 0) + 1
                    correct += int(said == answer(labels[i]))
    finally:
        tokenizer.padding_side = side
    return correct / len(prompts), time.perf_counter() - started, answers


def run_sft(config: dict[str, Any], task_name: str, method: dict[str, Any], plan: Any, seed: int,
            ctx: dict[str, Any]) -> tuple[dict, Any, float | None]:
    """One TRL SFT run. Without ``plan`` the callback calibrates on TRL's formatted rows (``TRAIN_DATASET``);
    with one it is given the plan (``LoraPlanCallback(plan=...)``). Returns the result, the plan, the seconds the
    trainer's construction took (calibration included) when it calibrated."""
    from datasets import Dataset
    from trl import SFTTrainer

    from loraplan.integrations.hf import TRAIN_DATASET, LoraPlanCallback

    task = config["tasks"][task_name]
    tokenizer = ctx["tokenizer"]
    if plan is None:
        callback = LoraPlanCallback(plan_settings(config, task_name, method, seed), calibration_data=TRAIN_DATASET,
                                    progress=False)
    else:
        callback = LoraPlanCallback(plan=plan, progress=False)
    train = Dataset.from_list(ctx["sft_train"])
    with tempfile.TemporaryDirectory(prefix="quality-sft-") as out:
        args = training_args(task, seed, out, sft=True)
        started = time.perf_counter()
        with quiet():
            trainer = SFTTrainer(model=model_path(task["model"]), args=args, train_dataset=train,
                                 peft_config=lora_config(task), processing_class=tokenizer, callbacks=[callback])
        init_seconds = time.perf_counter() - started
        model = trainer.model
        layout = lora_layout(model)
        params = count_params(model)
        started, cpu = time.perf_counter(), time.process_time()
        output = trainer.train()
        train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    accuracy, eval_seconds, answers = evaluate_generator(
        model, tokenizer, ctx["sft_test_prompts"], ctx["test_labels"], int(task.get("eval_batch_size", 32)))
    result = {"accuracy": accuracy, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
              "eval_seconds": eval_seconds,
              "init_seconds": init_seconds, "steps": trainer.state.global_step, "train_loss": output.training_loss,
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "answers": answers, **params, **layout}
    return result, callback.plan, (init_seconds if plan is None else None)


# -- the benchmark --------------------------------------------------------------------------------------------------


def task_context(config: dict[str, Any], task_name: str) -> dict[str, Any]:
    task = config["tasks"][task_name]
    tokenizer = load_tokenizer(task)
    train, test = splits(config, task)
    ctx: dict[str, Any] = {"tokenizer": tokenizer, "test_labels": [r["label"] for r in test]}
    tokens = int(task["review_tokens"])
    if task["kind"] == "classifier":
        ctx["train_rows"] = classifier_rows(tokenizer, train, tokens)
        ctx["test_rows"] = classifier_rows(tokenizer, test, tokens)
    else:
        ctx["sft_train"] = [{"prompt": sft_prompt(task, tokenizer, r["text"]), "completion": " " + answer(r["label"])}
                            for r in train]
        ctx["sft_test_prompts"] = [sft_prompt(task, tokenizer, r["text"]) for r in test]
    positives = sum(ctx["test_labels"]) / len(test)
    ctx["facts"] = {"train_examples": len(train), "test_examples": len(test),
                    "train_positive": sum(r["label"] for r in train) / len(train), "test_positive": positives,
                    "majority": max(positives, 1 - positives)}
    return ctx


def plan_seeds(method: dict[str, Any], seeds: list[int]) -> list[int | None]:
    return list(seeds) if method.get("plan_seed_from_run") else [None]


def run_task(config: dict[str, Any], task_name: str, results: Results, seeds: list[int],
             methods: list[dict[str, Any]]) -> None:
    from loraplan import LoraPlan

    task = config["tasks"][task_name]
    th = task_hash(config, task_name)
    ctx = task_context(config, task_name)
    if not results.find(type="task", task=task_name, task_hash=th):
        results.add({"type": "task", "task": task_name, "task_hash": th, "model": task["model"], "kind": task["kind"],
                     "settings": task, "data": config.get("data"), "calibration": config.get("calibration"),
                     **ctx["facts"], "environment": environment()})
    print(f"== {task_name}: {ctx['facts']}", flush=True)

    def stored_plan(method: dict[str, Any], plan_seed: int | None) -> Any:
        found = results.find(type="plan", task=task_name, task_hash=th, method=method["name"], plan_seed=plan_seed,
                             method_hash=digest(method))
        return LoraPlan.from_dict(found["plan"]) if found else None

    def record_plan(method: dict[str, Any], plan_seed: int | None, plan: Any, seconds: float | None) -> None:
        results.add({"type": "plan", "task": task_name, "task_hash": th, "method": method["name"],
                     "method_hash": digest(method), "plan_seed": plan_seed, "calibration_seconds": seconds,
                     **plan_summary(plan), "plan": plan.to_dict()})

    for seed in seeds:  # seed-major: a run cut short still has every configuration at the first seeds
        for method in methods:
            key = dict(type="run", task=task_name, task_hash=th, method=method["name"], method_hash=digest(method),
                       seed=seed)
            if results.find(**key):
                continue
            plan_seed = seed if method.get("plan_seed_from_run") else None
            plan = stored_plan(method, plan_seed)
            started = time.perf_counter()
            if task["kind"] == "classifier":
                if plan is None:
                    plan, seconds = classifier_plan(config, task_name, method, seed, ctx)
                    record_plan(method, plan_seed, plan, seconds)
                result = run_classifier(config, task_name, plan, seed, ctx)
            else:
                result, made, seconds = run_sft(config, task_name, method, plan, seed, ctx)
                if plan is None:
                    plan = made
                    record_plan(method, plan_seed, plan, seconds)
            result["wall_seconds"] = time.perf_counter() - started
            result["plan_matches"] = (result["lora_layers"] == plan.selected_layers
                                      and result["tied_groups"] == plan.share_groups)
            results.add({**key, "plan_seed": plan_seed, **{k: v for k, v in plan_summary(plan).items()
                                                             if k != "warnings"}, **result})
            print(f"   {task_name} {method['name']:<22} seed {seed}: acc {result['accuracy']:.3f}  "
                  f"lora {result['lora_params']:>8,}  train {result['train_seconds']:5.1f}s  "
                  f"eval {result['eval_seconds']:4.1f}s  layers {plan.selected_layers} groups {plan.share_groups}",
                  flush=True)


# -- stability study ------------------------------------------------------------------------------------------------


def run_stability(config: dict[str, Any], results: Results) -> None:
    """Rank correlation of each data-driven selector's layer ranking across disjoint calibration subsets and seeds.

    For each seed s: the training split shuffled with s, cut into ``subsets`` disjoint chunks of
    ``calibration_samples`` reviews; the classifier's head is initialised from s (only the gradient score reads the
    head). One importance ranking per (seed, chunk)."""
    from loraplan import PlanConfig, make_plan
    from loraplan.assets import fine_foods

    study = config.get("stability") or {}
    if not study.get("tasks"):
        return
    seeds = study.get("seeds", [0, 1, 2])
    subsets = int(study.get("subsets", 2))
    selectors = study.get("selectors", ["cka", "activation", "gradient"])
    for task_name in study["tasks"]:
        task = config["tasks"][task_name]
        if task["kind"] != "classifier":
            raise SystemExit(f"stability: task {task_name!r} must be a classifier task (labels for the gradient)")
        th = digest({"task": task_hash(config, task_name), "study": study})
        tokenizer = load_tokenizer(task)
        lora = lora_config(task)
        for seed in seeds:
            pool = fine_foods("train")
            random.Random(1000 + seed).shuffle(pool)
            model = None
            for chunk in range(subsets):
                for selector in selectors:
                    key = dict(type="stability", task=task_name, study_hash=th, seed=seed, subset=chunk,
                               selector=selector)
                    if results.find(**key):
                        continue
                    settings = PlanConfig.from_dict({**(config.get("calibration") or {}), "selector": selector,
                                                     "ratio": 0.5, "target_modules": sorted(lora.target_modules)})
                    if "max_length" not in (config.get("calibration") or {}):
                        settings = settings.replace(max_length=int(task["review_tokens"]) + 32)
                    n = settings.calibration_samples
                    records = pool[chunk * n : (chunk + 1) * n]
                    rows = classifier_rows(tokenizer, records, int(task["review_tokens"]))
                    if model is None:
                        model = load_classifier(task, tokenizer, seed)
                    started = time.perf_counter()
                    plan = make_plan(model, batched(rows, settings.batch_size, tokenizer.pad_token_id), settings,
                                     tokenizer, lora_rank=lora.r, progress=False)
                    results.add({**key, "importance": plan.to_dict()["scores"]["importance"], "selected_layers":
                                 plan.selected_layers, "half_split": plan.stability.get(selector),
                                 "flagged_layers": sorted(plan.flagged_layers), "seconds": time.perf_counter() - started})
                    print(f"   stability {task_name} seed {seed} subset {chunk} {selector:<10} -> "
                          f"{plan.selected_layers}", flush=True)


# -- environment ----------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for name in ("loraplan", "torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "niceness": os.nice(0), **versions}


# -- main -----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="benchmark YAML (benchmarks/quality.yaml)")
    parser.add_argument("--output", default=None, help="results JSONL (default: the config's `output`)")
    parser.add_argument("--only", default=None, help="comma-separated task names and/or 'stability' (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--report", action="store_true", help="write the tables and figures from the results")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    output = Path(args.output or config["output"])
    if not output.is_absolute():
        output = ROOT / output
    results = Results(output)
    if args.report:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import quality_report  # benchmarks/quality_report.py, beside this file

        quality_report.write(config, results.records, args.config)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("loraplan").setLevel(logging.ERROR)

    methods = config["methods"]
    if args.methods:
        chosen = args.methods.split(",")
        missing = sorted(set(chosen) - {m["name"] for m in methods})
        if missing:
            raise SystemExit(f"--methods: unknown method(s) {missing}")
        methods = [m for m in methods if m["name"] in chosen]
    wanted = args.only.split(",") if args.only else None
    if wanted:
        unknown = sorted(set(wanted) - set(config["tasks"]) - {"stability"})
        if unknown:
            raise SystemExit(f"--only: unknown task(s) {unknown}; tasks: {sorted(config['tasks'])} or 'stability'")
    started = time.perf_counter()
    for task_name, task in config["tasks"].items():
        if wanted is None or task_name in wanted:
            listed = task.get("methods")
            run_task(config, task_name, results, config["seeds"],
                     [m for m in methods if listed is None or m["name"] in listed])
    if wanted is None or "stability" in wanted:
        run_stability(config, results)
    elapsed = time.perf_counter() - started
    results.add({"type": "session", "config_hash": config_hash(config), "argv": sys.argv[1:], "seconds": elapsed,
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "niceness": os.nice(0),
                 "load_average": list(os.getloadavg())})
    print(f"done in {elapsed:.0f} s -> {output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
