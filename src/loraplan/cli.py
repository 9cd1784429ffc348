"""The ``loraplan`` command: ``analyze`` a model on calibration data, ``show`` a saved plan."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .config import PlanConfig, Setting, settings
from .errors import ConfigError, LoraPlanError

__all__ = ["main"]


def _rank_policy(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def _shape(value: str | None) -> list[int] | str | None:
    """``8x1024`` as ``[8, 1024]``; anything else is passed on for PlanConfig to refuse with its message."""
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    return [int(p) for p in parts] if all(p.strip().isdigit() for p in parts) else value


def _options(values: list[str] | None) -> dict[str, Any] | None:
    """``KEY=VALUE`` pairs as a dict, each value read as JSON when it parses (numbers, true/false, lists), else kept
    as the string."""
    if not values:
        return None
    found: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"`--options` takes KEY=VALUE, got {item!r}. Write e.g. --options window=4.")
        try:
            found[key] = json.loads(raw)
        except json.JSONDecodeError:
            found[key] = raw
    return found


def _targets(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


#: how the command line reads each kind of setting (by its annotation)
_READERS: dict[str, Any] = {
    "str": str,
    "str | None": str,
    "float": float,
    "float | None": float,
    "int": int,
    "int | None": int,
    "str | int": _rank_policy,
    "list[str] | None": _targets,
    "list[int] | None": _shape,
}


def _add_setting(parser: argparse._ActionsContainer, item: Setting) -> None:
    """One ``PlanConfig`` setting as a flag: its help and choices from the field's metadata, no default of its own
    (an absent flag leaves the setting to PlanConfig)."""
    shown = "none" if item.default is None else item.default
    help_text = (item.help if "Default:" in item.help else f"{item.help} (default: {shown})").replace("%", "%%")
    names = [item.flag, *(a for a in item.aliases if not a.startswith("--no-"))]
    if item.type == "bool":
        parser.add_argument(*names, dest=item.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        for alias in (a for a in item.aliases if a.startswith("--no-")):
            parser.add_argument(alias, dest=item.name, action="store_false", help=f"the same as --no-{item.flag[2:]}")
        return
    if item.type.startswith("dict"):
        parser.add_argument(*names, dest=item.name, action="append", metavar=item.metavar, help=help_text)
        return
    parser.add_argument(
        *names,
        dest=item.name,
        type=_READERS[item.type],
        choices=item.choices,
        metavar=item.metavar,
        default=None,
        help=help_text,
    )


def plan_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``PlanConfig`` settings given on the command line (absent flags are left out)."""
    given = {item.name: getattr(args, item.name) for item in settings()}
    given["options"] = _options(given.get("options"))
    return {name: value for name, value in given.items() if value is not None}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplan", description="Plan layer-selective and shared LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="calibrate a model and write a plan")
    analyze.add_argument("model_dir", metavar="MODEL_DIR", help="a transformers model directory")
    analyze.add_argument("--data", required=True, help="calibration data: .jsonl, .json, .csv, .parquet or .txt")
    plan = analyze.add_argument_group("plan settings (loraplan.PlanConfig)")
    for item in settings():
        _add_setting(plan, item)
    analyze.add_argument("--rank", type=int, default=8, help="LoRA r the parameter count assumes (default 8)")
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

    config = PlanConfig.from_dict(plan_settings(args))
    samples = read_texts(args.data, config.text_field, limit=config.calibration_samples)  # texts or conversations
    model, tokenizer = _load_model(args.model_dir, config.selector, args.dtype, args.device)
    plan = make_plan(model, samples, config, tokenizer, lora_rank=args.rank, progress=not args.quiet)
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
