"""Choosing the layers to adapt within a step-time and/or parameter budget, with the cost model pricing each
candidate as it will train (:func:`completion`: the layers a sharer adds, the module sets after sharing, their
ranks)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..cost.prediction import LayerCosts, predict, relative
from ..errors import ConfigError
from ..strategies import SharingContext, check_groups, shares_unselected
from .counting import adapted_layers, module_ranks, num_modules, policy_rank, rest_groups
from .ranks import rank_total
from .records import SearchBudget

if TYPE_CHECKING:
    from ..calibration import CalibrationStats
    from ..config import PlanConfig
    from ..hooks.calls import Registered

__all__ = ["Completion", "completion", "select_within_budget"]


#: what a selection becomes once shared and ranked: (adapted layers, distinct module sets, sum of their ranks)
Completion = Callable[[list[int]], tuple[list[int], int, int]]


def _plain(rank: int) -> Completion:
    return lambda layers: (sorted(layers), len(layers), len(layers) * rank)


class _Pricing:
    """Candidate selections priced as they train: their importance (shifted so the least important layer counts 0),
    predicted time and memory ratios, and whether they fit the parameter budget (``units_allowed`` rank units)."""

    def __init__(
        self,
        importance: Sequence[float],
        costs: LayerCosts,
        checkpointing: bool,
        complete: Completion | None,
        plan_rank: int,
    ) -> None:
        self.costs, self.checkpointing = costs, checkpointing
        self.finish = complete or _plain(plan_rank)
        self.completed = complete is not None
        self.usable = [
            i for i in range(costs.num_layers) if importance[i] is not None and not math.isnan(importance[i])
        ]
        floor = min(importance[i] for i in self.usable)
        self.worth = {i: float(importance[i]) - floor for i in self.usable}
        self.order = sorted(self.usable, key=lambda i: (-importance[i], i))
        self.units_allowed: float = math.inf
        self._reference: float | None = None

    def entry(self, layers: list[int]) -> dict[str, Any]:
        adapted, modules, units = self.finish(sorted(layers))
        time_ratio, memory_ratio = relative(
            self.costs, adapted, checkpointing=self.checkpointing, num_modules=modules, rank_units=units
        )
        item = {
            "lowest": min(adapted),
            "count": len(layers),
            "layers": sorted(layers),
            "importance": sum(self.worth[i] for i in layers),
            "time": time_ratio,
            "memory": memory_ratio,
        }
        if self.completed:
            item.update(adapted=len(adapted), rank_units=units)
        return item

    def fits_params(self, layers: list[int]) -> bool:
        return self.units_allowed == math.inf or self.finish(sorted(layers))[2] <= self.units_allowed

    def time_ratio(self, layers: list[int]) -> float:
        if self._reference is None:
            every = range(self.costs.num_layers)
            self._reference = predict(self.costs, every, checkpointing=self.checkpointing, truncate=False).time
        adapted, modules, units = self.finish(sorted(layers))
        priced = predict(self.costs, adapted, checkpointing=self.checkpointing, num_modules=modules, rank_units=units)
        return priced.time / self._reference


def select_within_budget(
    importance: Sequence[float],
    costs: LayerCosts,
    *,
    time_budget: float | None,
    param_budget: float | None,
    checkpointing: bool,
    base_rank: int,
    plan_rank: int,
    max_count: int | None = None,
    complete: Completion | None = None,
) -> tuple[list[int], SearchBudget]:
    """The layers to adapt under a step-time and/or parameter budget, and the record of the trade-off.

    Importance is shifted to be non-negative and summed. With a parameter budget only, that is the top ``k`` layers
    (``k`` from the budget). With a time budget, every possible lowest layer ``m`` (the cut: loraplan runs the layers
    below it without autograd) is tried: ``m`` plus the most important layers above it, as many as the predicted
    step time allows (each added layer costs the same, so this is the best set for that cut); the cut with the
    highest summed importance wins (ties: lower predicted time). Unscorable (nan) layers are never chosen.

    ``complete`` turns a selection into what trains (the layers a sharer adds, such as LoRA-drop's shared rest, the
    module sets after sharing and the sum of their ranks, per-layer ranks included); every candidate is priced, and
    held to the parameter budget, as completed. Without it a selection trains as it is, at ``plan_rank``.
    """
    pricing = _Pricing(importance, costs, checkpointing, complete, plan_rank)
    n = costs.num_layers
    cap = min(max_count or n, len(pricing.usable))
    record = SearchBudget(
        time_budget=time_budget, param_budget=param_budget, checkpointing=checkpointing, chosen={}, summary=""
    )
    if param_budget is not None:
        record.param_layers = _param_layers(param_budget, n, base_rank, plan_rank)
        if complete is None:
            cap = min(cap, record.param_layers)
        else:
            record.rank_units = math.floor(param_budget * n * base_rank + 1e-9)
            pricing.units_allowed = record.rank_units
    if time_budget is None:
        return _by_params(pricing, record, cap, base_rank, plan_rank)
    return _by_time(pricing, record, cap, time_budget)


def _by_params(
    pricing: _Pricing, record: SearchBudget, cap: int, base_rank: int, plan_rank: int
) -> tuple[list[int], SearchBudget]:
    """A parameter budget alone: the most important layers, as many as fit it once completed."""
    n, order, budget = pricing.costs.num_layers, pricing.order, record.param_budget
    count = cap
    while count > 1 and not pricing.fits_params(order[:count]):
        count -= 1
    if not pricing.fits_params(order[:count]):
        raise ConfigError(
            f"`param_budget` {budget}: even the most important layer alone, with what the sharer adds to "
            f"it, needs more than {pricing.units_allowed} rank units ({budget} of {n} layers at r={base_rank}). "
            "Raise param_budget, or plan without the sharer."
        )
    record.chosen = pricing.entry(sorted(order[:count]))
    record.summary = (
        f"param_budget {budget}: the {count} most important layers (LoRA parameters "
        f"{count * plan_rank / (n * base_rank):.0%} of LoRA on every layer at r={base_rank})"
    )
    return record.chosen["layers"], record


def _by_time(pricing: _Pricing, record: SearchBudget, cap: int, time_budget: float) -> tuple[list[int], SearchBudget]:
    """A time budget (with or without a parameter budget): the best candidate of every cut."""
    candidates = []
    for cut in pricing.usable:
        chosen = [cut]
        for i in pricing.order:
            if len(chosen) >= cap:
                break
            if i <= cut:
                continue
            if pricing.time_ratio(chosen + [i]) > time_budget + 1e-12 or not pricing.fits_params(chosen + [i]):
                break  # every layer above the cut adds the same cost: the next one would not fit either
            chosen.append(i)
        item = pricing.entry(chosen)
        item["fits"] = item["time"] <= time_budget + 1e-12 and pricing.fits_params(chosen)
        candidates.append(item)
    best = _best_fit(candidates, time_budget, record.checkpointing)
    top = pricing.entry(sorted(pricing.order[: best["count"]]))
    keys = ("lowest", "count", "layers", "importance", "time", "fits") + (("adapted",) if pricing.completed else ())
    record.chosen = {k: v for k, v in best.items() if k != "fits"}
    record.top_by_importance = top
    record.candidates = [{k: c[k] for k in keys} for c in candidates]
    record.summary = (
        f"time_budget {time_budget} ({'with' if record.checkpointing else 'without'} checkpointing): {best['count']} "
        f"layers from layer {best['lowest']} up, predicted {best['time']:.2f}x the step time and {best['memory']:.2f}x "
        f"the peak memory of LoRA on every layer, {best['importance']:.4g} of importance; the {top['count']} most "
        f"important layers (lowest {top['lowest']}) would cost {top['time']:.2f}x"
        + (" and fit the budget too" if top["time"] <= time_budget + 1e-12 else "")
    )
    return best["layers"], record


def _param_layers(param_budget: float, n: int, base_rank: int, plan_rank: int) -> int:
    """How many layers of LoRA at ``plan_rank`` fit ``param_budget`` (a share of ``n`` layers at ``base_rank``)."""
    allowed = math.floor(param_budget * n * base_rank / plan_rank + 1e-9)
    if allowed < 1:
        raise ConfigError(
            f"`param_budget` {param_budget} allows {param_budget * n * base_rank / plan_rank:.2f} layers of LoRA "
            f"at r={plan_rank} ({n} layers at r={base_rank} are the whole budget), fewer than one. Raise it to at "
            f"least {plan_rank / (n * base_rank):.3g}, or lower the rank."
        )
    return allowed


def _best_fit(candidates: list[dict[str, Any]], time_budget: float, checkpointing: bool) -> dict[str, Any]:
    """The fitting candidate with the most importance (ties: lower time, then higher cut)."""
    fitting = [c for c in candidates if c["fits"]]
    if not fitting:
        cheapest = min(candidates, key=lambda c: c["time"])
        alone = f"layer {cheapest['layers'][0]} alone"
        if cheapest.get("adapted", cheapest["count"]) > cheapest["count"]:
            alone += (
                f", with the {cheapest['adapted'] - cheapest['count']} layers the sharer adds from layer "
                f"{cheapest['lowest']} up (a shared rest gives the layers below the selection LoRA, so there is "
                "nothing left to skip)"
            )
        raise ConfigError(
            f"`time_budget` {time_budget} is below the cheapest plan the cost model predicts: "
            f"{cheapest['time']:.3f}x of LoRA on every layer ({alone}, "
            f"{'with' if checkpointing else 'without'} checkpointing; the head, embeddings and the layers below still "
            f"run). Raise time_budget to at least {math.ceil(cheapest['time'] * 1000) / 1000:.3f}."
        )
    return max(fitting, key=lambda c: (c["importance"], -c["time"], c["lowest"]))


def completion(
    sharer: Registered | None, stats: CalibrationStats, config: PlanConfig, num_layers: int, rank: int | None
) -> Completion | None:
    """What a budget prices for a candidate selection when sharing or ranks change what trains: the layers the
    sharer adds (a shared rest), the module sets after sharing and their ranks (per-layer ranks spend the selected
    layers' ``r``, or the parameter budget). ``None`` where the selection trains as it is (the search's own rule:
    sharing among the selected layers only lowers the parameters)."""
    if rank is None or not (shares_unselected(sharer) or config.rank_policy == "importance"):
        return None
    r = rank

    def complete(selected: list[int]) -> tuple[list[int], int, int]:
        # only a sharer that reaches beyond the selection changes what is priced: groups among the selected layers
        # leave the adapted layers as they are, and per-layer ranks spend the same units over them (so the sharer,
        # ShareLoRA's similarity for one, is not run again for every candidate)
        groups: list[list[int]] = []
        if sharer is not None and shares_unselected(sharer):
            ctx = SharingContext(stats, config, num_layers, list(selected))
            groups = check_groups(sharer, sharer.call("share", ctx), selected, num_layers).groups
        adapted, modules = adapted_layers(selected, groups), num_modules(selected, groups)
        if config.rank_policy != "importance":
            each = policy_rank(config.rank_policy, selected, groups, r)
            return adapted, modules, sum(module_ranks(selected, groups, lambda _: each))
        rest = rest_groups(groups, selected)
        units = rank_total(config, num_layers, len(selected), r, len(rest)) + len(rest) * r
        return adapted, modules, units

    return complete
