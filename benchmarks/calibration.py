"""Calibration cost: loraplan's statistics versus a bare forward over the same batches.

Measures, side by side in one run and interleaved round by round:

- ``bare forward``: the backbone's forward over the calibration batches (no hooks, ``no_grad``), which is the
  least any calibration can cost;
- ``statistics``: :func:`loraplan.calibration.calibrate` collecting every forward statistic (pooled hidden
  states for CKA and ShareLoRA, target-module input norms for activation selection);
- ``bare forward+backward`` and ``gradient statistics``: the same for the gradient pass (loss, backward, and
  the per-layer gradient norms).

Peak memory: on CUDA, ``max_memory_allocated`` of each mode; on CPU, the peak resident set of a separate child
process per mode above its resident set after loading the model.

    python benchmarks/calibration.py                      # SmolLM2-135M on real reviews, CPU
    python benchmarks/calibration.py --device cuda --dtype bfloat16 --samples 256 --max-length 512
    python benchmarks/calibration.py --write-doc docs/benchmarks/calibration.md
    python benchmarks/calibration.py --shape llama8b --device cuda --dtype bfloat16 --samples 128 --max-length 512 \
        --methods --write-doc docs/benchmarks/calibration.md      # the 8B shape at random init, every method
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers, also when loaded by path
from _markdown import write_block  # noqa: E402

from loraplan import PlanConfig  # noqa: E402
from loraplan.calibration import calibrate, loss_labels, model_inputs  # noqa: E402
from loraplan.data import prepare_batches  # noqa: E402
from loraplan.layers import find_layers  # noqa: E402
from loraplan.strategies import ACTIVATIONS, GRADIENTS, HIDDEN  # noqa: E402

MODES = ("bare", "stats", "bare_grad", "grad")
LABELS = {
    "bare": "bare forward",
    "stats": "statistics (hidden + activations)",
    "bare_grad": "bare forward+backward",
    "grad": "gradient statistics",
}


#: shapes at random init (``--shape``): what a GPU run measures without weights (random tokens as the data)
SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}  # fmt: skip
#: the plans ``--methods`` times end to end with make_plan (what the H200 table of docs/benchmarks/calibration.md has)
METHODS = {
    "CKA": dict(selector="cka"),
    "CKA + angular sharing": dict(selector="cka", share="angular", share_threshold=0.85),
    "activation": dict(selector="activation"),
    "gradient": dict(selector="gradient"),
    "CKA, importance ranks at param_budget 0.5": dict(
        selector="cka", rank_policy="importance", param_budget=0.5, min_rank=4, rank_multiple=4
    ),
    "CKA, time_budget 0.6": dict(selector="cka", time_budget=0.6),
    "LoRA-drop (16 warm-up steps, cumulative 0.9)": dict(selector="lora_drop", lora_drop_steps=16, cumulative=0.9),
}


def _random_setup(args: argparse.Namespace):
    """A random-init Llama of ``--shape`` and random token sequences of ``--max-length`` (no assets needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(2048, args.max_length))
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (args.samples, args.max_length), generator=g)
    rows = [{"input_ids": ids[i : i + 1], "attention_mask": torch.ones_like(ids[i : i + 1])} for i in range(len(ids))]
    plan_config = PlanConfig(calibration_samples=args.samples, max_length=args.max_length, batch_size=args.batch_size)
    data = prepare_batches(rows, plan_config, None, model.config)
    return model, find_layers(model), data, plan_config, f"{args.shape} shape (random init)"


def _setup(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplan.assets import fine_foods, minilm_path, smollm2_path

    if args.shape:
        return _random_setup(args)

    paths = {"smollm2": lambda: smollm2_path(quiet=True), "minilm": minilm_path}
    path = paths.get(args.model, lambda: Path(args.model))()
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [r["text"] for r in fine_foods("train")[: args.samples]]
    config = PlanConfig(calibration_samples=args.samples, max_length=args.max_length, batch_size=args.batch_size)
    data = prepare_batches(texts, config, tokenizer, model.config)
    stack = find_layers(model)
    return model, stack, data, config, str(path)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run(mode: str, model, stack, data, config, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    if mode == "bare":
        with torch.no_grad():
            for batch in data.batches:
                stack.backbone(**model_inputs(stack.backbone, batch, torch.device(device)))
    elif mode == "stats":
        calibrate(model, stack, data, frozenset({HIDDEN, ACTIVATIONS}), config, progress=False)
    elif mode == "bare_grad":
        params = [p for layer in stack.layers for p in layer.parameters() if p.dim() == 2]
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for batch in data.batches:
            inputs = model_inputs(model, batch, torch.device(device))
            inputs["labels"] = loss_labels(model, batch).to(device)
            model(**inputs).loss.backward()
            for p in params:
                p.grad = None
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    elif mode == "grad":
        calibrate(model, stack, data, frozenset({GRADIENTS}), config, progress=False)
    _sync(device)
    return time.perf_counter() - start


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(args: argparse.Namespace) -> None:
    """One mode in a fresh process: the peak resident set above the loaded model, sampled every 2 ms.

    The parent starts this process with ``MALLOC_MMAP_THRESHOLD_`` low, so large buffers are returned to the
    system when freed and the resident set follows what is really in use.
    """
    import gc
    import threading

    model, stack, data, config, _ = _setup(args)
    gc.collect()
    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _run(args.child, model, stack, data, config, args.device)
    done.set()
    sampler.join()
    print(json.dumps({"mode": args.child, "peak_over_loaded_mib": peak[0] - base, "loaded_mib": base}))


def _memory(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in MODES:
        command = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
        result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        out[mode] = json.loads(result.stdout.strip().splitlines()[-1])["peak_over_loaded_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, minilm or a transformers directory")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode memory measurement")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--write-doc", default=None, help="write a markdown report here")
    parser.add_argument("--child", default=None, choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="a random-init shape instead of --model")
    parser.add_argument(
        "--methods", action="store_true", help="also time make_plan end to end for every method (its own table)"
    )
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    model, stack, data, config, path = _setup(args)
    for mode in MODES:  # warm-up
        _run(mode, model, stack, data, config, args.device)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for round_number in range(args.repeats):
        order = MODES if round_number % 2 == 0 else MODES[::-1]
        for mode in order:
            times[mode].append(_run(mode, model, stack, data, config, args.device))
        print(
            f"round {round_number + 1}/{args.repeats}: " + ", ".join(f"{m} {times[m][-1]:.3f}s" for m in MODES),
            flush=True,
        )

    memory: dict[str, float] = {}
    if args.device.startswith("cuda"):
        loaded = torch.cuda.memory_allocated()
        for mode in MODES:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            _run(mode, model, stack, data, config, args.device)
            memory[mode] = (torch.cuda.max_memory_allocated() - loaded) / 2**20
    elif not args.no_memory:
        memory = _memory(args)

    median = {m: statistics.median(v) for m, v in times.items()}
    result = {
        "model": path,
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine()
        ),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "samples": data.num_samples,
        "tokens": data.num_tokens,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "median_s": median,
        "all_s": times,
        "overhead_forward": median["stats"] / median["bare"] - 1,
        "overhead_gradient": median["grad"] / median["bare_grad"] - 1,
        "peak_memory_mib": memory,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if args.methods:
        result["methods"] = _methods(model, data, args)
    report = _markdown(result)
    print(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.write_doc:
        _write_doc(Path(args.write_doc), "gpu" if args.device.startswith("cuda") else "cpu", report)


def _methods(model, data, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """``make_plan`` end to end for each of :data:`METHODS` on the same batches: wall time and peak memory (CUDA)."""
    from loraplan import make_plan

    rows = [{"input_ids": b["input_ids"][i : i + 1], "attention_mask": b["attention_mask"][i : i + 1]}
            for b in data.batches for i in range(b["input_ids"].shape[0])]  # fmt: skip
    out = {}
    for name, settings in METHODS.items():
        config = PlanConfig(
            calibration_samples=args.samples,
            max_length=args.max_length,
            batch_size=args.batch_size,
            cost_shape=[args.batch_size, args.max_length],
            **settings,
        )
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _sync(args.device)
        started = time.perf_counter()
        plan = make_plan(model, rows, config, lora_rank=16, progress=False)
        _sync(args.device)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
        out[name] = {"seconds": seconds, "peak_gib": peak, "layers": len(plan.adapted_layers)}
        print(f"methods: {name}: {seconds:.2f} s", flush=True)
    return out


def _write_doc(path: Path, kind: str, report: str) -> None:
    """Replace this device kind's block in ``path`` (between its markers), keeping the hand-written text around
    it; a missing page or block is added."""
    begin, end = f"<!-- calibration:{kind}:begin -->", f"<!-- calibration:{kind}:end -->"
    write_block(path, begin, end, f"{begin}\n{report}\n{end}")


def _markdown(r: dict) -> str:
    import transformers

    mem = r["peak_memory_mib"]
    memory_kind = (
        "CUDA max_memory_allocated" if r["device"].startswith("cuda") else "peak RSS of a fresh process per mode"
    ) + ", above the loaded model"
    lines = [
        f"Model `{Path(r['model']).name}`, {r['samples']} samples ({r['tokens']} tokens, max length "
        f"{r['max_length']}, batch {r['batch_size']}), {r['dtype']}, device {r['device']} ({r['device_name']}, "
        f"{r['cpu_count']} cores, {r['threads']} torch threads); torch {r['versions']['torch']}, transformers "
        f"{transformers.__version__}; median of {r['repeats']} interleaved rounds.",
        "",
        f"| pass | median time | vs bare | peak memory ({memory_kind}) |",
        "|---|---|---|---|",
    ]
    for mode, bare in (("bare", "bare"), ("stats", "bare"), ("bare_grad", "bare_grad"), ("grad", "bare_grad")):
        ratio = r["median_s"][mode] / r["median_s"][bare]
        peak = f"{mem[mode]:.0f} MiB" if mode in mem else "not measured"
        lines.append(f"| {LABELS[mode]} | {r['median_s'][mode]:.3f} s | {ratio:.3f}× | {peak} |")
    lines += [
        "",
        f"Forward statistics cost **{r['overhead_forward']:+.1%}** over the bare forward (target: ≤ +10 %); the "
        f"gradient pass costs **{r['overhead_gradient']:+.1%}** over a bare forward+backward.",
    ]
    if r.get("methods"):
        bare = r["median_s"]["bare"]
        lines += [
            "",
            "| make_plan | wall time | vs bare forward | peak memory | layers with LoRA |",
            "|---|---|---|---|---|",
        ]
        for name, m in r["methods"].items():
            peak = f"{m['peak_gib']:.1f} GiB" if m["peak_gib"] == m["peak_gib"] else "not measured"
            lines.append(f"| {name} | {m['seconds']:.2f} s | {m['seconds'] / bare:.2f}x | {peak} | {m['layers']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
