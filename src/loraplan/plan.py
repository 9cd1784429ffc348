"""`LoraPlan`: the decisions and everything needed to reproduce and check them, as a small JSON document."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .allocation import counting
from .errors import LayerDiscoveryError, PlanMismatchError
from .layers import find_layers, hidden_size, stack_at, text_config, unwrap
from .layout import plan_lora_config
from .plan_records import (
    CalibrationRecord,
    CostRecord,
    DiagnosticsRecord,
    ModelFingerprint,
    PlanRecord,
    StackRecord,
    config_hash,
    json_ready,
)
from .plan_stacks import FORMAT, FORMAT_STACKS, stacks_from_dict, stacks_to_dict

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

__all__ = ["PLAN_FILE", "FORMAT", "LoraPlan", "fingerprint"]

logger = logging.getLogger("loraplan")

#: the plan's file name beside an adapter or in a trainer's output directory
PLAN_FILE = "loraplan.json"


def _nan(values: list[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def fingerprint(model: nn.Module, stack: Any = None) -> ModelFingerprint:
    """Class, layer count, hidden size, layer path and a hash of the network-defining config of ``model``."""
    base = unwrap(model)
    stack = stack if stack is not None else find_layers(base)
    config = getattr(base, "config", None)
    return ModelFingerprint(
        class_name=type(base).__name__,
        model_type=getattr(config, "model_type", None),
        num_layers=stack.num_layers,
        hidden_size=hidden_size(text_config(base)),
        layers_path=stack.path,
        config_hash=config_hash(config.to_dict() if config is not None else {}),
    )


@dataclass
class LoraPlan:
    """Which layers get LoRA, which share one module, at what rank, and why.

    Build one with :func:`loraplan.make_plan`; save it with :meth:`save` and read it back with :meth:`load`.
    """

    num_layers: int
    selected_layers: list[int]
    #: layers that use one LoRA module set; a group may hold layers outside ``selected_layers``, which then carry
    #: LoRA through it only (LoRA-drop's shared rest)
    share_groups: list[list[int]] = field(default_factory=list)
    rank: int | None = None
    #: per-layer ranks (``rank_policy="importance"``): layer -> rank; layers not listed use :meth:`resolve_rank`
    rank_pattern: dict[int, int] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    similarity: list[list[float]] | None = None
    #: every PlanConfig setting
    config: dict[str, Any] = field(default_factory=dict)
    #: the model it was made for (see :func:`fingerprint`); JSON key ``model``
    model_fingerprint: ModelFingerprint = field(default_factory=ModelFingerprint.empty)
    #: how the layer stack and its LoRA targets look: path, pattern, ambiguity, target module names and shapes,
    #: other text stacks; JSON key ``layers``
    stack: StackRecord = field(default_factory=StackRecord.empty)
    #: calibration facts: samples, tokens, max length, data hash, seed, pooling, dtype, device, base rank
    calibration: CalibrationRecord = field(default_factory=CalibrationRecord.empty)
    #: layers that could not be scored, with the reason (never selected)
    flagged_layers: dict[int, str] = field(default_factory=dict)
    #: per-layer diagnostics of the calibration data (e.g. the largest variance share of a single sample)
    diagnostics: DiagnosticsRecord = field(default_factory=DiagnosticsRecord.empty)
    #: rank correlation of each ranking across disjoint halves of the calibration data
    stability: dict[str, float] = field(default_factory=dict)
    #: the cost model (see :mod:`loraplan.cost`): per-layer costs, predicted step-time and peak-memory ratios versus
    #: LoRA on every layer, and, with a time or parameter budget, the trade-off the selection made
    cost: CostRecord = field(default_factory=CostRecord.empty)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    #: an encoder-decoder model's plan per stack (own layer indices; see :mod:`loraplan.plan_stacks`); empty for one
    #: stack. With stacks, the fields above describe them as one index space, encoder layers first
    stacks: list[LoraPlan] = field(default_factory=list)
    format: str = FORMAT

    def __setattr__(self, name: str, value: Any) -> None:
        """The sub-records (:mod:`loraplan.plan_records`) may be given as their dicts, here and in the constructor."""
        kind = _RECORDS.get(name)
        super().__setattr__(name, kind.of(value) if kind is not None else value)

    # -- derived ------------------------------------------------------------------------------------------------
    @property
    def selector(self) -> str:
        return self.config.get("selector", "")

    @property
    def share(self) -> str | None:
        return self.config.get("share")

    def stack_plans(self) -> list[LoraPlan]:
        """The plan of each layer stack: this plan itself for one stack, an encoder-decoder model's per stack."""
        return list(self.stacks) or [self]

    @property
    def stack_path(self) -> str | None:
        """Dotted path of the layer stack the plan is about (``layers.path``; older plans: the fingerprint's)."""
        return self.stack.path or self.model_fingerprint.layers_path

    @property
    def model(self) -> ModelFingerprint:
        """Deprecated name of :attr:`model_fingerprint` (the JSON key stays ``model``)."""
        _renamed("model", "model_fingerprint")
        return self.model_fingerprint

    @model.setter
    def model(self, value: ModelFingerprint | dict[str, Any]) -> None:
        _renamed("model", "model_fingerprint")
        self.model_fingerprint = ModelFingerprint.of(value)

    @property
    def layers(self) -> StackRecord:
        """Deprecated name of :attr:`stack` (the JSON key stays ``layers``)."""
        _renamed("layers", "stack")
        return self.stack

    @layers.setter
    def layers(self, value: StackRecord | dict[str, Any]) -> None:
        _renamed("layers", "stack")
        self.stack = StackRecord.of(value)

    @property
    def adapted_layers(self) -> list[int]:
        """Every layer that carries LoRA: the selected ones and the members of share groups outside them."""
        return counting.adapted_layers(self.selected_layers, self.share_groups)

    @property
    def shared_rest(self) -> list[int]:
        """The layers that carry LoRA only through a share group (not selected): LoRA-drop's shared rest."""
        selected = set(self.selected_layers)
        return [i for i in self.adapted_layers if i not in selected]

    def layer_rank(self, layer: int, base_rank: int) -> int:
        """The rank of ``layer``'s LoRA modules, given the LoRA config's ``r``."""
        return self.rank_pattern.get(layer, self.resolve_rank(base_rank))

    def group_of(self, layer: int) -> int | None:
        """Index of the share group that holds ``layer``, or ``None``."""
        for number, group in enumerate(self.share_groups):
            if layer in group:
                return number
        return None

    def resolve_rank(self, base_rank: int) -> int:
        """The LoRA rank this plan asks for, given the LoRA config's ``r``."""
        return counting.policy_rank(
            self.config.get("rank_policy", "keep"), self.selected_layers, self.share_groups, base_rank
        )

    def num_modules(self) -> int:
        """Distinct LoRA module sets after sharing: adapted layers minus the layers that reuse a group's."""
        return counting.num_modules(self.selected_layers, self.share_groups)

    def module_ranks(self, base_rank: int) -> list[int]:
        """The rank of every distinct LoRA module set (a share group counts once), in layer order of its first
        layer: what the LoRA parameters are proportional to."""
        return counting.module_ranks(self.selected_layers, self.share_groups, lambda i: self.layer_rank(i, base_rank))

    # -- checks -------------------------------------------------------------------------------------------------
    def validate(self, *, allow_empty: bool = False) -> None:
        """Internal consistency; raises :class:`PlanMismatchError` naming what is wrong. ``allow_empty``: a plan
        that selects no layer is fine (one stack of an encoder-decoder model whose other stack carries the LoRA)."""
        for stack in self.stacks:
            try:
                stack.validate(allow_empty=True)
            except PlanMismatchError as exc:
                raise PlanMismatchError(f"stack `{stack.stack_path}`: {exc}") from None
        L = self.num_layers
        if not self.selected_layers and not allow_empty:
            raise PlanMismatchError("the plan selects no layer; a plan must keep at least one layer.")
        if sorted(set(self.selected_layers)) != self.selected_layers:
            raise PlanMismatchError(f"`selected_layers` must be sorted and unique, got {self.selected_layers}.")
        if any(not isinstance(i, int) or i < 0 or i >= L for i in self.selected_layers):
            raise PlanMismatchError(f"`selected_layers` must be layer indices 0..{L - 1}, got {self.selected_layers}.")
        made_for = self.model_fingerprint.num_layers
        if isinstance(made_for, int) and made_for != L:
            raise PlanMismatchError(
                f"`num_layers` is {L}, but the plan's own model fingerprint (`model.num_layers`) says {made_for}: the "
                "file was edited or mixes two plans. Make the two agree, or recompute the plan."
            )
        for name, values in self.scores.items():
            if len(values) != L:
                raise PlanMismatchError(
                    f"`scores.{name}` has {len(values)} values, but the plan has `num_layers` {L}: the file was edited "
                    "or mixes two plans. Recompute the plan."
                )
        for layer, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise PlanMismatchError(
                    f"`rank_pattern` gives layer {layer} rank {r!r}; ranks are integers >= 1. Give the layer a rank of "
                    "at least 1, or leave it out of rank_pattern (it then gets the plan's rank)."
                )
        seen: set[int] = set()
        for group in self.share_groups:
            if not group:
                raise PlanMismatchError("a share group is empty; a group lists the layers that share one module set.")
            if len(set(group)) < len(group):
                raise PlanMismatchError(f"share group {group} lists a layer twice.")
            if any(not isinstance(i, int) or i < 0 or i >= L for i in group):
                raise PlanMismatchError(f"share group {group} must hold layer indices 0..{L - 1}.")
            if len(group) < 2 and group[0] in self.selected_layers:
                raise PlanMismatchError(
                    f"share group {group} has one selected layer and nothing to share with; a group of selected "
                    "layers needs two or more."
                )
            if seen & set(group):
                raise PlanMismatchError(f"layer(s) {sorted(seen & set(group))} appear in more than one share group.")
            seen |= set(group)
            ranks = {self.rank_pattern.get(i) for i in group}
            if len(ranks) > 1:
                raise PlanMismatchError(
                    f"share group {group} gives its layers different ranks in `rank_pattern` "
                    f"({ {i: self.rank_pattern.get(i) for i in group} }); layers that share one module share its rank."
                )
        adapted = set(self.adapted_layers)
        for layer, r in self.rank_pattern.items():
            if layer not in adapted:
                raise PlanMismatchError(
                    f"`rank_pattern` gives layer {layer} rank {r}, but the layer carries no LoRA in this plan "
                    f"(adapted layers: {sorted(adapted)})."
                )
        flagged = [i for i in self.selected_layers if i in self.flagged_layers]
        if flagged:
            raise PlanMismatchError(f"flagged (unscorable) layers {flagged} must not be selected.")

    def check_model(self, model: nn.Module, stack: Any = None) -> None:
        """Raise :class:`PlanMismatchError` if this plan does not fit ``model`` (layer count, hidden size, layer
        path); log a warning if only the class or the config hash differ."""
        if self.stacks:
            for one in self.stacks:
                one.check_model(model)
            return
        if stack is None and self.stack_path:
            try:
                stack = stack_at(model, self.stack_path)
            except LayerDiscoveryError as exc:
                raise PlanMismatchError(str(exc)) from exc
        current, made_for = fingerprint(model, stack), self.model_fingerprint
        problems = []
        if current.num_layers is not None and self.num_layers != current.num_layers:
            problems.append(f"num_layers: plan {self.num_layers!r}, model {current.num_layers!r}")
        for key in ("num_layers", "hidden_size", "layers_path"):
            want, have = getattr(made_for, key), getattr(current, key)
            if key == "num_layers" and problems:
                continue  # said once, from the plan's own field
            if want is not None and have is not None and want != have:
                problems.append(f"{key}: plan {want!r}, model {have!r}")
        if problems:
            raise PlanMismatchError(
                f"the plan (made for {made_for.class_name}, {made_for.num_layers} layers) does not fit "
                f"this {current.class_name}: " + "; ".join(problems) + ". Recompute the plan for this model, or "
                "load the plan that belongs to it."
            )
        for key, attr in (("class", "class_name"), ("config_hash", "config_hash")):
            want, have = getattr(made_for, attr), getattr(current, attr)
            if want and want != have:
                logger.warning(
                    "the plan was made for a model with %s %r; this model has %r. The layer stack fits, so the plan "
                    "is used.",
                    key,
                    want,
                    have,
                )

    # -- PEFT ---------------------------------------------------------------------------------------------------
    def to_lora_config(self, base_lora_config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
        """A new PEFT ``LoraConfig`` from the user's: its targets decide what gets LoRA, this plan where in the layer
        stack, its rank policy the ranks (see :func:`loraplan.layout.plan_lora_config`). ``model``, the model about
        to be wrapped, is needed for ``target_parameters`` and lets the result be checked against what PEFT will
        build."""
        return plan_lora_config(self, base_lora_config, model)

    # -- persistence --------------------------------------------------------------------------------------------
    def to_dict(self, single: bool = False) -> dict[str, Any]:
        """The plan as its file holds it (``single``: as one stack's, whatever ``stacks`` holds)."""
        if self.stacks and not single:
            return stacks_to_dict(self)
        data = {}
        for f in dataclasses.fields(self):
            key, write, _ = _JSON.get(f.name, (f.name, None, None))
            value = getattr(self, f.name)
            if f.name in _OMITTED_WHEN_EMPTY and not value:
                continue
            data[key] = write(value) if write is not None else value
        return json_ready(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON. A directory gets ``loraplan.json`` inside it."""
        p = Path(path)
        if p.is_dir():
            p = p / PLAN_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file of its own in the same directory, then an atomic replace: concurrent saves to one path
        # (several ranks, several runs) never collide on the temporary name, and a reader sees one whole plan
        handle, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(self.to_json())
            os.chmod(tmp, p.stat().st_mode & 0o777 if p.exists() else 0o644)  # mkstemp makes it 0600
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return p

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "the data") -> LoraPlan:
        """The plan a :meth:`to_dict` document describes. ``source`` names where it came from in errors."""
        if not isinstance(data, dict):
            raise PlanMismatchError(f"{source} is not a loraplan plan: expected a JSON object.")
        if "format" not in data:
            what = "a PEFT adapter config" if "peft_type" in data else "a JSON document without a `format` key"
            raise PlanMismatchError(
                f"{source} is {what}, not a loraplan plan (plans have `format` {FORMAT!r}). loraplan writes the "
                f"plan as {PLAN_FILE} beside a saved adapter and in the trainer's output_dir: give that file, or the "
                "directory that holds it."
            )
        fmt = data.get("format")
        if fmt == FORMAT_STACKS:
            return stacks_from_dict(cls, data)
        if fmt != FORMAT:
            raise PlanMismatchError(
                f"`format` is {fmt!r}; this loraplan reads {FORMAT!r} plans (and {FORMAT_STACKS!r} for "
                "encoder-decoder models). Recompute the plan with this version."
            )
        values: dict[str, Any] = {}
        try:
            for f in dataclasses.fields(cls):
                key, _, read = _JSON.get(f.name, (f.name, None, None))
                if f.name in _REQUIRED:
                    values[f.name] = read(data[key]) if read is not None else data[key]
                elif data.get(key) is not None:  # a missing or null entry reads as the field's default
                    values[f.name] = read(data[key]) if read is not None else data[key]
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanMismatchError(f"the plan is incomplete or malformed ({type(exc).__name__}: {exc}).") from exc

    @classmethod
    def load(cls, path: str | Path) -> LoraPlan:
        """Read a plan written by :meth:`save` (a directory means its ``loraplan.json``)."""
        p = Path(path)
        if p.is_dir():
            p = p / PLAN_FILE
        if not p.is_file():
            raise PlanMismatchError(f"no loraplan plan at {str(p)!r}.")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PlanMismatchError(
                f"{p} is not a loraplan plan: invalid JSON ({exc.msg}, line {exc.lineno})."
            ) from exc
        plan = cls.from_dict(data, source=str(p))
        plan.validate()
        return plan

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoraPlan) and self.to_dict() == other.to_dict()


def _renamed(old: str, new: str) -> None:
    warnings.warn(
        f"LoraPlan.{old} is now LoraPlan.{new} (the plan file keeps the key {old!r})", DeprecationWarning, stacklevel=3
    )


def _ints(values: Any) -> list[int]:
    return [int(i) for i in values]


#: how a field is stored in the plan file when not as it is: field -> (JSON key, to JSON, from JSON)
_JSON: dict[str, tuple[str, Any, Any]] = {
    "num_layers": ("num_layers", None, int),
    "selected_layers": ("selected_layers", list, _ints),
    "share_groups": (
        "share_groups",
        lambda groups: [list(g) for g in groups],
        lambda groups: [_ints(g) for g in groups],
    ),
    "rank_pattern": (
        "rank_pattern",
        lambda ranks: {str(k): int(v) for k, v in sorted(ranks.items())},
        lambda ranks: {int(k): int(v) for k, v in ranks.items()},
    ),
    "scores": ("scores", None, lambda scores: {k: _nan(v) for k, v in scores.items()}),
    "similarity": ("similarity", None, lambda rows: [_nan(row) for row in rows] or None),
    "model_fingerprint": ("model", None, None),  # the sub-records: json_ready writes their to_dict()
    "stack": ("layers", None, None),
    "flagged_layers": (
        "flagged_layers",
        lambda flagged: {str(k): v for k, v in sorted(flagged.items())},
        lambda flagged: {int(k): v for k, v in flagged.items()},
    ),
    "stability": ("stability", None, lambda values: {k: (math.nan if v is None else v) for k, v in values.items()}),
    "warnings": ("warnings", None, list),
    "notes": ("notes", None, list),
}
#: the fields that hold a sub-record (:mod:`loraplan.plan_records`), by field
_RECORDS: dict[str, type[PlanRecord]] = {
    "model_fingerprint": ModelFingerprint,
    "stack": StackRecord,
    "calibration": CalibrationRecord,
    "diagnostics": DiagnosticsRecord,
    "cost": CostRecord,
}
#: fields added after format 1 was first written: left out of the file when empty, so that a plan without them
#: writes the same file as before
_OMITTED_WHEN_EMPTY = frozenset({"rank_pattern", "stacks"})
#: fields a plan file must have
_REQUIRED = frozenset({"num_layers", "selected_layers"})
