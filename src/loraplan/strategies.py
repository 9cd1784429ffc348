"""What a selector and a sharer are, and the contexts they are given.

Built-in strategies and third-party ones implement the same small interface and register through the same
hooks (:mod:`loraplan.hooks.specs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .calibration import CalibrationStats
    from .config import PlanConfig

__all__ = [
    "HIDDEN",
    "ACTIVATIONS",
    "GRADIENTS",
    "SelectionContext",
    "Selector",
    "Sharer",
    "SharingContext",
    "SharingResult",
    "cumulative_pick",
    "top_k",
]

#: Statistics a strategy can ask the calibration pass for.
HIDDEN = "hidden"  # pooled residual-stream vectors h_0..h_L, one per sample
ACTIVATIONS = "activations"  # input norms of the LoRA target modules, per sample and layer
GRADIENTS = "gradients"  # Frobenius norms of dLoss/dW of the target modules, per batch and layer
STATISTICS = (HIDDEN, ACTIVATIONS, GRADIENTS)


@dataclass
class SelectionContext:
    """What a selector sees."""

    stats: CalibrationStats
    config: PlanConfig
    num_layers: int
    #: the number of layers to keep (from ``ratio`` or ``count``)
    k: int


@dataclass
class SharingContext:
    """What a sharer sees."""

    stats: CalibrationStats
    config: PlanConfig
    num_layers: int
    #: the selected layers: share only among these
    layers: list[int]


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
    """Base class of layer sharers (subclassing is optional)."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()

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
