"""`LoraPlan`: the decisions and everything needed to reproduce and check them, as a small JSON document."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PlanMismatchError

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

__all__ = ["PLAN_FILE", "FORMAT", "LoraPlan", "fingerprint"]

#: the plan's file name beside an adapter or in a trainer's output directory
PLAN_FILE = "loraplan.json"
FORMAT = "loraplan.plan/1"

#: config keys that do not change the network (names, dtypes, heads, runtime switches)
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "quantization_config",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "pad_token_id",
        "tie_word_embeddings",
    }
)


def _clean(value: Any) -> Any:
    """JSON-ready: nan/inf become null, tuples become lists, floats are rounded to 10 significant digits."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.10g}")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _nan(values: list[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _config_of(model: nn.Module) -> Any:
    from .layers import unwrap

    return getattr(unwrap(model), "config", None)


def _hidden_size(config: Any) -> int | None:
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None


def fingerprint(model: nn.Module, stack: Any = None) -> dict[str, Any]:
    """Class, layer count, hidden size, layer path and a hash of the network-defining config of ``model``."""
    from .layers import find_layers, unwrap

    base = unwrap(model)
    stack = stack if stack is not None else find_layers(base)
    config = _config_of(base)
    relevant: dict[str, Any] = {}
    if config is not None:
        relevant = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(_clean(relevant), sort_keys=True, default=str).encode()).hexdigest()
    return {
        "class": type(base).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_layers": stack.num_layers,
        "hidden_size": _hidden_size(config),
        "layers_path": stack.path,
        "config_hash": "sha256:" + digest[:16],
    }


@dataclass
class LoraPlan:
    """Which layers get LoRA, which share one module, at what rank, and why.

    Build one with :func:`loraplan.make_plan`; save it with :meth:`save` and read it back with :meth:`load`.
    """

    num_layers: int
    selected_layers: list[int]
    share_groups: list[list[int]] = field(default_factory=list)
    rank: int | None = None
    scores: dict[str, list[float]] = field(default_factory=dict)
    similarity: list[list[float]] | None = None
    #: every PlanConfig setting
    config: dict[str, Any] = field(default_factory=dict)
    #: model fingerprint (see :func:`fingerprint`)
    model: dict[str, Any] = field(default_factory=dict)
    #: how the layers and their LoRA targets look: path, pattern, ambiguity, target module names and shapes
    layers: dict[str, Any] = field(default_factory=dict)
    #: calibration facts: samples, tokens, max length, data hash, seed, pooling, dtype, device, seconds
    calibration: dict[str, Any] = field(default_factory=dict)
    #: layers that could not be scored, with the reason (never selected)
    flagged_layers: dict[int, str] = field(default_factory=dict)
    #: per-layer diagnostics of the calibration data (e.g. the largest variance share of a single sample)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: rank correlation of each ranking across disjoint halves of the calibration data
    stability: dict[str, float] = field(default_factory=dict)
    #: the cost model (see :mod:`loraplan.cost`): per-layer costs, predicted step-time and peak-memory ratios versus
    #: LoRA on every layer, and, with a time or parameter budget, the trade-off the selection made
    cost: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT

    # -- derived ------------------------------------------------------------------------------------------------
    @property
    def selector(self) -> str:
        return self.config.get("selector", "")

    @property
    def share(self) -> str | None:
        return self.config.get("share")

    @property
    def stack_path(self) -> str | None:
        """Dotted path of the layer stack the plan is about (``layers.path``; older plans: the fingerprint's)."""
        return self.layers.get("path") or self.model.get("layers_path")

    def group_of(self, layer: int) -> int | None:
        """Index of the share group that holds ``layer``, or ``None``."""
        for number, group in enumerate(self.share_groups):
            if layer in group:
                return number
        return None

    def resolve_rank(self, base_rank: int) -> int:
        """The LoRA rank this plan asks for, given the LoRA config's ``r``."""
        from .sharing import expanded_rank

        policy = self.config.get("rank_policy", "keep")
        if isinstance(policy, int):
            return policy
        if policy == "budget":
            return expanded_rank(len(self.selected_layers), self.share_groups, base_rank)
        return base_rank

    def num_modules(self) -> int:
        """Distinct LoRA module sets after sharing: adapted layers minus the layers that reuse a group's."""
        return len(self.selected_layers) - sum(len(g) - 1 for g in self.share_groups)

    # -- checks -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Internal consistency; raises :class:`PlanMismatchError` naming what is wrong."""
        L = self.num_layers
        if not self.selected_layers:
            raise PlanMismatchError("the plan selects no layer; a plan must keep at least one layer.")
        if sorted(set(self.selected_layers)) != self.selected_layers:
            raise PlanMismatchError(f"`selected_layers` must be sorted and unique, got {self.selected_layers}.")
        if any(not isinstance(i, int) or i < 0 or i >= L for i in self.selected_layers):
            raise PlanMismatchError(f"`selected_layers` must be layer indices 0..{L - 1}, got {self.selected_layers}.")
        seen: set[int] = set()
        for group in self.share_groups:
            if len(group) < 2:
                raise PlanMismatchError(f"share group {group} has fewer than two layers.")
            outside = [i for i in group if i not in self.selected_layers]
            if outside:
                raise PlanMismatchError(
                    f"share group {group} contains layers {outside} that are not selected; share only among "
                    "selected layers."
                )
            if seen & set(group):
                raise PlanMismatchError(f"layer(s) {sorted(seen & set(group))} appear in more than one share group.")
            seen |= set(group)
        flagged = [i for i in self.selected_layers if i in self.flagged_layers]
        if flagged:
            raise PlanMismatchError(f"flagged (unscorable) layers {flagged} must not be selected.")

    def check_model(self, model: nn.Module, stack: Any = None) -> None:
        """Raise :class:`PlanMismatchError` if this plan does not fit ``model`` (layer count, hidden size, layer
        path); log a warning if only the class or the config hash differ."""
        import logging

        from .errors import LayerDiscoveryError
        from .layers import stack_at

        if stack is None and self.stack_path:
            try:
                stack = stack_at(model, self.stack_path)
            except LayerDiscoveryError as exc:
                raise PlanMismatchError(str(exc)) from exc
        current = fingerprint(model, stack)
        problems = []
        for key in ("num_layers", "hidden_size", "layers_path"):
            want = self.model.get(key)
            if want is not None and current.get(key) is not None and want != current[key]:
                problems.append(f"{key}: plan {want!r}, model {current[key]!r}")
        if problems:
            raise PlanMismatchError(
                f"the plan (made for {self.model.get('class')}, {self.model.get('num_layers')} layers) does not fit "
                f"this {current['class']}: " + "; ".join(problems) + ". Recompute the plan for this model, or "
                "load the plan that belongs to it."
            )
        for key in ("class", "config_hash"):
            if self.model.get(key) and self.model[key] != current[key]:
                logging.getLogger("loraplan").warning(
                    "the plan was made for a model with %s %r; this model has %r. The layer stack fits, so the plan "
                    "is used.",
                    key,
                    self.model[key],
                    current[key],
                )

    # -- PEFT ---------------------------------------------------------------------------------------------------
    def to_lora_config(self, base_lora_config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
        """A new PEFT ``LoraConfig`` from the user's: its targets decide what gets LoRA, this plan where in the layer
        stack, its rank policy the ranks (see :func:`loraplan.layout.plan_lora_config`). ``model``, the model about
        to be wrapped, is needed for ``target_parameters`` and lets the result be checked against what PEFT will
        build."""
        from .layout import plan_lora_config

        return plan_lora_config(self, base_lora_config, model)

    # -- persistence --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": self.format,
            "num_layers": self.num_layers,
            "selected_layers": list(self.selected_layers),
            "share_groups": [list(g) for g in self.share_groups],
            "rank": self.rank,
            "scores": self.scores,
            "similarity": self.similarity,
            "config": self.config,
            "model": self.model,
            "layers": self.layers,
            "calibration": self.calibration,
            "flagged_layers": {str(k): v for k, v in sorted(self.flagged_layers.items())},
            "diagnostics": self.diagnostics,
            "stability": self.stability,
            "cost": self.cost,
            "warnings": self.warnings,
            "notes": self.notes,
            "versions": self.versions,
        }
        return _clean(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON. A directory gets ``loraplan.json`` inside it."""
        p = Path(path)
        if p.is_dir():
            p = p / PLAN_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(p)
        return p

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraPlan:
        fmt = data.get("format")
        if fmt != FORMAT:
            raise PlanMismatchError(
                f"`format` is {fmt!r}; this loraplan reads {FORMAT!r} plans. Recompute the plan with this version."
            )
        try:
            return cls(
                num_layers=int(data["num_layers"]),
                selected_layers=[int(i) for i in data["selected_layers"]],
                share_groups=[[int(i) for i in g] for g in data.get("share_groups") or []],
                rank=data.get("rank"),
                scores={k: _nan(v) for k, v in (data.get("scores") or {}).items()},
                similarity=[_nan(row) for row in data["similarity"]] if data.get("similarity") else None,
                config=data.get("config") or {},
                model=data.get("model") or {},
                layers=data.get("layers") or {},
                calibration=data.get("calibration") or {},
                flagged_layers={int(k): v for k, v in (data.get("flagged_layers") or {}).items()},
                diagnostics=data.get("diagnostics") or {},
                stability={k: (math.nan if v is None else v) for k, v in (data.get("stability") or {}).items()},
                cost=data.get("cost") or {},
                warnings=list(data.get("warnings") or []),
                notes=list(data.get("notes") or []),
                versions=data.get("versions") or {},
            )
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
            raise PlanMismatchError(f"{p} is not a loraplan plan: invalid JSON ({exc.msg}, line {exc.lineno}).") from exc
        if not isinstance(data, dict):
            raise PlanMismatchError(f"{p} is not a loraplan plan: expected a JSON object.")
        plan = cls.from_dict(data)
        plan.validate()
        return plan

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoraPlan) and self.to_dict() == other.to_dict()
