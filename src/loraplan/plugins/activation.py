"""Activation-guided selection (Act-LoRA): layers whose LoRA modules see the largest inputs.

Score of layer i: the mean L2 norm, over the non-pad tokens of all calibration samples, of the inputs of the
layer's LoRA target modules, averaged over those modules.
"""

from __future__ import annotations

from collections.abc import Callable

from ..hooks import hookimpl
from ..strategies import ACTIVATIONS, SelectionContext, Selector


class ActivationSelector(Selector):
    name = "activation"
    requires = frozenset({ACTIVATIONS})

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        sums = ctx.stats.activation_sums
        assert sums is not None
        total_tokens = float(ctx.stats.tokens.sum())
        scores = [float(v) / total_tokens for v in sums.sum(dim=0)]
        return {"activation": scores, "importance": list(scores)}


@hookimpl
def loraplan_register_selectors(register: Callable[[Selector], None]) -> None:
    register(ActivationSelector())
