"""The sharer's groups among the selected layers, and what the plan says about them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..strategies import SharingContext, check_groups, shares_unselected
from .counting import adapted_layers

if TYPE_CHECKING:
    from ..calibration import CalibrationStats
    from ..config import PlanConfig
    from ..hooks.calls import Registered

__all__ = ["Sharing", "rest_notes", "share"]


@dataclass
class Sharing:
    """The share groups (layers that use one LoRA module set), the similarity they were formed from (``None`` for a
    sharer that does not group by similarity) and the sharer's own scores."""

    groups: list[list[int]] = field(default_factory=list)
    similarity: list[list[float]] | None = None
    scores: dict[str, list[float]] = field(default_factory=dict)


def share(
    sharer: Registered | None,
    stats: CalibrationStats,
    config: PlanConfig,
    num_layers: int,
    selected: list[int],
    warnings: list[str],
) -> Sharing:
    """The sharer's groups among the selected layers (none without a sharer); a sharer that forms no group adds the
    warning that says why to ``warnings``."""
    if sharer is None:
        return Sharing()
    result = check_groups(
        sharer, sharer.call("share", SharingContext(stats, config, num_layers, list(selected))), selected, num_layers
    )
    if not result.groups and not shares_unselected(sharer):
        warnings.append(_no_groups(config, selected, result.similarity))
    return Sharing(result.groups, result.similarity, dict(result.scores))


def _no_groups(config: PlanConfig, selected: list[int], similarity: list[list[float]] | None) -> str:
    """The warning for a sharer that formed no group, with the advice that fits why."""
    if len(selected) < 2:
        return (
            f"`share` {config.share!r}: only {len(selected)} layer is selected ({selected}), so no layers can share "
            "a module. Select more layers (ratio, count or a budget), or set share=None."
        )
    head = f"`share` {config.share!r} formed no share group among the {len(selected)} selected layers {selected}"
    if similarity is None:  # a sharer that does not group by similarity: the threshold is not what decides
        return head + "; no layers share."
    best = max(similarity[i][j] for i in selected for j in selected if j > i)
    if best < config.share_threshold:
        at_most = math.floor(best * 1e4) / 1e4
        return (
            f"{head} (highest similarity between them: {best:.4f}, below `share_threshold` "
            f"{config.share_threshold}); no layers share. Lower share_threshold to at most {at_most} to form groups."
        )
    return f"{head} although their highest similarity ({best:.4f}) reaches `share_threshold`; no layers share."


def rest_notes(selected: Sequence[int], groups: Sequence[Sequence[int]]) -> list[str]:
    """The plan's note on a shared rest (layers that carry LoRA only through a share group): what it leaves the
    truncated backward to skip."""
    adapted = adapted_layers(selected, groups)
    chosen = set(selected)
    rest = [i for i in adapted if i not in chosen]
    if not rest:
        return []
    lowest = min(adapted)
    return [
        f"shared rest: layers {rest} are not selected and carry LoRA through one shared module set per target "
        f"module; the lowest adapted layer is {lowest}, so the truncated backward "
        + ("has nothing to skip" if lowest == 0 else f"skips only layers 0..{lowest - 1}")
        + " (LoRA-drop trains every layer)"
    ]
