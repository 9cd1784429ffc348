"""The regimes of a step and the arithmetic over :class:`LayerCosts`: predicted step cost and peak memory of a
selection, and the ratios a plan records. Nothing here touches a model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .._removed import removed

REGIMES = ("skip", "frozen", "frozen_ckpt", "lora", "lora_ckpt", "lora_first", "lora_first_ckpt")
#: bytes per LoRA parameter held in training: fp32 weight, gradient and AdamW's two moments
LORA_TRAIN_BYTES = 4 * 4


@dataclass
class LayerCosts:
    """Per-step costs of one layer in each regime, the head and the optimizer, for one batch shape."""

    source: str  # "flops", "timed" or "fitted"
    unit: str  # "GFLOP" or "s"
    shape: list[int]  # [batch, sequence length]
    rank: int
    num_layers: int
    layer: dict[str, float]
    head: float
    optimizer_per_param: float
    lora_params_per_layer: int
    memory: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    notes: list[str] = field(default_factory=list)
    #: the fixed part of a checkpointed step where it differs from ``head`` (the fitted model's); else ``head``
    head_checkpointing: float | None = None
    #: what the costs were fitted from (the fitted model's timed layouts, in seconds)
    samples: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record a plan keeps (``cost``); the fitted model's own fields only when set."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("head_checkpointing", "samples")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerCosts:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Prediction:
    """Predicted step cost (in ``LayerCosts.unit``) and peak memory (bytes) of one configuration."""

    time: float
    memory: float
    regimes: list[str]


def regimes(
    num_layers: int, selected: Sequence[int], *, checkpointing: bool, truncate: bool, input_grads: bool
) -> list[str]:
    """The regime of every layer for LoRA on ``selected``.

    ``input_grads``: the embedding output requires grad (trainers do this whenever they checkpoint).
    ``truncate``: loraplan's truncated backward is on (it makes ``input_grads`` irrelevant below the cut).
    """
    chosen = set(selected)
    lowest = min(chosen)
    records_below = input_grads and not truncate
    suffix = "_ckpt" if checkpointing else ""
    out = []
    for i in range(num_layers):
        if i < lowest:
            out.append(("frozen" + suffix) if records_below else "skip")
        elif i == lowest:
            out.append(("lora" if records_below else "lora_first") + suffix)
        else:
            out.append(("lora" if i in chosen else "frozen") + suffix)
    return out


def predict(
    costs: LayerCosts,
    selected: Sequence[int],
    *,
    checkpointing: bool,
    truncate: bool = True,
    input_grads: bool | None = None,
    num_modules: int | None = None,
    rank: int | None = None,
    rank_units: int | None = None,
) -> Prediction:
    """Step cost and peak memory of LoRA on ``selected`` (``num_modules`` distinct layer-module sets after sharing, at
    ``rank``; or, with per-layer ranks, ``rank_units``: the sum of every module set's rank). ``input_grads`` defaults
    to ``checkpointing`` (what HF ``Trainer`` and TRL do). A layer's LoRA compute is priced at ``costs.rank``: the
    rank changes the optimizer's work and the memory of the LoRA parameters, next to nothing of a layer's FLOPs."""
    input_grads = checkpointing if input_grads is None else input_grads
    per_layer = regimes(
        costs.num_layers, selected, checkpointing=checkpointing, truncate=truncate, input_grads=input_grads
    )
    modules = len(selected) if num_modules is None else num_modules
    units = rank_units if rank_units is not None else modules * (rank or costs.rank)
    params = units * costs.lora_params_per_layer / costs.rank
    head = costs.head_checkpointing if checkpointing and costs.head_checkpointing is not None else costs.head
    step = sum(costs.layer[r] for r in per_layer) + head + costs.optimizer_per_param * params
    mem = costs.memory
    saved = mem.get("saved", {})
    kept = {
        "skip": 0.0,
        "frozen": saved.get("frozen", 0.0),
        "lora": saved.get("lora", 0.0),
        "lora_first": saved.get("lora", 0.0),
    }
    activations = sum(saved.get("checkpointed", 0.0) if r.endswith("_ckpt") else kept[r] for r in per_layer)
    transient = mem.get("head_transient", 0.0)  # while the head back-propagates
    if checkpointing:  # later, one layer at a time is recomputed
        recorded = [r.removesuffix("_ckpt") for r in per_layer if r != "skip"]
        transient = max([transient] + [kept[r] for r in recorded])
    memory = mem.get("weights", 0.0) + params * LORA_TRAIN_BYTES + activations + transient + saved.get("head", 0.0)
    return Prediction(step, memory, per_layer)


def relative(costs: LayerCosts, selected: Sequence[int], **kwargs: Any) -> tuple[float, float]:
    """(step time, peak memory) of ``selected`` as ratios of LoRA on every layer with the same checkpointing, run
    the way HF ``Trainer`` runs it (input grads on exactly when checkpointing)."""
    checkpointing = kwargs["checkpointing"]
    reference = predict(costs, range(costs.num_layers), checkpointing=checkpointing, truncate=False)
    plan = predict(costs, selected, **kwargs)
    return plan.time / reference.time, plan.memory / reference.memory


def _fmt_ratio(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}x"


def predictions(
    costs: LayerCosts, selected: Sequence[int], num_modules: int, rank: int, rank_units: int | None = None
) -> dict[str, Any]:
    """What the plan records: step-time and peak-memory ratios versus LoRA on every layer, with and without
    checkpointing, with loraplan's truncation and with stock PEFT."""
    out: dict[str, Any] = {}
    for label, checkpointing in (("checkpointing", True), ("no_checkpointing", False)):
        rows = {"loraplan": dict(truncate=True), "stock": dict(truncate=False, input_grads=True)}
        if not checkpointing:
            rows["stock_no_input_grads"] = dict(truncate=False, input_grads=False)
        out[label] = {}
        for name, kwargs in rows.items():
            time_ratio, memory_ratio = relative(
                costs,
                selected,
                checkpointing=checkpointing,
                num_modules=num_modules,
                rank=rank,
                rank_units=rank_units,
                **kwargs,
            )
            out[label][name] = {"time": time_ratio, "memory": memory_ratio}
    return out


#: fmt_ratio is gone (nothing used it); kept for a release
__getattr__ = removed(__name__, {"fmt_ratio": _fmt_ratio})
