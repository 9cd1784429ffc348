"""Gradient-norm importance, Act-LoRA's comparison: sum over the target modules of ``||dLoss/dW||_F``, averaged
over calibration batches."""

from __future__ import annotations

from collections.abc import Callable

from ..hooks import hookimpl
from ..strategies import GRADIENTS, SelectionContext, Selector


class GradientSelector(Selector):
    name = "gradient"
    requires = frozenset({GRADIENTS})

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        grads = ctx.stats.gradients
        assert grads is not None
        scores = [float(v) for v in grads.mean(dim=0)]
        return {"gradient": scores, "importance": list(scores)}


@hookimpl
def loraplan_register_selectors(register: Callable[[Selector], None]) -> None:
    register(GradientSelector())
