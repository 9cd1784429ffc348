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

This script holds the benchmark's loop (every task, configuration and seed; the stability study) and its command
line. Beside it: ``quality_config.py`` (the config and each method's plan settings), ``quality_data.py`` (data,
models, LoRA layout), ``quality_train.py`` (calibrating a plan, one classifier or SFT run), ``_records.py`` (the
record hashes and the resumable results file) and ``quality_report.py`` (tables and figures, ``--report``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

# under a shared, busy CPU, spinning OpenMP threads waste the time slices a niced run gets (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark's modules beside this file
from _records import Results, config_hash, digest, task_hash  # noqa: E402
from quality_config import load_config  # noqa: E402
from quality_data import (  # noqa: E402
    answer,
    batched,
    classifier_rows,
    load_classifier,
    load_tokenizer,
    lora_config,
    sft_prompt,
    splits,
)
from quality_train import classifier_plan, plan_summary, run_classifier, run_sft  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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
        ctx["sft_train"] = [
            {"prompt": sft_prompt(task, tokenizer, r["text"]), "completion": " " + answer(r["label"])} for r in train
        ]
        ctx["sft_test_prompts"] = [sft_prompt(task, tokenizer, r["text"]) for r in test]
    positives = sum(ctx["test_labels"]) / len(test)
    ctx["facts"] = {
        "train_examples": len(train),
        "test_examples": len(test),
        "train_positive": sum(r["label"] for r in train) / len(train),
        "test_positive": positives,
        "majority": max(positives, 1 - positives),
    }
    return ctx


def plan_seeds(method: dict[str, Any], seeds: list[int]) -> list[int | None]:
    return list(seeds) if method.get("plan_seed_from_run") else [None]


def run_task(
    config: dict[str, Any], task_name: str, results: Results, seeds: list[int], methods: list[dict[str, Any]]
) -> None:
    task = config["tasks"][task_name]
    th = task_hash(config, task_name)
    ctx = task_context(config, task_name)
    _record_task(config, task_name, th, ctx, results)
    print(f"== {task_name}: {ctx['facts']}", flush=True)

    def record_plan(method: dict[str, Any], plan_seed: int | None, plan: Any, seconds: float | None) -> None:
        _record_plan(results, task_name, th, method, plan_seed, plan, seconds)

    for seed in seeds:  # seed-major: a run cut short still has every configuration at the first seeds
        for method in methods:
            key = dict(
                type="run", task=task_name, task_hash=th, method=method["name"], method_hash=digest(method), seed=seed
            )
            if results.find(**key):
                continue
            plan_seed = seed if method.get("plan_seed_from_run") else None
            plan = _stored_plan(results, task_name, th, method, plan_seed)
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
            result["plan_matches"] = (
                result["lora_layers"] == plan.adapted_layers
                and result["tied_groups"] == [g for g in plan.share_groups if len(g) > 1]
                and all(r in result["lora_ranks"] for r in plan.rank_pattern.values())
            )
            results.add(
                {
                    **key,
                    "plan_seed": plan_seed,
                    **{k: v for k, v in plan_summary(plan).items() if k != "warnings"},
                    **result,
                }
            )
            print(
                f"   {task_name} {method['name']:<22} seed {seed}: acc {result['accuracy']:.3f}  "
                f"lora {result['lora_params']:>8,}  train {result['train_seconds']:5.1f}s  "
                f"eval {result['eval_seconds']:4.1f}s  layers {plan.selected_layers} groups {plan.share_groups}",
                flush=True,
            )


def _record_task(config: dict[str, Any], task_name: str, th: str, ctx: dict[str, Any], results: Results) -> None:
    """The task's settings and environment, once per task hash."""
    if results.find(type="task", task=task_name, task_hash=th):
        return
    task = config["tasks"][task_name]
    results.add(
        {
            "type": "task",
            "task": task_name,
            "task_hash": th,
            "model": task["model"],
            "kind": task["kind"],
            "settings": task,
            "data": config.get("data"),
            "calibration": config.get("calibration"),
            **ctx["facts"],
            "environment": environment(),
        }
    )


def _stored_plan(results: Results, task_name: str, th: str, method: dict[str, Any], plan_seed: int | None) -> Any:
    from loraplan import LoraPlan

    found = results.find(
        type="plan",
        task=task_name,
        task_hash=th,
        method=method["name"],
        plan_seed=plan_seed,
        method_hash=digest(method),
    )
    return LoraPlan.from_dict(found["plan"]) if found else None


def _record_plan(
    results: Results,
    task_name: str,
    th: str,
    method: dict[str, Any],
    plan_seed: int | None,
    plan: Any,
    seconds: float | None,
) -> None:
    results.add(
        {
            "type": "plan",
            "task": task_name,
            "task_hash": th,
            "method": method["name"],
            "method_hash": digest(method),
            "plan_seed": plan_seed,
            "calibration_seconds": seconds,
            **plan_summary(plan),
            "plan": plan.to_dict(),
        }
    )


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
                    key = dict(
                        type="stability", task=task_name, study_hash=th, seed=seed, subset=chunk, selector=selector
                    )
                    if results.find(**key):
                        continue
                    settings = PlanConfig.from_dict(
                        {
                            **(config.get("calibration") or {}),
                            "selector": selector,
                            "ratio": 0.5,
                            "target_modules": sorted(lora.target_modules),
                        }
                    )
                    if "max_length" not in (config.get("calibration") or {}):
                        settings = settings.replace(max_length=int(task["review_tokens"]) + 32)
                    n = settings.calibration_samples
                    records = pool[chunk * n : (chunk + 1) * n]
                    rows = classifier_rows(tokenizer, records, int(task["review_tokens"]))
                    if model is None:
                        model = load_classifier(task, tokenizer, seed)
                    started = time.perf_counter()
                    plan = make_plan(
                        model,
                        batched(rows, settings.batch_size, tokenizer.pad_token_id),
                        settings,
                        tokenizer,
                        lora_rank=lora.r,
                        progress=False,
                    )
                    results.add(
                        {
                            **key,
                            "importance": plan.to_dict()["scores"]["importance"],
                            "selected_layers": plan.selected_layers,
                            "half_split": plan.stability.get(selector),
                            "flagged_layers": sorted(plan.flagged_layers),
                            "seconds": time.perf_counter() - started,
                        }
                    )
                    print(
                        f"   stability {task_name} seed {seed} subset {chunk} {selector:<10} -> {plan.selected_layers}",
                        flush=True,
                    )


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
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "niceness": os.nice(0),
        **versions,
    }


def task_methods(config: dict[str, Any], task: dict[str, Any], chosen: list[str] | None) -> list[dict[str, Any]]:
    """The methods one task runs: those named with ``--methods`` (even where the task's own ``methods`` list leaves
    them out: a method asked for by name is never dropped in silence), else the task's list, else every method."""
    listed = chosen if chosen is not None else task.get("methods")
    return [m for m in config["methods"] if listed is None or m["name"] in listed]


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

    chosen = args.methods.split(",") if args.methods else None
    missing = sorted(set(chosen or ()) - {m["name"] for m in config["methods"]})
    if missing:
        raise SystemExit(f"--methods: unknown method(s) {missing}")
    wanted = args.only.split(",") if args.only else None
    if wanted:
        unknown = sorted(set(wanted) - set(config["tasks"]) - {"stability"})
        if unknown:
            raise SystemExit(f"--only: unknown task(s) {unknown}; tasks: {sorted(config['tasks'])} or 'stability'")
    started = time.perf_counter()
    for task_name, task in config["tasks"].items():
        if wanted is None or task_name in wanted:
            run_task(config, task_name, results, config["seeds"], task_methods(config, task, chosen))
    if wanted is None or "stability" in wanted:
        run_stability(config, results)
    elapsed = time.perf_counter() - started
    results.add(
        {
            "type": "session",
            "config_hash": config_hash(config),
            "argv": sys.argv[1:],
            "seconds": elapsed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "niceness": os.nice(0),
            "load_average": list(os.getloadavg()),
        }
    )
    print(f"done in {elapsed:.0f} s -> {output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
