"""loraplan's CKA calibration side by side with the CKA reference code, on the same tokens, each in its own process.

The reference is c2d-usp/Layer-wise-LoRA-with-CKA's ``decoder-only/select_layers_decoder.py``; it is not part of
loraplan and is not copied here: pass the path of its file (a checkout of that repository) and this script imports
its own ``extract_representations_from_autoregressive_model``, ``linear_cka`` and ``sort_layers_by_cka`` and runs them
as its ``main`` does (every hidden state, ``output_hidden_states=True``, the last non-pad token with pad = eos).
loraplan runs ``make_plan(selector="cka", last_token="reference")`` on the same strings. Both see the first N
reviews of the packaged Fine Foods data formatted as the reference formats a target (``review + "\\n" + eos``),
tokenised with the same tokenizer (max length 512): the same token ids.

Each side runs in a fresh Python process, so that its peak resident memory (``ru_maxrss``) is its own; the time is
the calibration alone (model loading excluded, the same for both). The sides alternate, ``--repeats`` times each.

    python benchmarks/calibration_reference.py --reference /path/to/select_layers_decoder.py
    python benchmarks/calibration_reference.py --reference ... --write-doc docs/benchmarks/calibration.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers (_markdown)


def _texts(samples: int, eos: str) -> list[str]:
    from loraplan.assets import fine_foods

    return [f"{r['text']}\n{eos}" for r in fine_foods("train")[:samples]]


def _model_and_tokenizer() -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplan.assets import smollm2_path

    path = smollm2_path(quiet=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=512, padding_side="right")
    tokenizer.pad_token = tokenizer.eos_token  # as the reference sets it
    return model, tokenizer


def run_reference(reference: Path, samples: int, batch_size: int) -> dict[str, Any]:
    """The reference's own functions, as its ``main`` calls them, on our tokens."""
    import importlib.util

    import torch
    from datasets import Dataset

    spec = importlib.util.spec_from_file_location("cka_reference", reference)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    model, tokenizer = _model_and_tokenizer()
    ids = [tokenizer(t, max_length=512, truncation=True).input_ids for t in _texts(samples, tokenizer.eos_token)]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    layers = len(model.model.layers)
    started = time.perf_counter()
    reps = ref.extract_representations_from_autoregressive_model(
        model=model,
        tokenizer=tokenizer,
        train_dataset=data,
        device=torch.device("cpu"),
        batch_size=batch_size,
        layers_to_extract=list(range(layers + 1)),
    )
    cka = [ref.linear_cka(reps[i], reps[i + 1]) for i in range(layers)]
    chosen = sorted(ref.sort_layers_by_cka(cka)[: int(0.5 * layers)])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "selected": chosen, "cka": cka, "tokens": sum(len(x) for x in ids)}


def run_loraplan(samples: int, batch_size: int) -> dict[str, Any]:
    from loraplan import PlanConfig, make_plan

    model, tokenizer = _model_and_tokenizer()
    texts = _texts(samples, tokenizer.eos_token)
    config = PlanConfig(
        selector="cka",
        ratio=0.5,
        calibration_samples=samples,
        batch_size=batch_size,
        max_length=512,
        last_token="reference",
    )
    started = time.perf_counter()
    plan = make_plan(model, texts, config, tokenizer, progress=False)
    seconds = time.perf_counter() - started
    flagged = {str(k): v for k, v in (plan.flagged_layers or {}).items()}
    return {"seconds": seconds, "selected": plan.selected_layers, "cka": plan.scores["cka"], "flagged": flagged}


def _child(side: str, args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if side == "reference":
        result = run_reference(Path(args.reference), args.samples, args.batch_size)
    else:
        result = run_loraplan(args.samples, args.batch_size)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(side: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", side, "--samples", str(args.samples)]
    command += ["--batch-size", str(args.batch_size), "--reference", str(args.reference)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the {side} run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _runs(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['seconds']:.1f}" for r in runs)


def markdown(result: dict[str, Any]) -> str:
    import statistics

    ref, ours = result["reference"], result["loraplan"]
    t_ref = statistics.median(r["seconds"] for r in ref)
    t_ours = statistics.median(r["seconds"] for r in ours)
    m_ref = max(r["peak_rss_bytes"] for r in ref)
    m_ours = max(r["peak_rss_bytes"] for r in ours)
    same = all(r["selected"] == ref[0]["selected"] for r in ref + ours)
    finite = [
        abs(a - b)
        for a, b in zip(ref[0]["cka"], ours[0]["cka"])
        if a is not None and b is not None and a == a and b == b
    ]
    flagged = ours[0].get("flagged") or {}
    why = (
        f" loraplan flagged layer(s) {', '.join(sorted(flagged, key=int))} as unscorable and left them out "
        "(docs/methods.md: a layer whose input does not vary across samples; the reference scores it CKA 0, "
        '"most important").'
        if flagged
        else ""
    )
    lines = [
        "<!-- calibration:reference:begin (written by benchmarks/calibration_reference.py) -->",
        "",
        f"{result['machine']['date']}, {result['machine']['cpu']}, torch {result['machine']['torch']}, transformers "
        f"{result['machine']['transformers']}. SmolLM2-135M-Instruct, fp32, the first {result['samples']} Fine Foods "
        f'reviews as `review + "\\n" + eos` ({ref[0]["tokens"]:,} tokens, max length 512), batch '
        f"{result['batch_size']}, the same token ids on both sides, each run in its own process, the sides "
        f"alternating ({len(ref)} runs each; time is the calibration alone, memory the process's peak RSS).",
        "",
        "| side | calibration (median) | runs | peak RSS | selected layers |",
        "|---|---:|---|---:|---|",
        f"| CKA reference code | {t_ref:.1f} s | {_runs(ref)} s | {m_ref / 1e9:.2f} GB | {ref[0]['selected']} |",
        f'| loraplan (`selector="cka"`, `last_token="reference"`) | {t_ours:.1f} s | '
        f"{_runs(ours)} s | {m_ours / 1e9:.2f} GB | {ours[0]['selected']} |",
        "",
        f"loraplan: **{t_ref / t_ours:.2f}x the reference's speed at {m_ours / m_ref:.2f}x its peak memory**, "
        f"{'the same selection' if same else 'a DIFFERENT selection'} (target: at least 2x at most 0.5x, the same "
        f"layers). Largest CKA difference between the two where both are finite: "
        f"{max(finite) if finite else float('nan'):.2e}.{why}",
        "",
        "<!-- calibration:reference:end -->",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="path of the reference's select_layers_decoder.py")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--json", default=None, help="write every run here")
    parser.add_argument("--write-doc", default=None, help="replace the calibration:reference block of this file")
    parser.add_argument("--child", choices=["reference", "loraplan"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args)
        return 0
    if not Path(args.reference).is_file():
        parser.error(f"--reference {args.reference!r} is not a file: give the reference's select_layers_decoder.py")
    import torch
    import transformers

    result: dict[str, Any] = {
        "samples": args.samples,
        "batch_size": args.batch_size,
        "reference": [],
        "loraplan": [],
        "machine": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load average before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        },
    }
    for _ in range(args.repeats):
        for side in ("reference", "loraplan"):
            run = _spawn(side, args)
            result[side].append(run)
            print(
                f"{side}: {run['seconds']:.1f} s, {run['peak_rss_bytes'] / 1e9:.2f} GB, {run['selected']}", flush=True
            )
    block = markdown(result)
    print(block)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.write_doc:
        from _markdown import write_block

        write_block(
            Path(args.write_doc), "<!-- calibration:reference:begin", "<!-- calibration:reference:end -->", block
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
