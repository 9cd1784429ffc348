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
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers, also when loaded by path
from _markdown import write_block  # noqa: E402

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PRESETS: dict[str, dict[str, Any]] = {
    # a tiny random Llama: the benchmark's own smoke test (seconds)
    "smoke": dict(model="tiny", layers=8, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, batch=2,
                  seq_len=32, dtype="float32", device="cpu", rank=4, repeats=2, warmup=1, cka_samples=16,
                  cka_max_length=32),
    # DESIGN §5 CPU settings: SmolLM2-135M (real weights when installed, else its shape at random init), fp32,
    # batch 4 x 256, r=16 on all seven projections, median of 5
    "cpu": dict(model="smollm2", batch=4, seq_len=256, dtype="float32", device="cpu", rank=16, repeats=5, warmup=1,
                cka_samples=128, cka_max_length=256),
    # DESIGN §5 GPU settings: TinyLlama-1.1B shape at random init, bf16, batch 8 x 1024, r=16, median of 8
    "gpu": dict(model="tinyllama", layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000,
                batch=8, seq_len=1024, dtype="bfloat16", device="cuda", rank=16, repeats=8, warmup=2, cka_samples=128,
                cka_max_length=256),
}
SMOLLM2_SHAPE = dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)


@dataclass
class Config:
    """One measured configuration."""

    plan: str
    layers: list[int]
    checkpointing: bool
    mode: str  # "all layers", "stock PEFT", "stock PEFT, input grads off", "loraplan"
    times: list[float] = field(default_factory=list)
    #: layers that ran without autograd (loraplan's truncation, as installed when the configuration ran)
    truncated: list[int] = field(default_factory=list)
    peak_bytes: float | None = None
    predicted_time: float | None = None
    predicted_memory: float | None = None
    predicted_flops: float | None = None

    @property
    def key(self) -> str:
        return f"{self.plan}|{self.mode}|{'ckpt' if self.checkpointing else 'no-ckpt'}"


# -- the model and the plans ----------------------------------------------------------------------------------------


def build_model(settings: dict[str, Any]):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, settings["dtype"])
    source = "random init"
    if settings["model"] == "smollm2":
        try:
            from loraplan.assets import smollm2_path

            path = smollm2_path(quiet=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            return model, f"SmolLM2-135M-Instruct (real weights, {path})", path
        except Exception as exc:  # noqa: BLE001 - the shape is what matters for speed; say what was used
            print(f"step_time: SmolLM2 is not available ({exc}); timing its shape at random init", file=sys.stderr)
            settings = {**settings, **SMOLLM2_SHAPE}
            source = "SmolLM2-135M shape, random init"
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=settings["hidden"],
        intermediate_size=settings["intermediate"],
        num_attention_heads=settings["heads"],
        num_key_value_heads=settings["kv_heads"],
        num_hidden_layers=settings["layers"],
        vocab_size=settings["vocab"],
        max_position_embeddings=max(2048, settings["seq_len"]),
        tie_word_embeddings=settings["model"] == "smollm2",
    )
    model = LlamaForCausalLM(config).to(dtype)
    name = {"tiny": "tiny Llama", "tinyllama": "TinyLlama-1.1B shape"}.get(settings["model"], source)
    return model, f"{name} ({settings['layers']} layers, d={settings['hidden']}, random init)", None


def calibration_data(settings: dict[str, Any], model_path: Any, vocab: int):
    """Real reviews through the real tokenizer when the model is real, else random tokens."""
    if model_path is not None:
        from transformers import AutoTokenizer

        from loraplan.assets import fine_foods

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        texts = [r["text"] for r in fine_foods("train")[: settings["cka_samples"]]]
        return texts, tokenizer, "the first {} Fine Foods training reviews".format(len(texts))
    g = torch.Generator().manual_seed(0)
    n, length = settings["cka_samples"], settings["cka_max_length"]
    batches = [
        {"input_ids": torch.randint(3, vocab, (8, length), generator=g), "attention_mask": torch.ones(8, length, dtype=torch.long)}
        for _ in range(max(1, n // 8))
    ]
    return batches, None, f"{n} random token sequences"


def make_plans(model, settings: dict[str, Any], model_path: Any, time_budget: float | None):
    from loraplan import PlanConfig, make_plan

    data, tokenizer, described = calibration_data(settings, model_path, model.config.vocab_size)
    common = dict(
        calibration_samples=settings["cka_samples"], max_length=settings["cka_max_length"], batch_size=8,
        target_modules=ALL_TARGETS, cost_shape=[settings["batch"], settings["seq_len"]], stability=False,
    )
    model.to(settings["device"])
    plans = {}
    # the fixed baselines ignore the data: a minimal calibration pass is enough for them
    fixed = {**common, "calibration_samples": 8, "max_length": 16}
    for name, selector in (("top half", "top"), ("bottom half", "bottom"), ("every other", "every_other")):
        plans[name] = make_plan(model, data, PlanConfig(selector=selector, ratio=0.5, **fixed), tokenizer,
                                lora_rank=settings["rank"], progress=False)
    plans["CKA"] = make_plan(model, data, PlanConfig(selector="cka", ratio=0.5, **common), tokenizer,
                             lora_rank=settings["rank"], progress=False)
    if time_budget is not None:
        config = PlanConfig(selector="cka", time_budget=time_budget, cost_model="timed", **common)
        plans[f"CKA, time_budget={time_budget}"] = make_plan(model, data, config, tokenizer, lora_rank=settings["rank"],
                                                              progress=False)
    return plans, described


def shared_copy(model):
    """A second module tree over the same parameter and buffer tensors (no extra weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


# -- switching a model between configurations -----------------------------------------------------------------------


def _checkpointing(model):
    """``(is_on, enable(non_reentrant), disable)`` under the transformers >= 5.23 names, else under the older
    ``gradient_checkpointing`` ones (the GPU machine ships transformers 5.17)."""
    if hasattr(model, "activation_checkpointing_enable"):
        return (lambda: model.is_activation_checkpointing,
                lambda: model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}),
                model.activation_checkpointing_disable)
    return (lambda: model.is_gradient_checkpointing,
            lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}),
            model.gradient_checkpointing_disable)


def configure(peft_model, plan, config: Config) -> None:
    from loraplan import apply_plan, remove_truncation

    base = peft_model.base_model.model
    base.disable_input_require_grads()
    is_on, enable, disable = _checkpointing(base)
    if config.checkpointing:
        if not is_on():
            enable()
        else:
            base.enable_input_require_grads()
    else:
        if is_on():
            disable()
        if config.mode not in ("stock PEFT, input grads off", "all layers"):
            base.enable_input_require_grads()
    if config.mode == "loraplan":
        apply_plan(peft_model, plan)
    else:
        remove_truncation(peft_model)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(model, optimizer, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def static_bytes(model, optimizer) -> float:
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return float(sum(seen.values()))


def peak_step_bytes(model, optimizer, batch, device: str) -> float:
    """Bytes alive at the start of a step plus the peak growth during it."""
    base = static_bytes(model, optimizer)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, optimizer, batch)
        torch.cuda.synchronize()
        return base + torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, optimizer, batch)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return base + peak


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


def run(settings: dict[str, Any], time_budget: float | None = None, seed: int = 0, log=print) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from loraplan.cost import flop_costs, measure_costs, predict
    from loraplan.truncate import truncation_of

    device = settings["device"]
    info = machine(settings)
    started = time.perf_counter()
    base, described_model, model_path = build_model(settings)
    plans, described_data = make_plans(base, settings, model_path, time_budget)
    base.to(device).train()
    num_layers = base.config.num_hidden_layers
    lora = LoraConfig(r=settings["rank"], lora_alpha=2 * settings["rank"], lora_dropout=0.0, target_modules=ALL_TARGETS)
    log(f"step_time: model {described_model}; plans: " + "; ".join(f"{k} {p.selected_layers}" for k, p in plans.items()))

    models: dict[str, Any] = {}
    optimizers: dict[str, Any] = {}
    all_layers = get_peft_model(shared_copy(base), lora)
    models["all layers"] = all_layers
    for name, plan in plans.items():
        models[name] = get_peft_model(shared_copy(base), plan.to_lora_config(lora))
    for name, model in models.items():
        model.to(device).train()
        optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    configs: list[Config] = []
    for checkpointing in (True, False):
        configs.append(Config("all layers", list(range(num_layers)), checkpointing, "all layers"))
        for name, plan in plans.items():
            configs.append(Config(name, plan.selected_layers, checkpointing, "stock PEFT"))
            if not checkpointing and name == "top half":
                configs.append(Config(name, plan.selected_layers, checkpointing, "stock PEFT, input grads off"))
            configs.append(Config(name, plan.selected_layers, checkpointing, "loraplan"))

    # the cost model, timed on this device in this process before the steps
    costs = measure_costs(base, targets=ALL_TARGETS, rank=settings["rank"], batch=settings["batch"], seq_len=settings["seq_len"])
    flops = flop_costs(base, targets=ALL_TARGETS, rank=settings["rank"], batch=settings["batch"], seq_len=settings["seq_len"])
    for config in configs:
        kwargs = dict(checkpointing=config.checkpointing, truncate=config.mode == "loraplan")
        if config.mode != "loraplan":
            kwargs["input_grads"] = config.checkpointing or config.mode == "stock PEFT"
        for model_costs, attr in ((costs, "predicted_time"), (flops, "predicted_flops")):
            reference = predict(model_costs, range(num_layers), checkpointing=config.checkpointing, truncate=False)
            prediction = predict(model_costs, config.layers, **kwargs)
            setattr(config, attr, prediction.time / reference.time)
            if attr == "predicted_time":
                config.predicted_memory = prediction.memory / reference.memory

    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(3, base.config.vocab_size, (settings["batch"], settings["seq_len"]), generator=g).to(device)
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
    for config in configs:
        model, optimizer = models[config.plan], optimizers[config.plan]
        configure(model, plans.get(config.plan), config)
        config.peak_bytes = peak_step_bytes(model, optimizer, batch, device)
    info["load average after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info["wall time"] = f"{time.perf_counter() - started:.0f} s"
    settings_out = {
        "model": described_model,
        "dtype": settings["dtype"],
        "device": device,
        "batch": f"{settings['batch']} x {settings['seq_len']} tokens",
        "LoRA": f"r={settings['rank']}, alpha={2 * settings['rank']}, dropout 0, on {', '.join(ALL_TARGETS)}",
        "step": "forward + backward + AdamW on one batch of random tokens",
        "checkpointing": "non-reentrant (activation_checkpointing_enable), or none",
        "rounds": f"{settings['warmup']} warm-up + {settings['repeats']} timed, configurations shuffled each round",
        "CKA plan": f"ratio 0.5, calibrated on {described_data} (max_length {settings['cka_max_length']})",
    }
    return {
        "machine": info,
        "settings": settings_out,
        "plans": {k: p.selected_layers for k, p in plans.items()},
        "budget": {k: p.cost.get("budget", {}).get("summary") for k, p in plans.items() if "budget" in p.cost},
        "cost_model": costs.to_dict(),
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
    header = ("| plan | layers (lowest) | checkpointing | mode | median step | tokens/s | peak memory | time ratio | "
              "predicted (timed) | error | predicted (FLOPs) | memory ratio | predicted memory |")
    lines += [header, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['plan']} | {r['layers']} ({r['lowest']}) | {'yes' if r['checkpointing'] else 'no'} | {r['mode']} | "
            f"{r['median_s'] * 1000:.0f} ms | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**20:.0f} MiB | "
            f"{r['time_ratio']:.2f}x | {r['predicted_time_ratio']:.2f}x | {r['prediction_error'] * 100:+.0f} % | "
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
    parser.add_argument("--time-budget", type=float, default=None,
                        help="also time the plan PlanConfig(selector='cka', time_budget=...) makes")
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
