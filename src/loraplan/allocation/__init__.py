"""The allocation decision: which layers get LoRA, which share one module set, at what ranks, within which budget.

From the selector's verdict (:func:`score`) and the calibration statistics, :func:`allocate` returns one
:class:`Allocation`: the selected layers (:mod:`.selection`: by the selector, by ``cumulative``, or within a time or
parameter budget with the cost model, :mod:`.budget`), the share groups among them (:mod:`.sharing`), the per-layer
ranks (:mod:`.ranks`, ``rank_policy="importance"``), the budget's record (:mod:`.records`) and the notes and warnings
the plan keeps. :mod:`.counting` counts what a layout trains (adapted layers, module sets, their ranks), for the
search before any plan exists and for :class:`~loraplan.plan.LoraPlan` after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .budget import Completion, completion, select_within_budget
from .counting import adapted_layers, expanded_rank, module_ranks, num_modules, policy_rank
from .ranks import Ranks, allocate_ranks, importance_base, importance_ranks
from .records import BudgetRecord, RankedBudget, RanksRecord, SearchBudget
from .selection import Scoring, score, select
from .sharing import Sharing, rest_notes, share

if TYPE_CHECKING:
    from ..calibration import CalibrationStats
    from ..config import PlanConfig
    from ..cost.prediction import LayerCosts
    from ..hooks.calls import Registered

__all__ = [
    "Allocation",
    "BudgetRecord",
    "Completion",
    "RankedBudget",
    "Ranks",
    "RanksRecord",
    "Scoring",
    "SearchBudget",
    "Sharing",
    "adapted_layers",
    "allocate",
    "allocate_ranks",
    "completion",
    "expanded_rank",
    "module_ranks",
    "num_modules",
    "policy_rank",
    "score",
    "select",
    "select_within_budget",
]


@dataclass
class Allocation:
    """What one layer stack trains: the selected layers, the share groups, the per-layer ranks, the budget's record,
    and what the plan says about them (``notes``, and ``warnings`` in the order they arose)."""

    selected: list[int]
    sharing: Sharing
    ranks: Ranks
    budget: BudgetRecord | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def allocate(
    scoring: Scoring,
    sharer: Registered | None,
    stats: CalibrationStats,
    config: PlanConfig,
    *,
    base_rank: int | None,
    costs: LayerCosts | None,
    cost_problem: str | None = None,
    allow_empty: bool = False,
) -> Allocation:
    """Select, share and rank one stack's layers from the selector's ``scoring`` (see the module docstring).

    ``base_rank`` is the LoRA config's ``r`` where known; ``costs`` the cost model (``None``, and ``cost_problem``
    saying why, where there is none: a budget then is an error). ``allow_empty``: selecting no layer is allowed (one
    stack of an encoder-decoder model, the other carrying the LoRA)."""
    num_layers = len(scoring.importance)
    warnings: list[str] = []
    complete = completion(sharer, stats, config, num_layers, costs.rank if costs else base_rank)
    selected, budget = select(scoring, config, costs, cost_problem, base_rank, complete, allow_empty=allow_empty)
    sharing = share(sharer, stats, config, num_layers, selected, warnings)
    ranks = Ranks()
    if config.rank_policy == "importance" and selected:
        r = importance_base(base_rank, config)
        selected, sharing, ranks = importance_ranks(
            sharer, stats, config, selected, sharing, scoring.importance, r, warnings
        )
        if budget is not None and ranks.record is not None:
            budget.add_ranks(ranks.record, len(selected))
    notes = list(ranks.notes) + rest_notes(selected, sharing.groups)
    return Allocation(selected, sharing, ranks, budget, notes, warnings)
