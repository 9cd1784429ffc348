"""LoRA-drop's shared rest (Zhou et al., COLING 2025): the layers the selector left out still get LoRA, all of them
through one module set per target module (one ``lora_A``/``lora_B`` for ``q_proj`` of every such layer, one for
``v_proj``, ...), so the whole network adapts for the parameters of one more layer."""

from __future__ import annotations

from collections.abc import Callable

from ..hooks import hookimpl
from ..strategies import Sharer, SharingContext, SharingResult


class SharedRestSharer(Sharer):
    name = "lora_drop"
    shares_unselected = True

    def share(self, ctx: SharingContext) -> SharingResult:
        chosen = set(ctx.selected)
        rest = [i for i in range(ctx.num_layers) if i not in chosen]
        return SharingResult(groups=[rest] if rest else [])


@hookimpl
def loraplan_register_sharers(register: Callable[[Sharer], None]) -> None:
    register(SharedRestSharer())
