"""The ``loraplan`` command: ``analyze`` a model on calibration data, ``show`` a saved plan."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
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


def _stacks(values: list[str] | None) -> dict[str, dict[str, Any]] | None:
    """``STACK.KEY=VALUE`` pairs as ``{stack: {key: value}}`` (the value read as JSON when it parses)."""
    if not values:
        return None
    found: dict[str, dict[str, Any]] = {}
    for item in values:
        where, sep, raw = item.partition("=")
        stack, dot, key = where.partition(".")
        if not sep or not dot or not stack or not key:
            raise ConfigError(f"`--stacks` takes STACK.KEY=VALUE, got {item!r}. Write e.g. --stacks encoder.count=2.")
        try:
            found.setdefault(stack, {})[key] = json.loads(raw)
        except json.JSONDecodeError:
            found.setdefault(stack, {})[key] = raw
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
    given["stacks"] = _stacks(given.get("stacks"))
    return {name: value for name, value in given.items() if value is not None}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplan", description="Plan layer-selective and shared LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="calibrate a model and write a plan")
    analyze.add_argument("model_dir", metavar="MODEL_DIR", help="a transformers model directory")
    analyze.add_argument(
        "--data",
        default=None,
        help="calibration data: .jsonl, .json, .csv, .parquet or .txt. Without it, a weight-only selector (--selector "
        "snr or condition) reads MODEL_DIR's safetensors shards tensor by tensor, without building the model",
    )
    plan = analyze.add_argument_group("plan settings (loraplan.PlanConfig)")
    for item in settings():
        _add_setting(plan, item)
    analyze.add_argument("--rank", type=int, default=8, help="LoRA r the parameter count assumes (default 8)")
    analyze.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    analyze.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    analyze.add_argument("--out", default="plan.json", help="where to write the plan (default: plan.json)")
    analyze.add_argument("--plot", default=None, help="write the figure here (.png/.svg/.pdf)")
    analyze.add_argument(
        "--quiet", action="store_true", help="no progress bars (calibration, and transformers while the model loads)"
    )

    show = sub.add_parser("show", help="print the table of a saved plan")
    show.add_argument("plan", help="plan.json (or a directory holding loraplan.json)")
    show.add_argument("--rank", type=int, default=None, help="LoRA r for the parameter count")
    show.add_argument("--plot", default=None, help="also write the figure here")
    return parser


def _check_destination(path: str, flag: str) -> None:
    """Refuse, before any work, a file that cannot be written (``flag`` names the option): the nearest existing
    ancestor must be a directory in which a file can be created. A parent that is a regular file, or a place such as
    ``/proc`` that takes no new files, fails here and not after the calibration."""
    import tempfile

    target = Path(path)
    if target.is_dir():
        target = target / "loraplan.json"
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"`{flag}` {path!r} exists and cannot be written. Choose another path.")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(
            f"`{flag}` {path!r} cannot be written: {str(ancestor)!r} is a file, not a directory. Choose a path in a "
            "directory."
        )
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise ConfigError(
            f"`{flag}` {path!r} cannot be written: no file can be created in {str(ancestor)!r} "
            f"({exc.strerror or exc}). Choose a path in a writable directory."
        ) from exc


def _device(value: str) -> str:
    """The device to load the model on: ``auto`` is CUDA when there is one; a device this torch or this machine does
    not have is refused before the model loads."""
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"`--device` {value!r} is not a device torch knows. Use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"`--device` {value!r}: this torch sees no CUDA device (built with CUDA: "
                f"{torch.version.cuda or 'no'}). Use --device cpu (or auto), or run on a machine with a GPU and a "
                "CUDA build of torch."
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(f"`--device` {value!r}: there are {count} CUDA device(s), numbered 0..{count - 1}.")
    elif device.type != "cpu" and not _backend_available(device.type):
        raise ConfigError(f"`--device` {value!r}: torch has no {device.type!r} backend here. Use --device cpu.")
    return value


def _backend_available(kind: str) -> bool:
    import torch

    backend = getattr(torch, kind, None) or getattr(torch.backends, kind, None)
    check = getattr(backend, "is_available", None)
    return bool(check()) if callable(check) else False


def _check_model_dir(model_dir: str) -> None:
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"`MODEL_DIR` {model_dir!r} is not a directory; give a transformers model directory.")
    if not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())
        raise ConfigError(
            f"`MODEL_DIR` {model_dir!r} has no config.json, so it is not a transformers model directory (it holds "
            + (", ".join(found[:8]) + (" ..." if len(found) > 8 else "") if found else "nothing")
            + "). Give the directory that model.save_pretrained(...) wrote."
        )


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """With ``--quiet``: no progress bars or info lines from transformers and huggingface_hub while the model loads
    (their settings are restored afterwards)."""
    if not quiet:
        yield
        return
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logging_ = transformers.utils.logging
    bars, verbosity, hub_bars_off = (
        logging_.is_progress_bar_enabled(),
        logging_.get_verbosity(),
        are_progress_bars_disabled(),
    )
    logging_.disable_progress_bar()
    logging_.set_verbosity_error()
    disable_progress_bars()
    try:
        yield
    finally:
        logging_.set_verbosity(verbosity)
        if bars:
            logging_.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


def _load_model(model_dir: str, selector: str, dtype: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_dir)
        architectures = getattr(config, "architectures", None) or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        if getattr(config, "is_encoder_decoder", False):  # T5, BART: both stacks, the decoder reads the text too
            cls = AutoModelForSeq2SeqLM
        else:
            cls = AutoModelForCausalLM if (causal or selector in ("gradient", "lora_drop")) else AutoModel
        model = cls.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ConfigError(
            f"`MODEL_DIR` {model_dir!r} could not be loaded with transformers ({type(exc).__name__}: {first}). Check "
            "that it is a complete model directory (config.json, weights, tokenizer) for this transformers version."
        ) from exc
    model.to(device)
    return model, tokenizer


def _analyze(args: argparse.Namespace) -> int:
    from .data import read_texts
    from .hooks import get_plugin_manager
    from .planner import check_strategies, make_plan, strategies_for
    from .report import format_plan

    # what can be checked without the model is checked first, so that no calibration is thrown away for it
    config = PlanConfig.from_dict(plan_settings(args))
    pm = get_plugin_manager()
    check_strategies(config, pm)  # an unknown selector or sharer, the per-stack ones included
    _check_destination(args.out, "--out")
    if args.plot:
        from .plot import check_plot_path

        check_plot_path(args.plot)
        _check_destination(args.plot, "--plot")
    device = _device(args.device)
    _check_model_dir(args.model_dir)
    if args.data is None:  # weight-only: streamed from the checkpoint, the model is never built
        from .checkpoint import plan_checkpoint
        from .plan_steps import check_data_free

        try:
            check_data_free(strategies_for(config, pm), config)
        except ConfigError as exc:
            raise ConfigError(f"`--data` is not given: {exc} (CLI: --data FILE)") from None
        plan = plan_checkpoint(args.model_dir, config, plugin_manager=pm, lora_rank=args.rank, progress=not args.quiet)
    else:
        samples = read_texts(args.data, config.text_field, limit=config.calibration_samples)  # texts, conversations
        with _quiet_loading(args.quiet):
            model, tokenizer = _load_model(args.model_dir, config.selector, args.dtype, device)
        plan = make_plan(
            model, samples, config, tokenizer, plugin_manager=pm, lora_rank=args.rank, progress=not args.quiet
        )
    print(format_plan(plan, args.rank))
    print(f"\nplan written to {_save(plan, args.out)}")
    if args.plot:
        from .plot import plot_plan

        print(f"figure written to {plot_plan(plan, args.plot)}")
    return 0


def _save(plan: Any, out: str) -> Path:
    """Write the plan to ``out``. If that fails now (it was writable when the run began), the plan goes to a file of
    its own in the temporary directory and the error says where, so the calibration is not lost."""
    import tempfile

    try:
        return Path(plan.save(out))
    except OSError as exc:
        handle, fallback = tempfile.mkstemp(prefix="loraplan-", suffix=".json")
        os.close(handle)
        plan.save(fallback)
        raise ConfigError(
            f"`--out` {out!r} could not be written ({exc.strerror or exc}); the plan was saved to {fallback} "
            "instead. Move it where you want it."
        ) from exc


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
