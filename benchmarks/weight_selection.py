"""Weight-only planning at scale: ``loraplan analyze DIR --selector snr`` streamed from a checkpoint's shards,
against the same selector on the model loaded in memory and a CKA calibration pass on that model.

The checkpoint has the TinyLlama-1.1B shape in bf16 (22 layers, hidden 2048, MLP 5632, 32 heads / 4 KV heads,
vocab 32000; about 2.2 GB in 4 shards), written tensor by tensor at random init with a low-rank component whose
strength differs per layer (so that the SNR ranks the layers). Measured:

- ``stream``: the CLI in a child process (no ``--data``), its wall time and peak resident memory (``ru_maxrss`` of the
  child); the contract is a peak below 1.2 GB and the same layers as the model in memory;
- ``in memory``: ``make_plan(model, None, snr)`` on the model loaded from the directory (the same layers?);
- ``cka pass``: ``make_plan(model, batches, cka)`` on random token batches (``--cka-samples`` x ``--cka-length``).

The seconds per billion parameters and a 70B estimate (Llama-3-70B shapes, scaled by the Gram products' and
eigendecompositions' FLOPs rather than by the parameter count, which would understate it) are in the JSON.

    python benchmarks/weight_selection.py --dir .cache/tinyllama-shape \
        --json benchmarks/results/weight_selection_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
#: Llama-3-70B: hidden 8192, MLP 28672, 80 layers, 64 heads / 8 KV heads (head dim 128)
SHAPE_70B = {"hidden": 8192, "mlp": 28672, "layers": 80, "kv": 1024, "params": 70.6e9}


def _layer_tensors(layer: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    h, m, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["hidden_size"] // 8
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (m, h),
        "mlp.up_proj": (m, h),
        "mlp.down_proj": (h, m),
    }
    strength = 0.2 + 0.8 * ((layer * 7) % 11) / 10  # a different share of signal in every layer
    out = {}
    for name, (rows, cols) in shapes.items():
        noise = torch.randn(rows, cols, generator=generator) * 0.02
        low = torch.randn(rows, 8, generator=generator) @ torch.randn(8, cols, generator=generator)
        out[f"model.layers.{layer}.{name}.weight"] = (noise + low * (strength * 0.02 / 8**0.5)).to(torch.bfloat16)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{layer}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def make_checkpoint(directory: Path, shards: int = 4) -> None:
    """Write the checkpoint shard by shard (at most one shard's tensors in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    directory.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        **SHAPE, tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"]
    ).save_pretrained(directory)
    g = torch.Generator().manual_seed(0)
    layers = SHAPE["num_hidden_layers"]
    per = -(-layers // shards)
    weight_map: dict[str, str] = {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        if shard == 0:
            tensors["model.embed_tokens.weight"] = (torch.randn(32000, 2048, generator=g) * 0.02).to(torch.bfloat16)
        for layer in range(shard * per, min(layers, (shard + 1) * per)):
            tensors.update(_layer_tensors(layer, g))
        if shard == shards - 1:
            tensors["model.norm.weight"] = torch.ones(2048, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = (torch.randn(32000, 2048, generator=g) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _gram_flops(rows: int, cols: int) -> float:
    k, n = min(rows, cols), max(rows, cols)
    return 2.0 * k * k * n + 10.0 * k**3  # the Gram product, and eigvalsh (tridiagonalisation ~ 4/3 k^3, QR)


def _flops(hidden: int, mlp: int, kv: int, layers: int) -> float:
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden)]
    shapes.append((hidden, mlp))
    return layers * sum(_gram_flops(r, c) for r, c in shapes)


def stream(directory: Path, out: Path) -> dict[str, float]:
    """The CLI in a child process: wall seconds and the child's peak resident memory."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "loraplan.cli", "analyze", str(directory), "--selector", "snr", "--ratio", "0.5"]
    subprocess.run([*cmd, "--out", str(out), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
    return {"seconds": round(seconds, 1), "peak_rss_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(".cache/tinyllama-shape"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cka-samples", type=int, default=16)
    parser.add_argument("--cka-length", type=int, default=128)
    parser.add_argument("--skip-memory", action="store_true", help="stream only (no in-memory plan, no CKA pass)")
    args = parser.parse_args(argv)
    if not (args.dir / "model.safetensors.index.json").is_file():
        started = time.perf_counter()
        make_checkpoint(args.dir)
        print(f"checkpoint written in {time.perf_counter() - started:.0f} s", flush=True)
    from loraplan import LoraPlan, PlanConfig, make_plan
    from loraplan.checkpoint import checkpoint_size

    size = checkpoint_size(args.dir)
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__}
    result["checkpoint"] = {**size, "shape": SHAPE, "dtype": "bfloat16"}
    streamed = stream(args.dir, args.dir.parent / "weight_selection_plan.json")
    plan = LoraPlan.load(args.dir.parent / "weight_selection_plan.json")
    billions = size["parameters"] / 1e9
    seconds_per_flop = streamed["seconds"] / _flops(2048, 5632, 256, 22)
    result["stream"] = {
        **streamed,
        "selected_layers": plan.selected_layers,
        "seconds_per_billion_parameters": round(streamed["seconds"] / billions, 1),
        "estimate_70b_seconds": round(seconds_per_flop * _flops(8192, 28672, 1024, 80)),
        "estimate_70b_by_parameters_seconds": round(streamed["seconds"] / billions * SHAPE_70B["params"] / 1e9),
    }
    print(json.dumps(result["stream"]), flush=True)
    if not args.skip_memory:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16)
        started = time.perf_counter()
        memory = make_plan(model, None, PlanConfig(selector="snr", ratio=0.5), progress=False)
        result["in_memory"] = {"seconds": round(time.perf_counter() - started, 1), "layers": memory.selected_layers}
        result["same_layers"] = memory.selected_layers == plan.selected_layers
        result["same_scores"] = memory.scores["snr"] == plan.scores["snr"]
        g = torch.Generator().manual_seed(0)
        batches = [
            {
                "input_ids": (ids := torch.randint(3, 32000, (8, args.cka_length), generator=g)),
                "attention_mask": torch.ones_like(ids),
            }
            for _ in range(args.cka_samples // 8)
        ]
        started = time.perf_counter()
        cka = make_plan(
            model, batches, PlanConfig(selector="cka", ratio=0.5, calibration_samples=args.cka_samples), progress=False
        )
        result["cka_pass"] = {
            "seconds": round(time.perf_counter() - started, 1),
            "samples": args.cka_samples,
            "tokens_per_sample": args.cka_length,
            "layers": cka.selected_layers,
        }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
