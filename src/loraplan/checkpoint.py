"""Planning from a checkpoint directory without building the model: a weight-only selector (``snr``,
``condition``) reads the safetensors shards tensor by tensor (:class:`~loraplan.weights.CheckpointWeights`), so a
70B model is planned in the memory of one weight matrix, not 140 GB.

The plan is the one :func:`loraplan.make_plan` makes for the model loaded from the directory with no calibration
data (``make_plan(model, None, config)``): the same layers, scores, ranks and stack record, and a fingerprint from
``config.json`` that :func:`~loraplan.apply_plan` checks against the model as for any plan. What needs the model
itself is refused: sharing by representations (it needs data), and a ``time_budget`` or a plain ``param_budget``
(they price candidates with the cost model, which times or counts the model's own modules;
``rank_policy="importance"`` with ``param_budget`` shares rank units by importance and needs no cost model).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .allocation import allocate, score
from .calibration import CalibrationStats
from .config import PlanConfig
from .errors import ConfigError
from .hooks.manager import get_plugin_manager
from .layers import hidden_size
from .plan import LoraPlan
from .plan_records import CalibrationRecord, ModelFingerprint, StackRecord, config_hash
from .plan_steps import (
    adjust,
    calibration_facts,
    check_data_free,
    data_free_stats,
    final,
    price,
    settings_of,
    strategies_for,
    versions,
)
from .weights import CheckpointWeights

if TYPE_CHECKING:
    import pluggy

__all__ = ["plan_checkpoint"]

#: why a plan made from a checkpoint has no cost model
NOT_PRICED = "planned from the checkpoint's weights without building the model, so there is no model to price"


def plan_checkpoint(
    directory: str | Path,
    config: PlanConfig | dict | None = None,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    lora_rank: int | None = None,
    progress: bool = True,
) -> LoraPlan:
    """The plan of the model in ``directory`` (``config.json`` and safetensors shards) by a weight-only selector,
    streamed from the shards (see the module docstring). ``lora_rank``: the LoRA config's ``r`` (needed for
    ``rank_policy="importance"``)."""
    config = settings_of(config)
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    chosen = strategies_for(config, pm)
    check_data_free(chosen, config)
    _refuse(config)
    model_config = _model_config(Path(directory))
    weights = CheckpointWeights(Path(directory), config.target_modules)
    weights.progress = progress
    k = config.layer_count(weights.num_layers)
    stats = data_free_stats([weights.names(i) for i in range(weights.num_layers)])
    scoring = score(chosen.selector, stats, config, weights.num_layers, k, weights)
    allocation = allocate(
        scoring, chosen.sharer, stats, config, base_rank=lora_rank, costs=None, cost_problem=NOT_PRICED
    )
    plan = LoraPlan(
        num_layers=weights.num_layers,
        selected_layers=allocation.selected,
        share_groups=allocation.sharing.groups,
        rank_pattern=allocation.ranks.pattern,
        scores={name: [float(v) for v in values] for name, values in scoring.scores.items()},
        config=config.to_dict(),
        model_fingerprint=_fingerprint(model_config, weights),
        stack=StackRecord(
            path=weights.path,
            pattern=weights.path.rsplit(".", 1)[-1],
            ambiguous=False,
            target_modules=sorted({name.rsplit(".", 1)[-1] for name in weights.names(0)}),
            module_shapes={name: list(io) for name, io in weights.shapes(0).items()},
            targets_from="config" if config.target_modules else "all-linear",
            other_stacks=[],
        ),
        calibration=_calibration(model_config, config, chosen.requires, stats),
        flagged_layers=scoring.flagged,
        notes=list(allocation.notes),
        warnings=scoring.warnings + allocation.warnings,
        versions=versions(),
    )
    adjust(plan, pm, _NoModel(directory), stats)
    price(plan, lora_rank, None, NOT_PRICED, allocation.budget)
    return final(plan, pm)


class _NoModel(torch.nn.Module):
    """What ``loraplan_adjust_plan`` gets as the model when there is none: an empty module naming the directory."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        self.directory = str(directory)


def _refuse(config: PlanConfig) -> None:
    if config.time_budget is not None or (config.param_budget is not None and config.rank_policy != "importance"):
        name = "time_budget" if config.time_budget is not None else "param_budget"
        raise ConfigError(
            f"`{name}` ({getattr(config, name)}) prices candidates with the cost model, which needs the model: from "
            "a checkpoint, select with ratio or count, or param_budget with rank_policy='importance'; or load the "
            "model and plan it with make_plan(model, None, config)."
        )


def _model_config(directory: Path) -> Any:
    """The checkpoint's transformers config (``config.json`` only: no weights are loaded)."""
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise ConfigError(f"`MODEL_DIR` {str(directory)!r} has no config.json: give a transformers model directory.")
    model_config = AutoConfig.from_pretrained(directory)
    if getattr(model_config, "is_encoder_decoder", False):
        raise ConfigError(
            f"{directory} holds an encoder-decoder model ({model_config.model_type}); it is not planned from its "
            "checkpoint yet. Load it and plan it with calibration data."
        )
    return model_config


def _fingerprint(model_config: Any, weights: CheckpointWeights) -> ModelFingerprint:
    """The fingerprint :func:`loraplan.plan.fingerprint` gives the model loaded from the checkpoint."""
    architectures = getattr(model_config, "architectures", None) or []
    return ModelFingerprint(
        class_name=architectures[0] if architectures else None,
        model_type=getattr(model_config, "model_type", None),
        num_layers=weights.num_layers,
        hidden_size=hidden_size(model_config.get_text_config()),
        layers_path=weights.path,
        config_hash=config_hash(model_config.to_dict()),
    )


def _calibration(
    model_config: Any, config: PlanConfig, requires: frozenset[str], stats: CalibrationStats
) -> CalibrationRecord:
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else None
    return calibration_facts(
        None, stats, config, requires, dtype=name, device=None, quantization=None, weights="checkpoint"
    )


def checkpoint_size(directory: str | Path) -> dict[str, Any]:
    """Parameters and bytes of a checkpoint's tensors (from the safetensors headers)."""
    weights = CheckpointWeights(Path(directory))
    files = {entry.file for entry in weights.entries.values()}
    return {"parameters": weights.num_parameters, "bytes": sum(f.stat().st_size for f in files), "files": len(files)}
