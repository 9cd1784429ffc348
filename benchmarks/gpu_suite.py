"""The whole GPU suite in one command (``make bench-gpu``), each part under its own time limit, its results and doc
blocks written as it finishes (a part that runs out of time leaves the others' results in place):

1. ``step_time``: ``benchmarks/step_time.py`` at the TinyLlama-1.1B and Llama-3-8B shapes, with the ``limit`` rows and
   the fitted cost model's predictions, and a ``time_budget=0.6`` plan (docs/speed.md);
2. ``calibration``: ``benchmarks/calibration.py`` at the Llama-3-8B shape, random init, every method end to end
   (docs/benchmarks/calibration.md);
3. ``zero3``: the TRL recipe under DeepSpeed ZeRO-3 on one GPU, 20 steps, and its checks (the engine, LoRA where
   planned, the ties, non-reentrant checkpointing, finite losses, the saved adapter reloading in stock PEFT with the
   trained logits; docs/integrations/deepspeed.md);
4. ``sft``: the SmolLM2-135M SFT rows of the quality benchmark (240 steps × 8, lr 1e-3, 64-token reviews, 500 test
   reviews), seeds 0-2, for all layers, CKA 50 %, top 50 %, random 50 %, ShareLoRA, CKA + shared rest and
   ``time_budget=0.6``; the runs share the GPU, several at a time (docs/results.md).

It runs where the GPU machine reaches no package registry: loraplan from ``src`` on ``PYTHONPATH`` and the packages
the machine lacks installed from wheels (docs/development.md, "The GPU suite"). ``--smoke`` runs every part at tiny
settings on the CPU, writing into a scratch directory and never into the docs (the test suite runs it).

    python benchmarks/gpu_suite.py                      # on one GPU, about 9 minutes
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite
    python benchmarks/gpu_suite.py --only step_time,zero3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers (_markdown)
PARTS = ("step_time", "calibration", "zero3", "sft")
#: wall-clock limit of each part on one H200, in seconds: 540 together, the 9 minutes the suite is given (and under
#: the GPU machine's 600 s a command). Sized from the 2026-12-04 H200 run (docs/development.md, "The GPU suite");
#: a part that reaches its limit is stopped and reported as such, the others' results stay.
LIMITS = {"step_time": 240, "calibration": 45, "zero3": 60, "sft": 195}
#: the step-time rounds per preset on the GPU: the 8B shape steps ~2.5x slower, so it times fewer rounds
STEP_ROUNDS = {"gpu": ("2", "6"), "llama8b": ("1", "4")}
#: the share of the step-time limit each GPU preset gets
STEP_SHARE = {"gpu": 0.4, "llama8b": 0.6}
#: the SFT rows: quality.yaml's method names
SFT_METHODS = ("all", "cka", "top", "random", "share", "cka_rest", "cka_time")
SFT_SETTINGS = [
    "tasks.smollm2_sft.training.max_steps=240",
    "tasks.smollm2_sft.train_examples=1920",
    "tasks.smollm2_sft.test_examples=500",
    "tasks.smollm2_sft.review_tokens=64",
    "tasks.smollm2_sft.training.learning_rate=1e-3",
    "tasks.smollm2_sft.training.warmup_steps=20",
    "tasks.smollm2_sft.eval_batch_size=100",
]


def _env() -> dict[str, str]:
    path = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "HF_HUB_OFFLINE": "1"}


def _run(command: list[str], limit: float, log: Path) -> dict[str, Any]:
    """Run ``command`` with a wall-clock limit; its output goes to ``log``. The outcome, never an exception."""
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        try:
            done = subprocess.run(command, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=limit)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"stopped at its limit ({limit:.0f} s)"
    return {"status": status, "seconds": round(time.perf_counter() - started, 1)}


def step_time(out: Path, smoke: bool, log: Path, limit: float) -> dict[str, Any]:
    results = {}
    presets = ("smoke",) if smoke else ("gpu", "llama8b")
    for preset in presets:
        command = [sys.executable, "benchmarks/step_time.py", "--preset", preset, "--time-budget", "0.6"]
        if preset in STEP_ROUNDS:
            warmup, repeats = STEP_ROUNDS[preset]
            command += ["--warmup", warmup, "--repeats", repeats]
        share = limit if smoke else limit * STEP_SHARE[preset]
        command += ["--json", str(out / f"step_time_{preset}.json")]
        command += ["--write-doc", str(out / "speed.md" if smoke else REPO / "docs" / "speed.md")]
        results[preset] = _run(command, share, log)
    return results


def calibration(out: Path, smoke: bool, log: Path, limit: float) -> dict[str, Any]:
    if smoke:
        shape = ["--shape", "tiny", "--device", "cpu", "--samples", "16", "--max-length", "32", "--no-memory"]
    else:
        shape = [
            "--shape",
            "llama8b",
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--samples",
            "128",
            "--max-length",
            "512",
        ]
    command = [sys.executable, "benchmarks/calibration.py", *shape, "--repeats", "2", "--methods"]
    command += ["--json", str(out / "calibration.json")]
    command += [
        "--write-doc",
        str(out / "calibration.md" if smoke else REPO / "docs" / "benchmarks" / "calibration.md"),
    ]
    return _run(command, limit, log)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3(out: Path, smoke: bool, log: Path, limit: float) -> dict[str, Any]:
    run_dir = out / "zero3"
    shutil.rmtree(run_dir, ignore_errors=True)
    report = out / "zero3_report.json"
    steps = 2 if smoke else 20
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port"]
    command += [str(_free_port()), "recipes/trl_sft.py", "--config", "recipes/configs/trl/tiny_cpu.yaml"]
    command += ["training.deepspeed=recipes/deepspeed/zero3.json", f"training.max_steps={steps}"]
    command += [f"training.output_dir={run_dir}", "--report", str(report)]
    if not smoke:
        command.append("training.bf16=true")
    outcome = _run(command, limit, log)
    if outcome["status"] == "ok":
        outcome["checks"] = zero3_checks(run_dir, report.with_name(f"{report.stem}.rank0{report.suffix}"))
        (out / "zero3_check.json").write_text(json.dumps(outcome["checks"], indent=1) + "\n", encoding="utf-8")
    from _markdown import write_block

    doc = out / "deepspeed.md" if smoke else REPO / "docs" / "integrations" / "deepspeed.md"
    write_block(doc, "<!-- zero3:gpu:begin", "<!-- zero3:gpu:end -->", zero3_block(outcome, steps, smoke))
    return outcome


def zero3_block(outcome: dict[str, Any], steps: int, smoke: bool) -> str:
    """The ZeRO-3 part's outcome as a markdown block for docs/integrations/deepspeed.md: the device, the settings and
    every check with its value (a failed or stopped run says so instead of leaving the last run's figures)."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else "CPU (smoke settings)"
    lines = [
        "<!-- zero3:gpu:begin (written by benchmarks/gpu_suite.py) -->",
        "",
        f"Last `make bench-gpu` run: {device}, torch {torch.__version__}, the TRL recipe "
        f"(`recipes/configs/trl/tiny_cpu.yaml`) under `recipes/deepspeed/zero3.json`, {steps} steps"
        f"{'' if smoke else ', bf16'}: {outcome['status']} in {outcome['seconds']} s.",
        "",
    ]
    checks = outcome.get("checks")
    if checks:
        lines += ["| check | value |", "|---|---|"]
        for key, value in checks.items():
            if key == "losses":
                value = f"{len(value)} losses, first {value[0]:.4f}, last {value[-1]:.4f}" if value else "none"
            lines.append(f"| `{key}` | {value} |")
    else:
        lines.append("No checks: the run did not finish (see the suite's log).")
    lines += ["", "<!-- zero3:gpu:end -->"]
    return "\n".join(lines)


def zero3_checks(run_dir: Path, report: Path) -> dict[str, Any]:
    """What the ZeRO-3 run ended with, checked: every entry true, and ``ALL_OK`` their conjunction."""
    import math

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplan import LoraPlan, load_adapter

    facts = json.loads(report.read_text(encoding="utf-8"))
    plan = LoraPlan.from_dict(facts["plan"])
    checks: dict[str, Any] = {"engine": [facts["engine"], facts["zero_stage"]]}
    checks["engine_ok"] = facts["engine"] == "DeepSpeedEngine" and facts["zero_stage"] == 3
    checks["losses_finite"] = bool(facts["losses"]) and all(math.isfinite(v) for v in facts["losses"])
    checks["live_layers_ok"] = sorted(int(i) for i, m in facts["layers"].items() if m) == plan.adapted_layers
    checks["live_ties_ok"] = all(
        facts["layers"][str(member)][name]["lora_A_id"] == facts["layers"][str(group[0])][name]["lora_A_id"]
        for group in plan.share_groups
        for member in group[1:]
        for name in facts["layers"][str(member)]
    )
    checks["no_reentrant"] = all("'use_reentrant': False" in k for k in facts["model_checkpointing"])
    weights = load_file(run_dir / "adapter_model.safetensors")
    checks["saved_layers_ok"] = (
        sorted({int(k.split(".layers.")[1].split(".")[0]) for k in weights}) == plan.adapted_layers
    )
    # each share group written once per layer, equal values; and its shared lora_B trained off its zero start
    pairs = [
        (key, key.replace(f".layers.{member}.", f".layers.{group[0]}."))
        for group in plan.share_groups
        for member in group[1:]
        for key in weights
        if f".layers.{member}." in key
    ]
    checks["saved_ties_equal"] = bool(pairs) == bool(plan.share_groups) and all(
        torch.equal(weights[a], weights[b]) for a, b in pairs
    )
    shared_b = [k for g in plan.share_groups for k in weights if f".layers.{g[0]}." in k and "lora_B" in k]
    checks["shared_lora_B_moved"] = bool(shared_b) and all(bool(weights[k].abs().sum() > 0) for k in shared_b)
    base = facts["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    batch = tokenizer(["A fine cup of tea.", "Stale and bitter, never again."], return_tensors="pt", padding=True)
    with torch.no_grad():
        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run_dir)).eval()
        ours = load_adapter(AutoModelForCausalLM.from_pretrained(base), run_dir).eval()
        got, again = stock(**batch).logits[..., :256].float(), ours(**batch).logits[..., :256].float()
    trained = torch.tensor(facts["probe_logits"])
    checks["stock_vs_trained_maxdiff"] = float((got - trained).abs().max())
    checks["stock_vs_loraplan_reload_maxdiff"] = float((got - again).abs().max())
    checks["reload_ok"] = checks["stock_vs_trained_maxdiff"] < 2e-2 and checks["stock_vs_loraplan_reload_maxdiff"] == 0
    judged = ("losses_finite", "no_reentrant", "saved_ties_equal", "shared_lora_B_moved")
    checks["ALL_OK"] = all(v for k, v in checks.items() if k.endswith("_ok") or k in judged)
    return checks


def sft(out: Path, smoke: bool, log: Path, limit: float, jobs: int) -> dict[str, Any]:
    """Every (configuration, seed) cell as its own quality.py process, ``jobs`` at a time on the one GPU."""
    config = "benchmarks/quality_smoke.yaml" if smoke else "benchmarks/quality.yaml"
    methods = ("all", "random") if smoke else SFT_METHODS
    seeds = (0,) if smoke else (0, 1, 2)
    cells = [(m, s) for m in methods for s in seeds]
    settings = [] if smoke else SFT_SETTINGS
    task = "smollm2_sft"
    started, deadline = time.perf_counter(), time.perf_counter() + limit
    running: list[tuple[subprocess.Popen, Path]] = []
    outputs = []
    with log.open("a", encoding="utf-8") as sink:
        while cells or running:
            while cells and len(running) < jobs:
                method, seed = cells.pop(0)
                output = out / f"sft_{method}_{seed}.jsonl"
                output.unlink(missing_ok=True)
                command = [sys.executable, "benchmarks/quality.py", "--config", config, "--output", str(output)]
                command += ["--only", task, "--methods", method, f"seeds=[{seed}]", *settings]
                running.append(
                    (subprocess.Popen(command, cwd=REPO, env=_env(), stdout=sink, stderr=subprocess.STDOUT), output)
                )
                outputs.append(output)
            time.sleep(1)
            for process, output in list(running):
                if process.poll() is not None:
                    running.remove((process, output))
            if time.perf_counter() > deadline:
                for process, _ in running:
                    process.kill()
                running.clear()
                cells.clear()
                break
    records = [json.loads(line) for path in outputs if path.is_file() for line in path.read_text().splitlines() if line]
    combined = out / "quality_sft.jsonl"
    combined.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    runs = [r for r in records if r.get("type") == "run"]
    from _markdown import write_block

    block = sft_table(runs, records)
    doc = out / "results.md" if smoke else REPO / "docs" / "results.md"
    write_block(doc, "<!-- quality:sft-gpu:begin", "<!-- quality:sft-gpu:end -->", block)
    status = "ok" if len(runs) >= len(methods) * len(seeds) else f"{len(runs)} of {len(methods) * len(seeds)} cells"
    return {"status": status, "seconds": round(time.perf_counter() - started, 1), "cells": len(runs)}


def sft_table(runs: list[dict[str, Any]], records: list[dict[str, Any]]) -> str:
    """The SFT rows as a markdown block: accuracy per seed, LoRA parameters, train seconds, and the majority class."""
    import statistics

    task = next((r for r in records if r.get("type") == "task"), {})
    settings = task.get("settings") or {}
    training = settings.get("training") or {}
    environment = next((r.get("environment") for r in records if r.get("environment")), {}) or {}
    lines = [
        "<!-- quality:sft-gpu:begin (written by benchmarks/gpu_suite.py) -->",
        "",
        f"SmolLM2-135M-Instruct, TRL SFTTrainer + LoraPlanCallback, {training.get('max_steps')} steps x "
        f"{training.get('per_device_train_batch_size')}, lr {training.get('learning_rate')}, "
        f"{settings.get('review_tokens')}-token reviews, {task.get('test_examples')} test reviews (majority class "
        f"{task.get('majority')}); {environment.get('cpu')}, cuda {environment.get('cuda')}; torch "
        f"{environment.get('torch')}, transformers {environment.get('transformers')}, peft {environment.get('peft')}, "
        f"trl {environment.get('trl')}.",
        "",
        "| configuration | accuracy by seed | mean | LoRA params | train seconds (mean) |",
        "|---|---|---:|---:|---:|",
    ]
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        accuracies = ", ".join(f"{r['accuracy']:.3f} (s{r['seed']})" for r in mine)
        mean = statistics.mean(r["accuracy"] for r in mine)
        seconds = statistics.mean(r["train_seconds"] for r in mine)
        lines.append(f"| {method} | {accuracies} | {mean:.3f} | {mine[0]['lora_params']:,} | {seconds:.1f} |")
    lines += ["", "<!-- quality:sft-gpu:end -->"]
    return "\n".join(lines)


def _ok(result: dict[str, Any]) -> bool:
    """A part's outcome is ok when its status (and every nested one) is."""
    if "status" in result:
        return result["status"] == "ok" and result.get("checks", {}).get("ALL_OK", True)
    return all(_ok(value) for value in result.values() if isinstance(value, dict))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings on the CPU, into --out only")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu"), help="results directory")
    parser.add_argument("--only", default=None, help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--jobs", type=int, default=11, help="SFT runs at a time on the GPU (21 cells: two waves)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "suite.log"
    parts = args.only.split(",") if args.only else list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; the parts are {', '.join(PARTS)}")
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            parser.error("the GPU suite needs a CUDA device; on a CPU run it with --smoke")
    summary: dict[str, Any] = {}
    for part in parts:
        limit = LIMITS[part] * (3 if args.smoke else 1)
        print(f"gpu_suite: {part} (limit {limit} s)", flush=True)
        if part == "sft":
            summary[part] = sft(out, args.smoke, log, limit, args.jobs)
        else:
            summary[part] = globals()[part](out, args.smoke, log, limit)
        print(f"gpu_suite: {part}: {json.dumps(summary[part])}", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    failed = [part for part, result in summary.items() if not _ok(result)]
    print(f"gpu_suite: {'every part ok' if not failed else 'not ok: ' + ', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
