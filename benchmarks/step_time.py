"""Step time and peak memory of a plan: LoRA on every layer, the plan with stock PEFT, the plan with loraplan.

One run measures, side by side and interleaved round by round (so that a busy machine slows every row alike):

- ``all layers``: stock PEFT, LoRA on every layer (the reference of each checkpointing setting);
- for the top-half, bottom-half, every-other and CKA plans (and, with ``--time-budget``, the plan the time-budget
  selector makes from the CKA scores): ``stock PEFT`` (``layers_to_transform``, the embedding output requiring grad
  as ``activation_checkpointing_enable`` and TRL make it) and ``loraplan`` (the same model after ``apply_plan``:
  no autograd below the lowest adapted layer); without checkpointing also stock PEFT with input grads off for the
  top-half plan (what a plain ``Trainer`` does);

each with and without non-reentrant activation checkpointing. A step is forward, backward and AdamW on one batch
of random tokens. Reported: median step time, tokens/s, peak memory, the ratios to the all-layer row, and the cost
model's prediction of each ratio (timed on this device in the same process, before the steps) next to it.

Peak memory: on CUDA ``max_memory_allocated`` during a step; on CPU the peak of the allocator's live bytes during
a step (torch profiler memory events); both plus the bytes alive when the step starts (weights, LoRA, optimizer
state). All plans share one copy of the base weights.

    python benchmarks/step_time.py --preset smoke                 # seconds: a tiny model, what CI runs
    python benchmarks/step_time.py --preset cpu --write-doc docs/speed.md    # SmolLM2-135M, DESIGN §5 CPU settings
    python benchmarks/step_time.py --preset gpu --write-doc docs/speed.md    # TinyLlama shape, bf16, CUDA
    python benchmarks/step_time.py --preset llama8b --write-doc docs/speed.md    # Llama-3-8B shape, bf16, CUDA

Where a plan's lowest layer is above 0, a ``limit`` row beside ``loraplan`` measures the hand-made limit of the
truncated backward: the blocks below the cut wrapped in ``torch.no_grad()`` with their checkpointing off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers, also when loaded by path
from _markdown import write_block  # noqa: E402
from step_time_model import (  # noqa: E402
    ALL_TARGETS,
    Config,
    build_model,
    configure,
    make_plans,
    peak_step_bytes,
    shared_copy,
    step,
    sync,
)

PRESETS: dict[str, dict[str, Any]] = {
    # a tiny random Llama: the benchmark's own smoke test (seconds)
    "smoke": dict(
        model="tiny",
        layers=8,
        hidden=64,
        intermediate=128,
        heads=4,
        kv_heads=2,
        vocab=256,
        batch=2,
        seq_len=32,
        dtype="float32",
        device="cpu",
        rank=4,
        repeats=2,
        warmup=1,
        cka_samples=16,
        cka_max_length=32,
    ),
    # DESIGN §5 CPU settings: SmolLM2-135M (real weights when installed, else its shape at random init), fp32,
    # batch 4 x 256, r=16 on all seven projections, median of 5
    "cpu": dict(
        model="smollm2",
        batch=4,
        seq_len=256,
        dtype="float32",
        device="cpu",
        rank=16,
        repeats=5,
        warmup=1,
        cka_samples=128,
        cka_max_length=256,
    ),
    # DESIGN §5 GPU settings: TinyLlama-1.1B shape at random init, bf16, batch 8 x 1024, r=16, median of 8
    "gpu": dict(
        model="tinyllama",
        layers=22,
        hidden=2048,
        intermediate=5632,
        heads=32,
        kv_heads=4,
        vocab=32000,
        batch=8,
        seq_len=1024,
        dtype="bfloat16",
        device="cuda",
        rank=16,
        repeats=8,
        warmup=2,
        cka_samples=128,
        cka_max_length=256,
    ),
    # Llama-3-8B shape at random init (32 layers, d=4096, GQA 8, vocab 128,256), bf16, batch 2 x 2048, median of 5:
    # the H200 measurements' second shape (an 80 GB or larger GPU)
    "llama8b": dict(
        model="llama8b",
        layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        vocab=128256,
        batch=2,
        seq_len=2048,
        dtype="bfloat16",
        device="cuda",
        rank=16,
        repeats=5,
        warmup=2,
        cka_samples=128,
        cka_max_length=256,
    ),
}


# -- the run --------------------------------------------------------------------------------------------------------


def machine(settings: dict[str, Any]) -> dict[str, Any]:
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load average before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    if settings["device"].startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def lora_models(base, plans: dict[str, Any], settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One PEFT model per plan (and LoRA on every layer), each over the same base weights, and its AdamW."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=settings["rank"], lora_alpha=2 * settings["rank"], lora_dropout=0.0, target_modules=ALL_TARGETS)
    models: dict[str, Any] = {}
    optimizers: dict[str, Any] = {}
    all_layers = get_peft_model(shared_copy(base), lora)
    models["all layers"] = all_layers
    for name, plan in plans.items():
        models[name] = get_peft_model(shared_copy(base), plan.to_lora_config(lora))
    for name, model in models.items():
        model.to(settings["device"]).train()
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return models, optimizers


def configurations(plans: dict[str, Any], num_layers: int) -> list[Config]:
    """Every measured configuration, with and without checkpointing."""
    configs: list[Config] = []
    for checkpointing in (True, False):
        configs.append(Config("all layers", list(range(num_layers)), checkpointing, "all layers"))
        for name, plan in plans.items():
            configs.append(Config(name, plan.selected_layers, checkpointing, "stock PEFT"))
            if not checkpointing and name == "top half":
                configs.append(Config(name, plan.selected_layers, checkpointing, "stock PEFT, input grads off"))
            configs.append(Config(name, plan.selected_layers, checkpointing, "loraplan"))
            if min(plan.selected_layers) > 0:  # what loraplan is measured against: no autograd below by hand
                configs.append(Config(name, plan.selected_layers, checkpointing, "limit"))
    return configs


def predict_ratios(base, configs: list[Config], settings: dict[str, Any]):
    """The cost model's time and memory ratios to the all-layer row (timed) and its time ratio (FLOPs), set on each
    configuration; returns the timed costs. Timed on this device in this process, before the steps."""
    from loraplan.cost import fitted_costs, flop_costs, measure_costs, predict

    num_layers = base.config.num_hidden_layers
    shape = {
        "targets": ALL_TARGETS,
        "rank": settings["rank"],
        "batch": settings["batch"],
        "seq_len": settings["seq_len"],
    }
    costs = measure_costs(base, **shape)
    flops = flop_costs(base, **shape)
    fitted = fitted_costs(base, **shape)
    for config in configs:
        kwargs = dict(checkpointing=config.checkpointing, truncate=config.mode in ("loraplan", "limit"))
        if config.mode not in ("loraplan", "limit"):
            kwargs["input_grads"] = config.checkpointing or config.mode == "stock PEFT"
        for model_costs, attr in ((costs, "predicted_time"), (flops, "predicted_flops"), (fitted, "predicted_fitted")):
            reference = predict(model_costs, range(num_layers), checkpointing=config.checkpointing, truncate=False)
            prediction = predict(model_costs, config.layers, **kwargs)
            setattr(config, attr, prediction.time / reference.time)
            if attr == "predicted_time":
                config.predicted_memory = prediction.memory / reference.memory
    return costs, fitted


def time_steps(
    configs: list[Config],
    models: dict[str, Any],
    optimizers: dict[str, Any],
    plans: dict[str, Any],
    batch: torch.Tensor,
    settings: dict[str, Any],
    seed: int,
    started: float,
    log,
) -> None:
    """The timed rounds: every configuration once a round, in an order shuffled each round; the warm-up rounds
    untimed. Each configuration records its step times and the layers that ran without autograd."""
    from loraplan.truncate import truncation_of

    device = settings["device"]
    order = list(range(len(configs)))
    shuffle = random.Random(seed)
    rounds = settings["warmup"] + settings["repeats"]
    for round_index in range(rounds):
        shuffle.shuffle(order)
        for i in order:
            config = configs[i]
            model, optimizer = models[config.plan], optimizers[config.plan]
            configure(model, plans.get(config.plan), config)
            truncation = truncation_of(model)
            config.truncated = truncation.layers if truncation is not None else []
            sync(device)
            t0 = time.perf_counter()
            step(model, optimizer, batch)
            sync(device)
            if round_index >= settings["warmup"]:
                config.times.append(time.perf_counter() - t0)
        log(f"step_time: round {round_index + 1}/{rounds} done ({time.perf_counter() - started:.0f} s)")


def measure_memory(
    configs: list[Config],
    models: dict[str, Any],
    optimizers: dict[str, Any],
    plans: dict[str, Any],
    batch: torch.Tensor,
    device: str,
) -> None:
    """The peak memory of one more step of each configuration."""
    for config in configs:
        model, optimizer = models[config.plan], optimizers[config.plan]
        configure(model, plans.get(config.plan), config)
        config.peak_bytes = peak_step_bytes(model, optimizer, batch, device)


def described_settings(settings: dict[str, Any], described_model: str, described_data: str) -> dict[str, str]:
    """The settings of a run, in words, for the report."""
    return {
        "model": described_model,
        "dtype": settings["dtype"],
        "device": settings["device"],
        "batch": f"{settings['batch']} x {settings['seq_len']} tokens",
        "LoRA": f"r={settings['rank']}, alpha={2 * settings['rank']}, dropout 0, on {', '.join(ALL_TARGETS)}",
        "step": "forward + backward + AdamW on one batch of random tokens",
        "checkpointing": "non-reentrant (activation_checkpointing_enable), or none",
        "rounds": f"{settings['warmup']} warm-up + {settings['repeats']} timed, configurations shuffled each round",
        "CKA plan": f"ratio 0.5, calibrated on {described_data} (max_length {settings['cka_max_length']})",
    }


def run(settings: dict[str, Any], time_budget: float | None = None, seed: int = 0, log=print) -> dict[str, Any]:
    device = settings["device"]
    info = machine(settings)
    started = time.perf_counter()
    base, described_model, model_path = build_model(settings)
    plans, described_data = make_plans(base, settings, model_path, time_budget)
    base.to(device).train()
    log(
        f"step_time: model {described_model}; plans: " + "; ".join(f"{k} {p.selected_layers}" for k, p in plans.items())
    )
    models, optimizers = lora_models(base, plans, settings)
    configs = configurations(plans, base.config.num_hidden_layers)
    costs, fitted = predict_ratios(base, configs, settings)

    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(3, base.config.vocab_size, (settings["batch"], settings["seq_len"]), generator=g).to(device)
    time_steps(configs, models, optimizers, plans, batch, settings, seed, started, log)
    measure_memory(configs, models, optimizers, plans, batch, device)
    info["load average after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info["wall time"] = f"{time.perf_counter() - started:.0f} s"
    return {
        "machine": info,
        "settings": described_settings(settings, described_model, described_data),
        "plans": {k: p.selected_layers for k, p in plans.items()},
        "budget": {k: budget.get("summary") for k, p in plans.items() if (budget := p.cost.budget_dict()) is not None},
        "cost_model": costs.to_dict(),
        "fitted_cost_model": fitted.to_dict(),
        "rows": rows(configs, settings),
    }


def rows(configs: list[Config], settings: dict[str, Any]) -> list[dict[str, Any]]:
    tokens = settings["batch"] * settings["seq_len"]
    reference = {c.checkpointing: c for c in configs if c.mode == "all layers"}
    out = []
    for c in configs:
        ref = reference[c.checkpointing]
        median = statistics.median(c.times)
        ratio = median / statistics.median(ref.times)
        out.append(
            {
                "plan": c.plan,
                "layers": len(c.layers),
                "lowest": min(c.layers),
                "checkpointing": c.checkpointing,
                "mode": c.mode,
                "truncated": c.truncated,
                "median_s": median,
                "times_s": c.times,
                "tokens_per_s": tokens / median,
                "peak_bytes": c.peak_bytes,
                "time_ratio": ratio,
                "predicted_time_ratio": c.predicted_time,
                "prediction_error": (c.predicted_time - ratio) / ratio,
                "flops_time_ratio": c.predicted_flops,
                "fitted_time_ratio": c.predicted_fitted,
                "fitted_error": (c.predicted_fitted - ratio) / ratio,
                "memory_ratio": c.peak_bytes / ref.peak_bytes,
                "predicted_memory_ratio": c.predicted_memory,
            }
        )
    return out


# -- the report -----------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any], preset: str) -> str:
    lines = [f"<!-- step_time:{preset}:begin (written by benchmarks/step_time.py --preset {preset}) -->", ""]
    lines.append("| | |")
    lines.append("|---|---|")
    for key, value in {**result["machine"], **result["settings"]}.items():
        lines.append(f"| {key} | {value} |")
    lines.append("")
    lines.append("Plans (0-based layers): " + "; ".join(f"{k}: {v}" for k, v in result["plans"].items()) + ".")
    for name, summary in result["budget"].items():
        lines.append(f"The {name} plan: {summary}.")
    lines.append("")
    header = (
        "| plan | layers (lowest) | checkpointing | mode | median step | tokens/s | peak memory | time ratio | "
        "predicted (fitted) | error | predicted (timed) | error | predicted (FLOPs) | memory ratio | predicted memory |"
    )
    lines += [header, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['plan']} | {r['layers']} ({r['lowest']}) | {'yes' if r['checkpointing'] else 'no'} | {r['mode']} | "
            f"{r['median_s'] * 1000:.0f} ms | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**20:.0f} MiB | "
            f"{r['time_ratio']:.2f}x | {r['fitted_time_ratio']:.2f}x | {r['fitted_error'] * 100:+.0f} % | "
            f"{r['predicted_time_ratio']:.2f}x | {r['prediction_error'] * 100:+.0f} % | "
            f"{r['flops_time_ratio']:.2f}x | {r['memory_ratio']:.2f}x | {r['predicted_memory_ratio']:.2f}x |"
        )
    lines += ["", f"<!-- step_time:{preset}:end -->"]
    return "\n".join(lines)


def write_doc(path: Path, block: str, preset: str) -> None:
    """Replace this preset's block in ``path`` (between its begin/end markers), or append it."""
    write_block(path, f"<!-- step_time:{preset}:begin", f"<!-- step_time:{preset}:end -->", block)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (median over them)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="also time the plan PlanConfig(selector='cka', time_budget=...) makes",
    )
    parser.add_argument("--device", default=None, help="override the preset's device")
    parser.add_argument("--json", default=None, help="write the full results (every step time) here")
    parser.add_argument("--write-doc", default=None, help="replace this preset's table in a markdown file")
    args = parser.parse_args(argv)
    settings = dict(PRESETS[args.preset])
    for key in ("repeats", "warmup", "device"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if settings["device"].startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--preset {args.preset} needs a CUDA device; none is available (use --preset cpu or smoke)")
    result = run(settings, args.time_budget, log=lambda m: print(m, file=sys.stderr, flush=True))
    block = markdown(result, args.preset)
    print(block)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    if args.write_doc:
        write_doc(Path(args.write_doc), block, args.preset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
