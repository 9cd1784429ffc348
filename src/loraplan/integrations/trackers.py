"""The plan in the trainer's experiment trackers: what ``TrainingArguments.report_to`` names gets the plan at
``on_train_begin`` (W&B, TensorBoard, MLflow; see ``docs/integrations/trackers.md`` for every key).

Each tracker's package is imported only when ``report_to`` names it, and only its own trainer integration's run is
written to: transformers' ``WandbCallback`` / ``MLflowCallback`` / ``TensorBoardCallback`` run before user callbacks
at ``on_train_begin`` and start the run there. Without one (a missing package, a disabled integration) that tracker is
skipped with a log line, never an error, and no run is started here. Only the main process reports.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..plan import PLAN_FILE, LoraPlan
from ..report import format_plan, parameter_count, score_columns

logger = logging.getLogger("loraplan")

__all__ = ["KEY", "TRACKERS", "plan_rows", "plan_summary", "report_plan"]

#: the namespace of every key loraplan writes: W&B config key and log-key prefix, TensorBoard tag prefix, MLflow
#: artifact folder; MLflow params are ``loraplan.<name>``
KEY = "loraplan"
#: the ``report_to`` names loraplan writes to
TRACKERS = ("wandb", "tensorboard", "mlflow")
FIGURE_FILE = "plan.png"
REPORT_FILE = "plan.txt"


# -- what is reported ---------------------------------------------------------------------------------------------
def _number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _predicted(plan: LoraPlan, checkpointing: bool, truncate_backward: bool) -> dict[str, float] | None:
    """The cost model's step-time and peak-memory ratios for the way this run trains, or ``None`` without one."""
    predicted = plan.cost.predicted
    if not predicted:
        return None
    rows = predicted.get("checkpointing" if checkpointing else "no_checkpointing") or {}
    row = rows.get("loraplan" if truncate_backward else "stock")
    if not row:
        return None
    return {"time": float(row["time"]), "memory": float(row["memory"])}


def plan_summary(plan: LoraPlan, *, checkpointing: bool = False, truncate_backward: bool = True) -> dict[str, Any]:
    """The plan's settings and headline numbers: the W&B config value under ``loraplan`` and (flattened) the MLflow
    params. The predicted ratios are the cost model's for ``checkpointing`` (on or off) and loraplan's truncated
    backward (``truncate_backward``; else stock PEFT); they are absent when the plan has no cost model."""
    count = parameter_count(plan)
    summary: dict[str, Any] = {
        "settings": dict(plan.config),
        "num_layers": plan.num_layers,
        "selected_layers": list(plan.selected_layers),
        "share_groups": [list(g) for g in plan.share_groups],
        "shared_rest": plan.shared_rest,
        "rank_pattern": {str(layer): rank for layer, rank in sorted(plan.rank_pattern.items())},
        "num_modules": plan.num_modules(),
        "rank": count.plan_rank,
        "lora_parameters": count.plan,
        "lora_parameters_all_layers": count.all_layers,
        "lora_parameter_ratio": _number(count.ratio),
    }
    predicted = _predicted(plan, checkpointing, truncate_backward)
    if predicted is not None:
        summary["predicted_step_time_ratio"] = predicted["time"]
        summary["predicted_peak_memory_ratio"] = predicted["memory"]
    return summary


def plan_rows(plan: LoraPlan) -> tuple[list[str], list[list[Any]]]:
    """The per-layer table: ``layer``, one column per score, ``selected``, ``flagged``, ``group`` (``G<n>`` or
    ``None``); a score that could not be computed is ``None``."""
    names = score_columns(plan)
    columns = ["layer", *names, "selected", "flagged", "group"]
    rows = []
    for layer in range(plan.num_layers):
        group = plan.group_of(layer)
        rows.append(
            [
                layer,
                *(_number(float(plan.scores[n][layer])) for n in names),
                layer in plan.selected_layers,
                layer in plan.flagged_layers,
                None if group is None else f"G{group}",
            ]
        )
    return columns, rows


def _markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _param(value: Any) -> Any:
    """An MLflow param value: lists, dicts and ``None`` as JSON, the rest as is."""
    return json.dumps(value) if value is None or isinstance(value, (list, dict)) else value


class _Files:
    """The plan JSON and its text report, written into a temporary folder, and (with matplotlib) its figure, drawn
    the first time a tracker asks for it."""

    def __init__(self, plan: LoraPlan, folder: Path) -> None:
        self._source = plan
        self._folder = folder
        self.plan = plan.save(folder / PLAN_FILE)
        self.report = folder / REPORT_FILE
        self.report.write_text(format_plan(plan) + "\n")

    @functools.cached_property
    def figure(self) -> Path | None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            logger.debug("loraplan: matplotlib is not installed, so the trackers get no plan figure.")
            return None
        from ..plot import plot_plan

        return plot_plan(self._source, self._folder / FIGURE_FILE)


# -- the trackers -------------------------------------------------------------------------------------------------
def _wandb(plan: LoraPlan, summary: dict[str, Any], files: _Files, args: Any, callbacks: list[Any]) -> bool:
    import wandb

    run = wandb.run
    if run is None:
        logger.info("loraplan: report_to names wandb but no W&B run is active (the integration did not start one).")
        return False
    run.config.update({KEY: summary}, allow_val_change=True)
    columns, rows = plan_rows(plan)
    payload: dict[str, Any] = {f"{KEY}/layers": wandb.Table(columns=columns, data=rows)}
    if files.figure is not None:
        payload[f"{KEY}/plan_figure"] = wandb.Image(str(files.figure))
    run.log(payload)
    artifact = wandb.Artifact(name=f"{KEY}-{run.id}", type=KEY, metadata=summary)
    artifact.add_file(str(files.plan), name=PLAN_FILE)
    artifact.add_file(str(files.report), name=REPORT_FILE)
    if files.figure is not None:
        artifact.add_file(str(files.figure), name=FIGURE_FILE)
    run.log_artifact(artifact)
    return True


def _tensorboard_writer(args: Any, callbacks: list[Any]) -> tuple[Any, bool]:
    """The trainer's own ``SummaryWriter`` (so the plan lands in its event file), else a new one in the directory
    it would use; the flag says whether the writer is ours to close."""
    for cb in callbacks:
        if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
            return cb.tb_writer, False
    from torch.utils.tensorboard import SummaryWriter

    folder = (
        os.getenv("TENSORBOARD_LOGGING_DIR")
        or getattr(args, "logging_dir", None)
        or os.path.join(args.output_dir, "runs", KEY)
    )
    logger.info("loraplan: no TensorBoard writer of the trainer's found; writing the plan to %s", folder)
    return SummaryWriter(log_dir=os.path.expanduser(folder)), True


def _tensorboard(plan: LoraPlan, summary: dict[str, Any], files: _Files, args: Any, callbacks: list[Any]) -> bool:
    writer, own = _tensorboard_writer(args, callbacks)
    try:
        columns, rows = plan_rows(plan)
        writer.add_text(f"{KEY}/layers", _markdown_table(columns, rows), 0)
        # four leading spaces: a markdown code block, so the text report keeps its columns
        writer.add_text(f"{KEY}/plan", "\n".join("    " + line for line in format_plan(plan).splitlines()), 0)
        if files.figure is not None:
            import numpy as np
            from PIL import Image

            with Image.open(files.figure) as image:
                pixels = np.asarray(image.convert("RGB"))
            writer.add_image(f"{KEY}/plan_figure", pixels, 0, dataformats="HWC")
        for name in ("lora_parameter_ratio", "predicted_step_time_ratio", "predicted_peak_memory_ratio"):
            if summary.get(name) is not None:
                writer.add_scalar(f"{KEY}/{name}", summary[name], 0)
        writer.flush()
    finally:
        if own:
            writer.close()
    return True


def _mlflow(plan: LoraPlan, summary: dict[str, Any], files: _Files, args: Any, callbacks: list[Any]) -> bool:
    import mlflow

    if mlflow.active_run() is None:
        logger.info("loraplan: report_to names mlflow but no MLflow run is active (the integration did not start one).")
        return False
    params = {f"{KEY}.{key}": _param(value) for key, value in summary.items() if key != "settings"}
    params.update({f"{KEY}.settings.{key}": _param(value) for key, value in summary["settings"].items()})
    mlflow.log_params(params)
    mlflow.log_artifact(str(files.plan), artifact_path=KEY)
    mlflow.log_artifact(str(files.report), artifact_path=KEY)
    if files.figure is not None:
        mlflow.log_artifact(str(files.figure), artifact_path=KEY)
    return True


_WRITERS: dict[str, tuple[str, Callable[..., bool]]] = {
    "wandb": ("wandb", _wandb),
    "tensorboard": ("torch.utils.tensorboard", _tensorboard),
    "mlflow": ("mlflow", _mlflow),
}


def _checkpointing(args: Any) -> bool:
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None))


def report_plan(
    plan: LoraPlan,
    args: Any,
    state: Any = None,
    *,
    callbacks: list[Any] | None = None,
    truncate_backward: bool = True,
) -> list[str]:
    """Write ``plan`` to the trackers ``args.report_to`` names (of ``wandb``, ``tensorboard``, ``mlflow``) and return
    the names written to. Called by :class:`~loraplan.integrations.hf.LoraPlanCallback` at ``on_train_begin``, after
    the trainer's own tracker callbacks have started their runs; ``callbacks`` are the trainer's callbacks when the
    caller knows them (``LoraPlanCallback.attach``: the plan then goes into the TensorBoardCallback's own event file;
    a callback is not told its siblings, so without them TensorBoard gets a writer of loraplan's own). Nothing happens
    off the main process, and a tracker whose package is missing or whose run is not active is skipped with a log
    line; a tracker's error is logged as a warning, never raised.
    """
    main = state.is_world_process_zero if state is not None else getattr(args, "process_index", 0) == 0
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [] if report_to == "none" else [report_to]
    wanted = [name for name in TRACKERS if name in report_to]
    if not main or not wanted:
        return []
    import importlib

    available = []
    for name in wanted:
        try:
            importlib.import_module(_WRITERS[name][0])
        except ImportError:
            logger.info("loraplan: report_to names %s but its package is not installed; the plan is not sent.", name)
            continue
        available.append(name)
    if not available:
        return []
    summary = plan_summary(plan, checkpointing=_checkpointing(args), truncate_backward=truncate_backward)
    callbacks = list(callbacks or [])
    written = []
    with tempfile.TemporaryDirectory(prefix="loraplan-") as folder:
        files = _Files(plan, Path(folder))
        for name in available:
            try:
                if _WRITERS[name][1](plan, summary, files, args, callbacks):
                    written.append(name)
            except Exception as exc:  # a tracker's failure must not stop the training run
                logger.warning("loraplan: could not send the plan to %s: %s: %s", name, type(exc).__name__, exc)
    if written:
        logger.info("loraplan: plan sent to %s", ", ".join(written))
    return written
