"""Per-layer ranks from importance (``rank_policy="importance"``): a budget of rank units shared out in proportion
to the selector's scores.

LoRA on one layer at rank ``r`` costs ``r`` times the layer's per-rank parameters, the same for every layer of the
stack, so a parameter budget is a number of rank units. :func:`allocate_ranks` shares them out over *units* (a layer,
or a share group that uses one module set) by largest remainders, in multiples of ``rank_multiple``; a unit whose rank
comes out below ``min_rank`` is left out and the budget is shared again among the others, until every unit left has
at least ``min_rank``. The ranks never sum to more than the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..strategies import top_k
from .counting import rest_groups
from .records import RankedBudget, RanksRecord
from .sharing import Sharing, share

if TYPE_CHECKING:
    from ..calibration import CalibrationStats
    from ..config import PlanConfig
    from ..hooks.calls import Registered

__all__ = ["Ranks", "allocate_ranks", "importance_base", "importance_ranks", "rank_total", "ranked_selection"]


def allocate_ranks(
    weights: Sequence[float],
    total: int,
    *,
    min_rank: int = 1,
    rank_multiple: int = 1,
    max_rank: int | None = None,
) -> list[int]:
    """Ranks for units with importance ``weights`` (non-negative; ``nan`` never gets a rank) that sum to at most
    ``total``: each unit's share of ``total`` in proportion to its weight, rounded to a multiple of ``rank_multiple``
    by largest remainders (ties: the heavier unit, then the earlier one); units below ``min_rank`` get 0 and their
    share goes to the rest. All-zero weights share equally. ``max_rank``: no unit gets more (rounded down to a
    multiple of ``rank_multiple``); a capped unit's excess is shared among the others in proportion to their
    weights, so the ranks still sum to ``total`` within one ``rank_multiple`` unless every unit is capped."""
    if total < 0:
        raise ConfigError(f"the rank budget must be at least 0, got {total}.")
    if min_rank < 1 or rank_multiple < 1:
        raise ConfigError(f"`min_rank` and `rank_multiple` must be at least 1, got {min_rank} and {rank_multiple}.")
    if max_rank is not None and max_rank < max(min_rank, rank_multiple):
        raise ConfigError(f"`max_rank` {max_rank} is below `min_rank` {min_rank} or `rank_multiple` {rank_multiple}.")
    values = [math.nan if w is None else float(w) for w in weights]
    if any(v < 0 for v in values if not math.isnan(v)):
        bad = {i: v for i, v in enumerate(values) if v < 0}
        raise ConfigError(
            f"`rank_policy`='importance' shares ranks in proportion to the selector's importance, which must be "
            f"non-negative; got negative importance for {bad}. Use a selector with non-negative scores (cka, "
            "activation, gradient, lora_drop, snr) or another rank_policy."
        )
    live = [i for i, v in enumerate(values) if not math.isnan(v)]
    ranks = [0] * len(values)
    floor_units = math.ceil(min_rank / rank_multiple)  # the fewest multiples a unit may get
    cap = max_rank // rank_multiple if max_rank is not None else math.inf  # the most multiples a unit may get
    while live:
        got = _shares(values, live, total // rank_multiple, cap)
        short = [i for i in live if got[i] < floor_units]
        if not short:
            for i in live:
                ranks[i] = got[i] * rank_multiple
            return ranks
        # leave out the least important of the units that fell short, and share again
        drop = min(short, key=lambda i: (values[i], -i))
        live.remove(drop)
    return ranks


def _shares(values: list[float], live: list[int], units: int, cap: float) -> dict[int, int]:
    """``units`` shared over ``live`` in proportion to ``values`` by largest remainders, no unit above ``cap``: a unit
    whose share passes the cap is held at it, and the rest is shared again among the others."""
    held: dict[int, int] = {}
    free, left = list(live), units
    while True:
        mass = sum(values[i] for i in free)
        share = {i: (values[i] / mass if mass > 0 else 1 / len(free)) * left for i in free}
        over = [i for i in free if share[i] > cap]
        if not over:
            break
        for i in over:
            held[i] = int(cap)
            free.remove(i)
            left -= int(cap)
        if not free:
            return held
    got = {i: math.floor(share[i] + 1e-9) for i in free}
    spare = left - sum(got.values())
    for i in sorted(free, key=lambda i: (-(share[i] - got[i]), -values[i], i)):
        if spare <= 0:
            break
        if got[i] < cap:
            got[i] += 1
            spare -= 1
    return {**got, **held}


@dataclass
class Ranks:
    """Per-layer ranks (``rank_policy="importance"``), the plan note on how they were allocated and the record of
    the numbers (which goes into the budget's record when there is a budget)."""

    pattern: dict[int, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    record: RanksRecord | None = None


def importance_base(base_rank: int | None, config: PlanConfig) -> int:
    """The LoRA rank ``r`` per-layer ranks are allocated from; an error when it is not known."""
    if base_rank is None:
        raise ConfigError(
            f"`rank_policy` 'importance' allocates per-layer ranks from the LoRA rank `r`, which is not known here. "
            "Pass lora_rank=... to make_plan (CLI: --rank), or plan the model wrapped with your LoraConfig "
            f"(settings: {config.rank_policy!r}, param_budget {config.param_budget})."
        )
    return base_rank


def rank_total(config: PlanConfig, num_layers: int, selected: int, base_rank: int, rest_sets: int) -> int:
    """The rank units to share out: a ``param_budget`` of LoRA on every layer at ``r`` (less the shared rest's module
    sets at ``r``), else the selected layers' ``r`` each, redistributed."""
    if config.param_budget is None:
        return selected * base_rank
    return math.floor(config.param_budget * num_layers * base_rank + 1e-9) - rest_sets * base_rank


def ranked_selection(
    importance: list[float], flagged: dict[int, str], config: PlanConfig, base_rank: int
) -> tuple[list[int], RankedBudget]:
    """With ``param_budget`` and per-layer ranks: every scorable layer is a candidate (the ``count`` most important
    ones with ``count``), the budget is shared out by importance, and the layers left with a rank are selected."""
    n = len(importance)
    usable = [i for i in range(n) if i not in flagged and not math.isnan(importance[i])]
    if config.count is not None:
        usable = top_k([importance[i] if i in usable else math.nan for i in range(n)], config.count)
    total = rank_total(config, n, 0, base_rank, 0)
    weights = [importance[i] if i in usable else math.nan for i in range(n)]
    ranks = allocate_ranks(
        weights, total, min_rank=config.min_rank, rank_multiple=config.rank_multiple, max_rank=config.max_rank
    )
    selected = [i for i, r in enumerate(ranks) if r > 0]
    budget = config.param_budget
    if not selected or budget is None:
        raise ConfigError(
            f"`param_budget` {budget}: {total} rank units (of {n} layers at r={base_rank}) cannot give "
            f"any layer min_rank={config.min_rank} in multiples of {config.rank_multiple}. Lower min_rank or "
            "rank_multiple, or raise param_budget."
        )
    summary = (
        f"param_budget {budget}: {total} rank units ({budget} of {n} layers at r={base_rank}) shared out by "
        f"importance; {len(selected)} layers got a rank"
    )
    return selected, RankedBudget(param_budget=budget, rank_units=total, summary=summary)


def importance_ranks(
    sharer: Registered | None,
    stats: CalibrationStats,
    config: PlanConfig,
    selected: list[int],
    sharing: Sharing,
    importance: list[float],
    base_rank: int,
    warnings: list[str],
) -> tuple[list[int], Sharing, Ranks]:
    """Ranks in proportion to importance over the module sets left after sharing (a group counts once, weighted by
    its selected layers' importance; a shared rest keeps ``r``). A set whose rank rounds below ``min_rank`` is left
    out and the sharer asked again, until every set keeps a rank."""
    num_layers, r, original = len(importance), base_rank, list(selected)
    while True:
        chosen = set(selected)
        rest = rest_groups(sharing.groups, selected)
        units = [[i] for i in selected if not any(i in g for g in sharing.groups)]
        units += [g for g in sharing.groups if chosen & set(g)]
        units.sort()
        total = rank_total(config, num_layers, len(selected), r, len(rest))
        if total < 1:
            raise ConfigError(
                f"`param_budget` {config.param_budget} leaves no rank for the selected layers once the shared rest "
                f"takes its r={r} per module set. Raise param_budget, or plan without share='{config.share}'."
            )
        weights = [sum(importance[i] for i in unit if i in chosen) for unit in units]
        got = allocate_ranks(
            weights, total, min_rank=config.min_rank, rank_multiple=config.rank_multiple, max_rank=config.max_rank
        )
        dropped = [i for unit, rank in zip(units, got) for i in unit if rank == 0 and i in chosen]
        if not dropped:
            break
        selected = [i for i in selected if i not in dropped]
        if not selected:
            raise ConfigError(
                f"`rank_policy` 'importance': {total} rank units cannot give any layer min_rank={config.min_rank} "
                f"in multiples of {config.rank_multiple}. Lower min_rank or rank_multiple, or raise the budget."
            )
        sharing = share(sharer, stats, config, num_layers, selected, warnings)
    pattern = {i: rank for unit, rank in zip(units, got) for i in unit}
    left_out = [i for i in original if i not in selected]
    note = (
        f"rank_policy 'importance': {total} rank units over {len(units)} module sets in proportion to importance "
        f"(r={r}, min_rank {config.min_rank}, multiple {config.rank_multiple}"
        + (f", max_rank {config.max_rank}" if config.max_rank is not None else "")
        + "): ranks "
        + ", ".join(f"{i}:{pattern[i]}" for i in sorted(pattern))
        + (f"; left out (rounded below min_rank): {left_out}" if left_out else "")
        + (f"; the shared rest keeps r={r}" if rest else "")
    )
    record = RanksRecord(rank_units=total, module_sets=len(units), left_out=left_out, ranks=dict(pattern))
    return selected, sharing, Ranks(pattern, [note], record)
