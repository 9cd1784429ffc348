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

from .errors import ConfigError

__all__ = ["allocate_ranks"]


def allocate_ranks(weights: Sequence[float], total: int, *, min_rank: int = 1, rank_multiple: int = 1) -> list[int]:
    """Ranks for units with importance ``weights`` (non-negative; ``nan`` never gets a rank) that sum to at most
    ``total``: each unit's share of ``total`` in proportion to its weight, rounded to a multiple of ``rank_multiple``
    by largest remainders (ties: the heavier unit, then the earlier one); units below ``min_rank`` get 0 and their
    share goes to the rest. All-zero weights share equally."""
    if total < 0:
        raise ConfigError(f"the rank budget must be at least 0, got {total}.")
    if min_rank < 1 or rank_multiple < 1:
        raise ConfigError(f"`min_rank` and `rank_multiple` must be at least 1, got {min_rank} and {rank_multiple}.")
    values = [math.nan if w is None else float(w) for w in weights]
    if any(v < 0 for v in values if not math.isnan(v)):
        bad = {i: v for i, v in enumerate(values) if v < 0}
        raise ConfigError(
            f"`rank_policy`='importance' shares ranks in proportion to the selector's importance, which must be "
            f"non-negative; got negative importance for {bad}. Use a selector with non-negative scores (cka, "
            "activation, gradient, lora_drop) or another rank_policy."
        )
    live = [i for i, v in enumerate(values) if not math.isnan(v)]
    ranks = [0] * len(values)
    floor_units = math.ceil(min_rank / rank_multiple)  # the fewest multiples a unit may get
    while live:
        units = total // rank_multiple
        mass = sum(values[i] for i in live)
        share = {i: (values[i] / mass if mass > 0 else 1 / len(live)) * units for i in live}
        got = {i: math.floor(share[i] + 1e-9) for i in live}
        spare = units - sum(got.values())
        for i in sorted(live, key=lambda i: (-(share[i] - got[i]), -values[i], i))[:spare]:
            got[i] += 1
        short = [i for i in live if got[i] < floor_units]
        if not short:
            for i in live:
                ranks[i] = got[i] * rank_multiple
            return ranks
        # leave out the least important of the units that fell short, and share again
        drop = min(short, key=lambda i: (values[i], -i))
        live.remove(drop)
    return ranks
