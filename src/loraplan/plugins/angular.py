"""ShareLoRA sharing: group layers whose outputs are similar in angle (the paper's Algorithm 1)."""

from __future__ import annotations

from collections.abc import Callable

from ..hooks import hookimpl
from ..sharing import group_layers
from ..similarity import angular_similarity
from ..strategies import HIDDEN, Sharer, SharingContext, SharingResult


class AngularSharer(Sharer):
    name = "angular"
    requires = frozenset({HIDDEN})

    def share(self, ctx: SharingContext) -> SharingResult:
        hidden = ctx.stats.hidden
        assert hidden is not None
        similarity = angular_similarity(hidden[1:])  # outputs h_{i+1} of blocks i = 0..L-1
        groups = group_layers(similarity, ctx.config.share_threshold, ctx.selected)
        return SharingResult(groups=groups, similarity=similarity)


@hookimpl
def loraplan_register_sharers(register: Callable[[Sharer], None]) -> None:
    register(AngularSharer())
