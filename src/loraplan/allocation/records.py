"""The record a budget leaves in the plan (``cost.budget``): what the search tried and chose, and how per-layer ranks
were shared out. Each is written by one function (:func:`~loraplan.allocation.budget.select_within_budget`,
:func:`~loraplan.allocation.ranks.ranked_selection`, :func:`~loraplan.allocation.ranks.importance_ranks`) and turned
into the plan file's JSON by :meth:`to_dict`; a plan read back from its file holds that JSON as it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BudgetRecord", "RanksRecord", "RankedBudget", "SearchBudget"]

#: what the search maximises, as the record says it
OBJECTIVE = "sum of importance, shifted so that the least important layer counts 0"


@dataclass
class RanksRecord:
    """Per-layer ranks from importance (``cost.budget.ranks``): the rank units shared out over the module sets, the
    layers left out for rounding below ``min_rank``, and every adapted layer's rank."""

    rank_units: int
    module_sets: int
    left_out: list[int]
    ranks: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank_units": self.rank_units,
            "module_sets": self.module_sets,
            "left_out": list(self.left_out),
            "ranks": dict(self.ranks),
        }


@dataclass(kw_only=True)
class _Budget:
    summary: str
    ranks: RanksRecord | None = None

    def add_ranks(self, ranks: RanksRecord, selected: int) -> None:
        """Record how the ranks were shared out over the ``selected`` layers; a budget that counted rank units says
        when layers it chose were left out again after sharing."""
        self.ranks = ranks
        if self.counts_units and ranks.left_out:
            self.summary += (
                f"; {len(ranks.left_out)} of them left out again after sharing ({ranks.rank_units} units for the "
                f"{selected} selected layers)"
            )

    @property
    def counts_units(self) -> bool:
        raise NotImplementedError

    def _optional(self) -> dict[str, Any]:
        return {"ranks": self.ranks.to_dict()} if self.ranks is not None else {}


@dataclass(kw_only=True)
class SearchBudget(_Budget):
    """The budget search's record: the budgets, the candidate chosen, and with a time budget every candidate cut and
    the most important layers' price beside it."""

    time_budget: float | None
    param_budget: float | None
    checkpointing: bool
    chosen: dict[str, Any]
    #: layers of LoRA at the plan's rank the parameter budget allows (with a parameter budget)
    param_layers: int | None = None
    #: rank units the parameter budget allows, when candidates are priced as completed (sharing, per-layer ranks)
    rank_units: int | None = None
    top_by_importance: dict[str, Any] | None = None
    candidates: list[dict[str, Any]] | None = None

    @property
    def counts_units(self) -> bool:
        return self.rank_units is not None

    def to_dict(self) -> dict[str, Any]:
        optional = {
            "param_layers": self.param_layers,
            "rank_units": self.rank_units,
            "top_by_importance": self.top_by_importance,
            "candidates": self.candidates,
        }
        return {
            "time_budget": self.time_budget,
            "param_budget": self.param_budget,
            "checkpointing": self.checkpointing,
            "objective": OBJECTIVE,
            **{key: value for key, value in optional.items() if value is not None},
            "chosen": self.chosen,
            "summary": self.summary,
            **self._optional(),
        }


@dataclass(kw_only=True)
class RankedBudget(_Budget):
    """A parameter budget shared out by importance over every scorable layer (``rank_policy="importance"``)."""

    param_budget: float
    rank_units: int

    @property
    def counts_units(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "param_budget": self.param_budget,
            "rank_policy": "importance",
            "rank_units": self.rank_units,
            "summary": self.summary,
            **self._optional(),
        }


#: either record
BudgetRecord = SearchBudget | RankedBudget
