"""ShareLoRA's grouping (the paper's Algorithm 1) and its parameter-budget rank rule."""

from __future__ import annotations

from collections.abc import Sequence

from ._moved import moved
from .errors import ConfigError

__all__ = ["group_layers", "odd_even_groups"]


def group_layers(
    similarity: Sequence[Sequence[float]], threshold: float, layers: list[int] | None = None
) -> list[list[int]]:
    """Greedy grouping of layers whose similarity reaches ``threshold`` (ShareLoRA, Algorithm 1).

    Walking the layers in order, each layer not yet grouped collects every later ungrouped layer ``j`` with
    ``similarity[i][j] >= threshold``; a layer with no such partner stays alone (it is not returned).
    ``layers`` restricts the walk to the layers that carry LoRA (default: all). Groups are sorted lists.
    """
    size = len(similarity)
    if any(len(row) != size for row in similarity):
        raise ConfigError("`similarity` must be a square L x L matrix.")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"`share_threshold` must be a number in [0, 1], got {threshold!r}.")
    order = sorted(set(range(size) if layers is None else layers))
    if any(i < 0 or i >= size for i in order):
        raise ConfigError(f"`layers` must be indices in 0..{size - 1}, got {layers!r}.")
    visited: set[int] = set()
    groups: list[list[int]] = []
    for pos, i in enumerate(order):
        if i in visited:
            continue
        members = [j for j in order[pos + 1 :] if j not in visited and similarity[i][j] >= threshold]
        if members:
            group = [i, *members]
            groups.append(group)
            visited.update(group)
    return groups


def odd_even_groups(layers: list[int]) -> list[list[int]]:
    """The naive baseline of ShareLoRA's Table 1: each odd layer shares with the even layer below it."""
    chosen = set(layers)
    return [[i, i + 1] for i in sorted(chosen) if i % 2 == 0 and i + 1 in chosen]


#: moved to :mod:`loraplan.allocation.counting` with the other rank rules
__getattr__ = moved(__name__, {"expanded_rank": "loraplan.allocation.counting"})
