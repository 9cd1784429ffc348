"""ShareLoRA's naive baseline (Table 1): each odd layer shares with the even layer below it."""

from __future__ import annotations

from collections.abc import Callable

from ..hooks import hookimpl
from ..sharing import odd_even_groups
from ..strategies import Sharer, SharingContext, SharingResult


class OddEvenSharer(Sharer):
    name = "odd_even"

    def share(self, ctx: SharingContext) -> SharingResult:
        return SharingResult(groups=odd_even_groups(ctx.selected))


@hookimpl
def loraplan_register_sharers(register: Callable[[Sharer], None]) -> None:
    register(OddEvenSharer())
