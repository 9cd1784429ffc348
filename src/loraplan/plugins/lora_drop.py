"""LoRA-drop (Zhou et al., COLING 2025, "LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation";
no public code): a layer matters as much as its LoRA changes its output.

A temporary LoRA on every layer is trained briefly on the calibration data (``lora_drop_steps``), then layer i's
importance is ``Σ_samples ||ΔW_i x||²`` (the squared norm of the LoRA branch's output, summed over the layer's target
modules and each sample's non-pad tokens; :mod:`loraplan.calibration.warmup`), normalised to sum to 1 over the
layers. The paper keeps layers by importance until their cumulative share reaches 0.9: ``cumulative=0.9``; ``ratio``
and ``count`` keep the top ones as with any selector. The warm-up weights are discarded.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import PlanConfig
from ..hooks import hookimpl
from ..strategies import LORA_OUTPUTS, SelectionContext, Selector


class LoraDropSelector(Selector):
    """LoRA-drop's output-based importance (the paper's setting: ``cumulative=0.9``)."""

    name = "lora_drop"
    requires = frozenset({LORA_OUTPUTS})

    def minimum_samples(self, config: PlanConfig) -> int:
        return 1

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        outputs = ctx.stats.lora_outputs
        assert outputs is not None
        totals = outputs.sum(dim=0)
        whole = float(totals.sum())
        shares = [float(v) / whole if whole > 0 else 1.0 / ctx.num_layers for v in totals]
        return {"lora_drop": shares, "importance": list(shares)}


@hookimpl
def loraplan_register_selectors(register: Callable[[Selector], None]) -> None:
    register(LoraDropSelector())
