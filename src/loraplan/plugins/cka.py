"""CKA layer selection ("Layer-wise LoRA fine-tuning: a similarity metric approach").

Block ``i`` gets ``cka_i = CKA(h_i, h_{i+1})`` between its input and output; importance is ``1 - cka``; the
layers that change the representation most (lowest CKA) are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config import PlanConfig
from ..hooks import hookimpl
from ..similarity import linear_cka
from ..strategies import HIDDEN, SelectionContext, Selector


class CkaSelector(Selector):
    name = "cka"
    requires = frozenset({HIDDEN})

    def minimum_samples(self, config: PlanConfig) -> int:
        return 4 if config.debiased else 2

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        hidden = ctx.stats.hidden
        assert hidden is not None
        cka = [linear_cka(hidden[i], hidden[i + 1], debiased=ctx.config.debiased) for i in range(ctx.num_layers)]
        return {"cka": cka, "importance": [1.0 - c if not math.isnan(c) else math.nan for c in cka]}


@hookimpl
def loraplan_register_selectors(register: Callable[[Selector], None]) -> None:
    register(CkaSelector())
