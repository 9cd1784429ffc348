"""The ``loraplan`` command: ``analyze`` a model on calibration data, ``show`` a saved plan."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .config import PlanConfig
from .errors import LoraPlanError

__all__ = ["main"]


def _rank_policy(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def _shape(value: str | None) -> list[int] | str | None:
    """``8x1024`` as ``[8, 1024]``; anything else is passed on for PlanConfig to refuse with its message."""
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    return [int(p) for p in parts] if all(p.strip().isdigit() for p in parts) else value


def _parser() -> argparse.ArgumentParser:
    defaults = PlanConfig()
    parser = argparse.ArgumentParser(prog="loraplan", description="Plan layer-selective and shared LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="calibrate a model and write a plan")
    analyze.add_argument("model_dir", metavar="MODEL_DIR", help="a transformers model directory")
    analyze.add_argument("--data", required=True, help="calibration data: .jsonl, .json or .txt")
    analyze.add_argument("--text-field", default=defaults.text_field, help="JSON key of the text (default: text)")
    analyze.add_argument("--samples", type=int, default=defaults.calibration_samples, help="calibration samples")
    analyze.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per sample")
    analyze.add_argument("--batch-size", type=int, default=defaults.batch_size)
    analyze.add_argument("--selector", default=defaults.selector, help="cka, activation, gradient, random, top, ...")
    analyze.add_argument("--ratio", type=float, default=defaults.ratio, help="fraction of layers to keep")
    analyze.add_argument("--count", type=int, default=None, help="explicit number of layers to keep")
    analyze.add_argument("--cumulative", type=float, default=None, help="cumulative-score threshold mode")
    analyze.add_argument("--share", default=None, help="angular, odd_even, ... (default: no sharing)")
    analyze.add_argument("--share-threshold", type=float, default=defaults.share_threshold)
    analyze.add_argument(
        "--rank-policy", type=_rank_policy, default=defaults.rank_policy, help="keep, budget or an int"
    )
    analyze.add_argument("--rank", type=int, default=8, help="LoRA r the parameter count assumes (default 8)")
    analyze.add_argument("--target-modules", default=None, help="comma-separated LoRA targets (default: all linear)")
    analyze.add_argument("--pooling", default=defaults.pooling, choices=["auto", "last", "first"])
    analyze.add_argument("--last-token", default=defaults.last_token, choices=["mask", "reference"])
    analyze.add_argument("--debiased", action="store_true", help="debiased CKA")
    analyze.add_argument("--seed", type=int, default=defaults.seed)
    analyze.add_argument(
        "--time-budget", type=float, default=None, help="step-time budget, a fraction of LoRA on every layer (e.g. 0.6)"
    )
    analyze.add_argument(
        "--param-budget", type=float, default=None, help="trainable-parameter budget, a fraction of LoRA on every layer"
    )
    analyze.add_argument(
        "--cost-model",
        default=defaults.cost_model,
        choices=["flops", "timed"],
        help="price layers by FLOP counts (default) or by timing layer 0 on the device",
    )
    analyze.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="the training run does not checkpoint activations (what --time-budget assumes)",
    )
    analyze.add_argument(
        "--cost-shape",
        default=None,
        metavar="BATCHxLENGTH",
        help="training step shape for the cost model, e.g. 8x1024 (default: --batch-size x --max-length)",
    )
    analyze.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    analyze.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    analyze.add_argument("--out", default="plan.json", help="where to write the plan (default: plan.json)")
    analyze.add_argument("--plot", default=None, help="write the figure here (.png/.svg/.pdf)")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")

    show = sub.add_parser("show", help="print the table of a saved plan")
    show.add_argument("plan", help="plan.json (or a directory holding loraplan.json)")
    show.add_argument("--rank", type=int, default=None, help="LoRA r for the parameter count")
    show.add_argument("--plot", default=None, help="also write the figure here")
    return parser


def _load_model(model_dir: str, selector: str, dtype: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .errors import ConfigError

    if not Path(model_dir).is_dir():
        raise ConfigError(f"`MODEL_DIR` {model_dir!r} is not a directory; give a transformers model directory.")
    config = AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    cls = AutoModelForCausalLM if (causal or selector == "gradient") else AutoModel
    torch_dtype = getattr(torch, dtype)
    model = cls.from_pretrained(model_dir, dtype=torch_dtype)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _analyze(args: argparse.Namespace) -> int:
    from .assets import cache_dir  # noqa: F401  (keeps the asset helpers importable for users of the CLI)
    from .data import read_texts
    from .planner import make_plan
    from .report import format_plan

    config = PlanConfig(
        selector=args.selector,
        ratio=args.ratio,
        count=args.count,
        cumulative=args.cumulative,
        share=args.share,
        share_threshold=args.share_threshold,
        rank_policy=args.rank_policy,
        calibration_samples=args.samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
        target_modules=[t.strip() for t in args.target_modules.split(",")] if args.target_modules else None,
        text_field=args.text_field,
        pooling=args.pooling,
        last_token=args.last_token,
        debiased=args.debiased,
        time_budget=args.time_budget,
        param_budget=args.param_budget,
        cost_model=args.cost_model,
        cost_checkpointing=not args.no_checkpointing,
        cost_shape=_shape(args.cost_shape),  # type: ignore[arg-type]  # a malformed shape is PlanConfig's to refuse
    )
    texts = read_texts(args.data, args.text_field, limit=args.samples)
    model, tokenizer = _load_model(args.model_dir, args.selector, args.dtype, args.device)
    plan = make_plan(model, texts, config, tokenizer, lora_rank=args.rank, progress=not args.quiet)
    print(format_plan(plan, args.rank))
    out = plan.save(args.out)
    print(f"\nplan written to {out}")
    if args.plot:
        from .plot import plot_plan

        print(f"figure written to {plot_plan(plan, args.plot)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .plan import LoraPlan
    from .report import format_plan

    plan = LoraPlan.load(args.plan)
    print(format_plan(plan, args.rank))
    if args.plot:
        from .plot import plot_plan

        print(f"figure written to {plot_plan(plan, args.plot)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _analyze(args) if args.command == "analyze" else _show(args)
    except LoraPlanError as exc:
        print(f"loraplan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
