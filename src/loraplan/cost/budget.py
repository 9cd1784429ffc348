"""Choosing the layers to adapt within a step-time and/or parameter budget, with the cost model pricing each
candidate."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError
from .prediction import LayerCosts, predict, relative

__all__ = ["select_within_budget"]


#: what a selection becomes once shared and ranked: (adapted layers, distinct module sets, sum of their ranks)
Completion = Callable[[list[int]], tuple[list[int], int, int]]


def _plain(rank: int) -> Completion:
    return lambda layers: (sorted(layers), len(layers), len(layers) * rank)


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
) -> tuple[list[int], dict[str, Any]]:
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
    finish = complete or _plain(plan_rank)
    n = costs.num_layers
    usable = [i for i in range(n) if importance[i] is not None and not math.isnan(importance[i])]
    floor = min(importance[i] for i in usable)
    worth = {i: float(importance[i]) - floor for i in usable}
    order = sorted(usable, key=lambda i: (-importance[i], i))
    cap = min(max_count or n, len(usable))
    record: dict[str, Any] = {
        "time_budget": time_budget,
        "param_budget": param_budget,
        "checkpointing": checkpointing,
        "objective": "sum of importance, shifted so that the least important layer counts 0",
    }
    units_allowed = math.inf
    if param_budget is not None:
        record["param_layers"] = _param_layers(param_budget, n, base_rank, plan_rank)
        if complete is None:
            cap = min(cap, record["param_layers"])
        else:
            units_allowed = math.floor(param_budget * n * base_rank + 1e-9)
            record["rank_units"] = units_allowed

    def entry(layers: list[int]) -> dict[str, Any]:
        adapted, modules, units = finish(sorted(layers))
        time_ratio, memory_ratio = relative(
            costs, adapted, checkpointing=checkpointing, num_modules=modules, rank_units=units
        )
        item = {
            "lowest": min(adapted),
            "count": len(layers),
            "layers": sorted(layers),
            "importance": sum(worth[i] for i in layers),
            "time": time_ratio,
            "memory": memory_ratio,
        }
        if complete is not None:
            item.update(adapted=len(adapted), rank_units=units)
        return item

    def fits_params(layers: list[int]) -> bool:
        return units_allowed == math.inf or finish(sorted(layers))[2] <= units_allowed

    if time_budget is None:
        count = cap
        while count > 1 and not fits_params(order[:count]):
            count -= 1
        if not fits_params(order[:count]):
            raise ConfigError(
                f"`param_budget` {param_budget}: even the most important layer alone, with what the sharer adds to "
                f"it, needs more than {units_allowed} rank units ({param_budget} of {n} layers at r={base_rank}). "
                "Raise param_budget, or plan without the sharer."
            )
        cap = count
        record["chosen"] = top = entry(sorted(order[:cap]))
        record["summary"] = (
            f"param_budget {param_budget}: the {cap} most important layers (LoRA parameters "
            f"{cap * plan_rank / (n * base_rank):.0%} of LoRA on every layer at r={base_rank})"
        )
        return top["layers"], record
    reference = predict(costs, range(n), checkpointing=checkpointing, truncate=False).time

    def time_ratio(layers: list[int]) -> float:
        adapted, modules, units = finish(sorted(layers))
        priced = predict(costs, adapted, checkpointing=checkpointing, num_modules=modules, rank_units=units)
        return priced.time / reference

    candidates = []
    for cut in usable:
        chosen = [cut]
        for i in order:
            if len(chosen) >= cap:
                break
            if i <= cut:
                continue
            if time_ratio(chosen + [i]) > time_budget + 1e-12 or not fits_params(chosen + [i]):
                break  # every layer above the cut adds the same cost: the next one would not fit either
            chosen.append(i)
        item = entry(chosen)
        item["fits"] = item["time"] <= time_budget + 1e-12 and fits_params(chosen)
        candidates.append(item)
    best = _best_fit(candidates, time_budget, checkpointing)
    top = entry(sorted(order[: best["count"]]))
    record["chosen"] = {k: v for k, v in best.items() if k != "fits"}
    record["top_by_importance"] = top
    keys = ("lowest", "count", "layers", "importance", "time", "fits") + (("adapted",) if complete else ())
    record["candidates"] = [{k: c[k] for k in keys} for c in candidates]
    record["summary"] = (
        f"time_budget {time_budget} ({'with' if checkpointing else 'without'} checkpointing): {best['count']} layers "
        f"from layer {best['lowest']} up, predicted {best['time']:.2f}x the step time and {best['memory']:.2f}x the "
        f"peak memory of LoRA on every layer, {best['importance']:.4g} of importance; the {top['count']} most "
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
