"""The selector's verdict (:func:`score`) and the layers chosen from it (:func:`select`): by the selector, by
``cumulative``, or within a budget with the cost model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..diagnostics import flag_reasons
from ..errors import CalibrationError, ConfigError, PluginError
from ..strategies import SelectionContext, check_scores, cumulative_pick
from .budget import Completion, select_within_budget
from .ranks import importance_base, ranked_selection
from .records import BudgetRecord

if TYPE_CHECKING:
    from ..calibration import CalibrationStats
    from ..config import PlanConfig
    from ..cost.prediction import LayerCosts
    from ..hooks.calls import Registered
    from ..weights import WeightSource

__all__ = ["Scoring", "score", "select"]


@dataclass
class Scoring:
    """The selector's verdict: its scores, the importance it ranks by, the layers it could not score (flagged, never
    selected, each with its reason) and the context it saw (``ctx.k``: how many layers to keep)."""

    selector: Registered
    scores: dict[str, Any]
    importance: list[float]
    flagged: dict[int, str]
    ctx: SelectionContext

    @property
    def warnings(self) -> list[str]:
        """What the plan says about the flagged layers."""
        return [f"layer {layer} is flagged and not selected: {reason}." for layer, reason in self.flagged.items()]


def score(
    selector: Registered,
    stats: CalibrationStats,
    config: PlanConfig,
    num_layers: int,
    k: int,
    weights: WeightSource | None = None,
) -> Scoring:
    """The selector's scores, and the layers it could not score; an error when it can score none. ``weights``: what
    a weight-only selector reads (``SelectionContext.weights``)."""
    ctx = SelectionContext(stats=stats, config=config, num_layers=num_layers, k=k, weights=weights)
    scores = selector.call("score", ctx)
    importance = check_scores(selector, scores, num_layers)
    flagged = flag_reasons(stats, importance, config.selector)
    usable = num_layers - len(flagged)
    if usable == 0:
        raise CalibrationError(
            f"selector {config.selector!r} could not score any layer (every representation is constant across "
            "the calibration samples). Give varied calibration data."
        )
    ctx.k = min(ctx.k, usable)
    return Scoring(selector, scores, importance, flagged, ctx)


def select(
    scoring: Scoring,
    config: PlanConfig,
    costs: LayerCosts | None,
    cost_problem: str | None,
    base_rank: int | None = None,
    complete: Completion | None = None,
    *,
    allow_empty: bool = False,
) -> tuple[list[int], BudgetRecord | None]:
    """The selected layers (by the selector, or within the budget with the cost model) and the budget's record."""
    budget: BudgetRecord | None = None
    if config.rank_policy == "importance" and config.param_budget is not None and config.time_budget is None:
        selected, budget = ranked_selection(
            scoring.importance, scoring.flagged, config, importance_base(base_rank, config)
        )
    elif config.time_budget is not None or config.param_budget is not None:
        if costs is None:
            raise ConfigError(f"`time_budget`/`param_budget` need the cost model, which failed: {cost_problem}")
        scored = [math.nan if i in scoring.flagged else v for i, v in enumerate(scoring.importance)]
        selected, budget = select_within_budget(
            scored,
            costs,
            time_budget=config.time_budget,
            param_budget=config.param_budget,
            checkpointing=config.cost_checkpointing,
            base_rank=costs.rank,
            plan_rank=config.rank_policy if isinstance(config.rank_policy, int) else costs.rank,
            max_count=config.count,
            complete=complete,
        )
    else:
        selected = _choose(scoring, config)
    selected = [i for i in selected if i not in scoring.flagged]
    if not selected and not allow_empty:
        raise CalibrationError(f"selector {config.selector!r} selected no scorable layer.")
    return selected, budget


def _choose(scoring: Scoring, config: PlanConfig) -> list[int]:
    """The selector's own choice (or ``cumulative``'s), checked to be layer indices."""
    strategy, ctx, importance = scoring.selector, scoring.ctx, scoring.importance
    if config.cumulative is not None:
        if not strategy.strategy.data_dependent:
            raise ConfigError(
                f"`cumulative` needs a data-driven selector, but {strategy.name!r} ignores the data. Use ratio/count "
                "with it, or pick e.g. selector='activation'."
            )
        if any(v < 0 for v in importance if not math.isnan(v)):
            raise ConfigError(
                f"`cumulative` needs non-negative importance scores; selector {strategy.name!r} gave negative ones."
            )
        chosen = cumulative_pick(importance, config.cumulative)
    else:
        chosen = strategy.call("choose", ctx, importance)
    try:
        chosen = sorted({int(i) for i in chosen})
    except (TypeError, ValueError) as exc:
        raise PluginError(
            f"plugin {strategy.plugin!r}: selector {strategy.name!r} chose {chosen!r}, not layer indices."
        ) from exc
    if any(i < 0 or i >= ctx.num_layers for i in chosen):
        raise PluginError(
            f"plugin {strategy.plugin!r}: selector {strategy.name!r} chose layers {chosen} outside "
            f"0..{ctx.num_layers - 1}."
        )
    return chosen
