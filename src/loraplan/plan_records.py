"""The sub-records of a :class:`~loraplan.plan.LoraPlan`, one small dataclass each: the model fingerprint (file key
``model``), the layer stack (``layers``), the calibration facts (``calibration``), the cost model's record (``cost``)
and the calibration diagnostics (``diagnostics``); docs/plan.md lists their keys.

Each record is its JSON object, typed: one attribute per key the planner writes (``class`` is ``class_name``), and
``extra`` for any other key a file holds (a newer version's, a plugin's), written back as it was read. The file
format does not change:

- a record built in code (``CalibrationRecord(num_samples=16, ...)``) writes every key the planner always writes,
  ``None`` as ``null``, and each of its optional keys (``_OPTIONAL``) that is not ``None``;
- a record read from a file (:meth:`PlanRecord.from_dict`) writes back exactly the keys it had, ``null`` included,
  so a plan file loads and saves to the same bytes; setting an attribute adds its key (an optional key set to
  ``None`` is left out again).

A record is also a read-only mapping over its JSON form (``plan.calibration["num_samples"]``,
``plan.cost.get("predicted")``, ``plan.stack == {...}``), as the plain dicts it replaces were; ``record[key] = value``
sets the attribute (or ``extra``), for code and plugins written against those dicts.

This module imports only leaf modules (:mod:`loraplan.cost.prediction`), so any module may import it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .cost.prediction import LayerCosts

__all__ = [
    "VOLATILE_CONFIG_KEYS",
    "config_hash",
    "CalibrationRecord",
    "CostRecord",
    "DiagnosticsRecord",
    "ModelFingerprint",
    "PlanRecord",
    "StackRecord",
    "json_ready",
]

R = TypeVar("R", bound="PlanRecord")

#: config keys that do not change the network (names, dtypes, heads, runtime switches): left out of the config hash
VOLATILE_CONFIG_KEYS = frozenset(
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


def config_hash(config: dict[str, Any]) -> str:
    """``"sha256:"`` and 16 hex digits of a model config's network-defining keys (without the volatile ones)."""
    relevant = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(json_ready(relevant), sort_keys=True, default=str).encode()).hexdigest()
    return "sha256:" + digest[:16]


def json_ready(value: Any) -> Any:
    """JSON-ready: nan/inf become null, tuples become lists, floats are rounded to 10 significant digits, a record
    is its :meth:`~PlanRecord.to_dict`."""
    if isinstance(value, PlanRecord):
        value = value.to_dict()
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.10g}")
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


class PlanRecord(Mapping[str, Any]):
    """The base of every sub-record: the key bookkeeping and the mapping view (see the module docstring)."""

    #: attribute -> JSON key, where they differ
    _RENAMED: ClassVar[dict[str, str]] = {}
    #: JSON keys written only when set (not ``None``)
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    #: attributes that are not one key (the cost model's :class:`LayerCosts`, flattened into ``cost``)
    _FLAT: ClassVar[frozenset[str]] = frozenset()

    extra: dict[str, Any]
    #: the keys this record leaves out of its JSON form
    _unset: set[str]

    def __post_init__(self) -> None:
        keys = _keys_of(type(self))
        object.__setattr__(self, "_unset", {key for key in self._OPTIONAL if getattr(self, keys[key]) is None})

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        unset = self.__dict__.get("_unset")
        key = self._RENAMED.get(name, name)
        if unset is None or key not in _keys_of(type(self)):
            return
        if value is None and key in self._OPTIONAL:
            unset.add(key)
        else:
            unset.discard(key)

    # -- the JSON form --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any] | None) -> R:
        """The record a file holds (``None``: an empty one); every key it has is written back, unknown ones in
        ``extra``."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__} is read from a JSON object, got {type(data).__name__}")
        keys = _keys_of(cls)
        values = {attr: data[key] for key, attr in keys.items() if key in data}
        rest = {key: value for key, value in data.items() if key not in keys}
        values.update(cls._flat_from(rest))
        record = cls(**values, extra=rest)  # type: ignore[call-arg]
        object.__setattr__(record, "_unset", {key for key in keys if key not in data})
        return record

    @classmethod
    def of(cls: type[R], value: R | Mapping[str, Any] | None) -> R:
        """``value`` if it is a record of this kind, else the record its dict describes."""
        return value if isinstance(value, cls) else cls.from_dict(value)

    @classmethod
    def empty(cls: type[R]) -> R:
        """A record without any key (``{}`` in the file): what a plan made in code without it holds."""
        return cls.from_dict({})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (before :func:`json_ready`; the values are not copied)."""
        return {**self._own(), **self.extra}

    def copy(self: R) -> R:
        """A copy with the same keys (the values not copied, but for the cost model's)."""
        return self.from_dict(self.to_dict())

    def replace(self: R, **changes: Any) -> R:
        """A :meth:`copy` with ``changes`` set as attributes."""
        other = self.copy()
        for name, value in changes.items():
            setattr(other, name, value)
        return other

    @classmethod
    def _flat_from(cls, rest: dict[str, Any]) -> dict[str, Any]:
        """The flattened attributes' values, their keys taken out of ``rest``."""
        return {}

    def _own(self) -> dict[str, Any]:
        return {key: getattr(self, attr) for key, attr in _keys_of(type(self)).items() if key not in self._unset}

    # -- the mapping view -----------------------------------------------------------------------------------------
    def _view(self) -> dict[str, Any]:
        return self.to_dict()

    def __getitem__(self, key: str) -> Any:
        return self._view()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view())

    def __len__(self) -> int:
        return len(self._view())

    def __setitem__(self, key: str, value: Any) -> None:
        attr = _keys_of(type(self)).get(key)
        if attr is not None:
            setattr(self, attr, value)
        else:
            self.extra[key] = value

    def update(self, other: Mapping[str, Any] | None = None, /, **values: Any) -> None:
        for key, value in {**(other or {}), **values}.items():
            self[key] = value


@functools.cache
def _keys_of(cls: type[PlanRecord]) -> dict[str, str]:
    """JSON key -> attribute of a record class, in the order the attributes are declared."""
    return {
        cls._RENAMED.get(f.name, f.name): f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name != "extra" and f.name not in cls._FLAT
    }


@dataclass(eq=False, kw_only=True)
class ModelFingerprint(PlanRecord):
    """The model a plan was made for (file key ``model``; see :func:`loraplan.plan.fingerprint`)."""

    #: the model's class name (JSON key ``class``)
    class_name: str | None = None
    model_type: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    #: the layer stack's path (``None`` in an encoder-decoder model's plan: see ``stacks``)
    layers_path: str | None = None
    #: ``"sha256:"`` and 16 hex digits of the network-defining config (without :data:`VOLATILE_CONFIG_KEYS`)
    config_hash: str | None = None
    #: an encoder-decoder model's: the paths of its layer stacks, encoder first
    stacks: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _RENAMED = {"class_name": "class"}
    _OPTIONAL = frozenset({"stacks"})


@dataclass(eq=False, kw_only=True)
class StackRecord(PlanRecord):
    """How the layer stack and its LoRA targets look (file key ``layers``; ``LoraPlan.stack``)."""

    #: dotted path of the layer stack (``model.layers``)
    path: str | None = None
    #: the name PEFT's ``layers_pattern`` would use (``layers``)
    pattern: str | None = None
    #: another module list of the model has the same name
    ambiguous: bool | None = None
    #: the target module names calibration read (leaf names)
    target_modules: list[str] | None = None
    #: [in, out] features of each of them in a block, by name inside the block
    module_shapes: dict[str, list[int]] | None = None
    #: where the targets came from: ``"config"``, ``"peft"`` or ``"all-linear"``
    targets_from: str | None = None
    #: the model's other text layer stacks with their linear modules (``path``, ``num_layers``, ``modules``)
    other_stacks: list[dict[str, Any]] | None = None
    #: an encoder-decoder model's stack: ``"encoder"`` or ``"decoder"``, and how its hidden states were pooled
    name: str | None = None
    pooling: str | None = None
    #: an encoder-decoder model's plan (in memory, not in the file): the paths of its stacks
    stacks: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL = frozenset({"targets_from", "other_stacks", "name", "pooling", "stacks"})


@dataclass(eq=False, kw_only=True)
class CalibrationRecord(PlanRecord):
    """The calibration facts (file key ``calibration``)."""

    num_samples: int | None = None
    num_tokens: int | None = None
    max_length: int | None = None
    batch_size: int | None = None
    #: sha256 of the token ids, in sample order (``"sha256:"`` and 16 hex digits)
    data_hash: str | None = None
    seed: int | None = None
    #: how hidden states were pooled; an encoder-decoder model's: stack name -> pooling
    pooling: str | dict[Any, Any] | None = None
    last_token: str | None = None
    dtype: str | None = None
    device: str | None = None
    #: the statistics the calibration pass collected, sorted
    statistics: list[str] | None = None
    #: ``"by length"`` when the forward-only statistics were batched shortest first
    batching: str | None = None
    #: the LoRA-drop warm-up's record
    lora_drop: dict[str, Any] | None = None
    #: ``"4-bit nf4"`` or ``"8-bit"`` for a bitsandbytes model
    quantization: str | None = None
    #: the LoRA config's ``r`` the plan was made for, when it was known
    base_rank: int | None = None
    #: where a weight-only selector read the weights: ``"model"`` (in memory) or ``"checkpoint"`` (streamed)
    weights: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL = frozenset({"batching", "lora_drop", "quantization", "base_rank", "weights"})


@dataclass(eq=False, kw_only=True)
class DiagnosticsRecord(PlanRecord):
    """Per hidden state ``h_0..h_L`` of the calibration data (file key ``diagnostics``); empty without hidden
    states."""

    #: the largest share of the variance across samples that one sample carries (NaN, ``None`` in a plan read
    #: from its file: not defined)
    max_sample_variance_share: Sequence[float | None] | None = None
    #: the number of distinct vectors among the samples
    distinct_vectors: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL = frozenset({"max_sample_variance_share", "distinct_vectors"})


#: the keys of a cost record that are the cost model's (:class:`LayerCosts`)
_COST_FIELDS = frozenset(f.name for f in dataclasses.fields(LayerCosts))


@dataclass(eq=False, kw_only=True)
class CostRecord(PlanRecord):
    """The cost model's record (file key ``cost``): its per-layer costs (:class:`LayerCosts`, flattened into the
    record), the predicted step-time and peak-memory ratios versus LoRA on every layer, and, with a time or parameter
    budget, the trade-off the selection made; or why there is no cost model (``unavailable``)."""

    #: the cost model; ``None`` without one (or where a file's cost keys do not read back as one: they stay in
    #: ``extra``)
    costs: LayerCosts | None = None
    #: ``{"checkpointing" | "no_checkpointing": {"loraplan" | "stock" | ...: {"time": ratio, "memory": ratio}}}``
    predicted: dict[str, Any] | None = None
    #: the budget's record: an object with ``to_dict()`` (written as that) or its dict (what a file reads back)
    budget: Any = None
    #: why the plan has no cost model
    unavailable: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL = frozenset({"predicted", "budget", "unavailable"})
    _FLAT = frozenset({"costs"})

    def budget_dict(self) -> dict[str, Any] | None:
        """The budget's record as the file holds it, or ``None``."""
        return _budget_json(self.budget)

    def to_dict(self) -> dict[str, Any]:
        own = self._own()
        if "budget" in own:
            own["budget"] = _budget_json(own["budget"])
        return {**(self.costs.to_dict() if self.costs is not None else {}), **own, **self.extra}

    def _view(self) -> dict[str, Any]:
        data = self.to_dict()
        if self.costs is not None:  # the cost model's own values, so that `cost["notes"].append(...)` still works
            data.update({key: getattr(self.costs, key) for key in self.costs.to_dict()})
        return data

    def __setitem__(self, key: str, value: Any) -> None:
        if self.costs is not None and key in _COST_FIELDS:
            setattr(self.costs, key, value)
        else:
            super().__setitem__(key, value)

    @classmethod
    def _flat_from(cls, rest: dict[str, Any]) -> dict[str, Any]:
        costs = _layer_costs(rest)
        for key in costs.to_dict() if costs is not None else ():
            del rest[key]
        return {"costs": costs}


def _layer_costs(data: dict[str, Any]) -> LayerCosts | None:
    """The cost model in a cost record's keys, where it reads back to exactly those keys; else ``None``."""
    known = {key: value for key, value in data.items() if key in _COST_FIELDS}
    if not known:
        return None
    try:
        costs = LayerCosts.from_dict(known)
    except TypeError:  # a key it needs is missing
        return None
    return costs if set(costs.to_dict()) == set(known) else None


def _budget_json(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else value
