"""The plan of an encoder-decoder model: one :class:`~loraplan.plan.LoraPlan` per layer stack, and the plan of the
whole model built from them.

Each stack's plan is an ordinary single-stack plan with its own layer indices (``0..L_s-1``), its own stack record
(``layers.path``, ``layers.name``: ``"encoder"`` or ``"decoder"``), the settings that held for it
(``PlanConfig.for_stack``) and a model fingerprint whose ``num_layers`` and ``layers_path`` are the stack's. The
whole model's plan keeps them in ``stacks`` and describes all of them as one index space besides (encoder layers
first, then the decoder's, each shifted by the layers before it): ``num_layers``, ``selected_layers``,
``share_groups`` (never across stacks), ``rank_pattern``, ``flagged_layers`` and the scores every stack has, so that
counting (``adapted_layers``, ``num_modules``, ``module_ranks``) works on it as on one stack. What names modules (the
LoraConfig, narrowing, tying, truncation, checkpoints) works per stack, through :meth:`LoraPlan.stack_plans`.

The file (``format: loraplan.plan/2``) holds the whole model's settings, fingerprint, calibration, warnings and notes
once, and ``stacks``: one entry per stack with its ``name``, ``path``, ``num_layers``, ``selected_layers``,
``share_groups`` and the rest of its per-layer record. The one index space is rebuilt when the file is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import PlanMismatchError
from .plan_records import CalibrationRecord, CostRecord, DiagnosticsRecord, ModelFingerprint, StackRecord

if TYPE_CHECKING:
    from .plan import LoraPlan

__all__ = ["FORMAT", "FORMAT_STACKS", "combine", "stacks_from_dict", "stacks_to_dict"]

#: the format of a plan file (one stack), and of an encoder-decoder model's (several stacks)
FORMAT = "loraplan.plan/1"
FORMAT_STACKS = "loraplan.plan/2"
#: what the whole model's plan holds once and a stack's entry in the file leaves out (warnings and notes: each its own)
_SHARED = ("format", "config", "model", "calibration", "cost", "versions")
_WHOLE = (*_SHARED, "warnings", "notes")


def combine(stacks: list[LoraPlan], whole: LoraPlan) -> LoraPlan:
    """``whole`` (a plan holding the model's settings, fingerprint, calibration, warnings, notes) with ``stacks`` and
    the one index space over them."""
    offsets = [sum(s.num_layers for s in stacks[:i]) for i in range(len(stacks))]

    def shift(layers: list[int], offset: int) -> list[int]:
        return [i + offset for i in layers]

    whole.stacks = list(stacks)
    whole.num_layers = sum(s.num_layers for s in stacks)
    whole.selected_layers = [i for s, o in zip(stacks, offsets) for i in shift(s.selected_layers, o)]
    whole.share_groups = [shift(g, o) for s, o in zip(stacks, offsets) for g in s.share_groups]
    whole.rank_pattern = {i + o: r for s, o in zip(stacks, offsets) for i, r in s.rank_pattern.items()}
    whole.flagged_layers = {i + o: why for s, o in zip(stacks, offsets) for i, why in s.flagged_layers.items()}
    common = [name for name in stacks[0].scores if all(name in s.scores for s in stacks)]
    whole.scores = {name: [v for s in stacks for v in s.scores[name]] for name in common}
    whole.similarity = None
    whole.diagnostics = DiagnosticsRecord.empty()
    whole.stability = {}
    whole.stack = StackRecord.empty().replace(stacks=[s.stack_path for s in stacks])
    ranks = {s.rank for s in stacks}
    whole.rank = ranks.pop() if len(ranks) == 1 else None
    whole.model_fingerprint = whole.model_fingerprint.replace(num_layers=whole.num_layers, layers_path=None)
    whole.format = FORMAT_STACKS
    return whole


def stacks_to_dict(plan: LoraPlan) -> dict[str, Any]:
    """The file of a plan with several stacks (see the module docstring)."""
    whole = {key: value for key, value in plan.to_dict(single=True).items() if key in _WHOLE}
    entries = []
    for stack in plan.stacks:
        entry = {key: value for key, value in stack.to_dict(single=True).items() if key not in _SHARED}
        entries.append({"name": stack.stack.name, "path": stack.stack_path, **entry})
    return {**whole, "format": FORMAT_STACKS, "num_layers": plan.num_layers, "stacks": entries}


def stacks_from_dict(cls: type[LoraPlan], data: dict[str, Any]) -> LoraPlan:
    """A plan with several stacks from its file: each stack's plan, then the whole model's over them."""
    from .config import PlanConfig

    entries = data.get("stacks")
    if not isinstance(entries, list) or len(entries) < 2 or not all(isinstance(e, dict) for e in entries):
        raise PlanMismatchError(
            f"`stacks` of a {FORMAT_STACKS!r} plan must list two or more stacks, got {entries!r}. Recompute the plan."
        )
    shared = {key: data[key] for key in _WHOLE if key in data}
    try:
        settings = PlanConfig.from_dict(dict(shared.get("config") or {}))
    except Exception as exc:  # noqa: BLE001 - whatever the settings hold, the message names the file's key
        raise PlanMismatchError(f"`config` of the plan is not valid: {exc}") from exc
    stacks = []
    for entry in entries:  # each stack's plan read as the one-stack plan file it would have
        single = {key: value for key, value in entry.items() if key not in ("name", "path")}
        layers = {**(single.get("layers") or {}), "path": entry.get("path"), "name": entry.get("name")}
        model = {**(shared.get("model") or {}), "num_layers": entry.get("num_layers"), "layers_path": entry.get("path")}
        model.pop("stacks", None)
        stack = cls.from_dict(
            {
                **single,
                "format": FORMAT,
                "layers": layers,
                "model": model,
                "config": settings.for_stack(entry.get("name")).to_dict(),
                "calibration": shared.get("calibration") or {},
                "versions": shared.get("versions") or {},
            }
        )
        stacks.append(stack)
    whole = cls(
        num_layers=0,
        selected_layers=[],
        config=dict(shared.get("config") or {}),
        model_fingerprint=ModelFingerprint.from_dict(shared.get("model")),
        calibration=CalibrationRecord.from_dict(shared.get("calibration")),
        cost=CostRecord.from_dict(shared.get("cost")),
        warnings=list(shared.get("warnings") or []),
        notes=list(shared.get("notes") or []),
        versions=dict(shared.get("versions") or {}),
    )
    return combine(stacks, whole)
