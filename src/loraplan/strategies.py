"""What a selector and a sharer are, and the contexts they are given.

Built-in strategies and third-party ones implement the same small interface and register through the same
hooks (:mod:`loraplan.hooks.specs`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ._removed import removed

# the statistics a strategy can ask for are CalibrationStats fields: named where they are collected
from .calibration.stats import _STATISTICS, ACTIVATIONS, GRADIENTS, HIDDEN, LORA_OUTPUTS, CalibrationStats
from .errors import PluginError

if TYPE_CHECKING:
    from .config import PlanConfig
    from .hooks.calls import Registered
    from .weights import WeightSource

__all__ = [
    "ACTIVATIONS",
    "GRADIENTS",
    "HIDDEN",
    "LORA_OUTPUTS",
    "WEIGHTS",
    "CalibrationStats",
    "SelectionContext",
    "Selector",
    "Sharer",
    "SharingContext",
    "SharingResult",
    "check_groups",
    "check_scores",
    "cumulative_pick",
    "shares_unselected",
    "top_k",
]

#: Not a statistic of the calibration pass: a selector that ``requires`` it reads the target modules' weights
#: (:attr:`SelectionContext.weights`, :mod:`loraplan.weights`) and needs no calibration data at all when it requires
#: nothing else (``make_plan(model, None, config)``, ``loraplan analyze DIR`` without ``--data``)
WEIGHTS = "weights"

#: STATISTICS is gone (nothing used it); kept for a release
__getattr__ = removed(__name__, {"STATISTICS": _STATISTICS})


@dataclass
class SelectionContext:
    """What a selector sees."""

    stats: CalibrationStats
    config: PlanConfig
    num_layers: int
    #: the number of layers to keep (from ``ratio`` or ``count``)
    k: int
    #: the target modules' weights, layer by layer, for a selector that requires :data:`WEIGHTS` (else ``None``):
    #: from the model in memory, or streamed from a checkpoint directory without building the model
    weights: WeightSource | None = None


@dataclass
class SharingContext:
    """What a sharer sees."""

    stats: CalibrationStats
    config: PlanConfig
    num_layers: int
    #: the selected layers: share only among these
    selected: list[int]

    @property
    def layers(self) -> list[int]:
        """Deprecated name of :attr:`selected`."""
        warnings.warn("SharingContext.layers is now SharingContext.selected", DeprecationWarning, stacklevel=2)
        return self.selected


@dataclass
class SharingResult:
    """Groups of layers that share one LoRA module, and the similarity matrix they came from (if any)."""

    groups: list[list[int]]
    similarity: list[list[float]] | None = None
    scores: dict[str, list[float]] = field(default_factory=dict)


class Selector:
    """Base class of layer selectors (subclassing is optional: the attributes and methods are what count).

    ``score`` returns per-layer scores by name; it must include ``"importance"`` (higher = keep first) and may
    mark a layer it cannot score with ``nan`` (that layer is never selected). ``choose`` turns importance into
    layers; the default keeps the ``k`` most important, ties broken by the lower layer index.
    """

    name: ClassVar[str] = ""
    #: statistics the calibration pass must collect for this selector
    requires: ClassVar[frozenset[str]] = frozenset()
    #: does the ranking depend on calibration data (False for fixed baselines: no stability score)
    data_dependent: ClassVar[bool] = True

    def minimum_samples(self, config: PlanConfig) -> int:
        """Fewest calibration samples this selector can work with."""
        return 1

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:  # pragma: no cover - interface
        raise NotImplementedError

    def choose(self, ctx: SelectionContext, importance: list[float]) -> list[int]:
        return top_k(importance, ctx.k)


class Sharer:
    """Base class of layer sharers (subclassing is optional).

    ``share`` returns groups of layers that use one LoRA module set. Groups hold selected layers (two or more), unless
    the sharer sets ``shares_unselected``: then a group may also hold layers the selector left out, which carry LoRA
    only through their group (LoRA-drop's shared rest); such a group may be a single unselected layer.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    #: may groups hold layers outside the selection (which then get LoRA through the group)
    shares_unselected: ClassVar[bool] = False

    def minimum_samples(self, config: PlanConfig) -> int:
        return 1

    def share(self, ctx: SharingContext) -> SharingResult:  # pragma: no cover - interface
        raise NotImplementedError


def _rankable(importance: list[float]) -> list[int]:
    """Layer indices with a usable score, most important first; ties by lower index."""
    usable = [i for i, v in enumerate(importance) if v is not None and not math.isnan(v)]
    return sorted(usable, key=lambda i: (-importance[i], i))


def top_k(importance: list[float], k: int) -> list[int]:
    """The ``k`` layers with the highest importance, sorted by index. Unscorable (nan) layers never count."""
    return sorted(_rankable(importance)[:k])


def cumulative_pick(importance: list[float], threshold: float) -> list[int]:
    """The smallest set of most important layers whose normalised importance sums to at least ``threshold``.

    Importances must be non-negative (Act-LoRA's cumulative mode).
    """
    order = _rankable(importance)
    total = sum(importance[i] for i in order)
    if total <= 0:
        return sorted(order[:1])
    picked, acc = [], 0.0
    for i in order:
        picked.append(i)
        acc += importance[i] / total
        if acc >= threshold - 1e-12:
            break
    return sorted(picked)


# -- what the planner accepts from a strategy ---------------------------------------------------------------------


def check_scores(strategy: Registered, scores: Any, num_layers: int) -> list[float]:
    """A selector's scores checked (a dict of one value per layer, with ``"importance"``); its importance as floats,
    ``None`` as nan."""
    if not isinstance(scores, dict) or "importance" not in scores:
        raise PluginError(
            f"plugin {strategy.plugin!r}: selector {strategy.name!r} must return a dict of per-layer scores with an "
            f"'importance' entry, got {type(scores).__name__}"
            + (f" with keys {sorted(scores)}" if isinstance(scores, dict) else "")
            + "."
        )
    for key, values in scores.items():
        if not isinstance(values, (list, tuple)) or len(values) != num_layers:
            raise PluginError(
                f"plugin {strategy.plugin!r}: selector {strategy.name!r} returned "
                f"{len(values) if hasattr(values, '__len__') else values!r} values for score {key!r}; expected one per "
                f"layer ({num_layers})."
            )
    return [float(v) if v is not None else math.nan for v in scores["importance"]]


def shares_unselected(strategy: Registered | None) -> bool:
    """Whether a registered sharer may give LoRA to layers outside the selection (subclassing :class:`Sharer` is
    optional, so a plugin without the attribute does not)."""
    return strategy is not None and bool(getattr(strategy.strategy, "shares_unselected", False))


def check_groups(
    strategy: Registered, result: Any, selected: list[int], num_layers: int | None = None
) -> SharingResult:
    """A sharer's result checked: disjoint groups of two or more selected layers (sorted); with the sharer's
    ``shares_unselected``, groups may also hold other layers of ``0..num_layers-1`` (a group of one such layer too)."""
    if not isinstance(result, SharingResult):
        raise PluginError(
            f"plugin {strategy.plugin!r}: sharer {strategy.name!r} must return a loraplan.strategies.SharingResult, "
            f"got {type(result).__name__}."
        )
    wider = shares_unselected(strategy)
    allowed = set(range(num_layers)) if wider and num_layers is not None else set(selected)
    groups = [sorted(int(i) for i in g) for g in result.groups]
    used: set[int] = set()
    for group in groups:
        bad = [i for i in group if i not in allowed]
        alone = len(set(group)) < 2 and not (wider and group and group[0] not in selected)
        if bad or not group or alone or len(set(group)) < len(group) or used & set(group):
            rule = (
                f"layers 0..{num_layers - 1} (two or more if they are all selected)"
                if wider and num_layers is not None
                else f"two or more distinct selected layers ({selected})"
            )
            raise PluginError(
                f"plugin {strategy.plugin!r}: sharer {strategy.name!r} returned group {group}; groups must hold {rule} "
                "and not overlap."
                + ("" if wider else " A sharer that gives unselected layers LoRA sets `shares_unselected = True`.")
            )
        used |= set(group)
    result.groups = sorted(groups)
    return result
