"""What a layout trains, counted from its selected layers and share groups alone (no plan, no model): the layers
that carry LoRA, the distinct module sets and their ranks, and the rank a rank policy asks for.

:class:`~loraplan.plan.LoraPlan` answers the same questions about itself through these functions, and the budget
search prices every candidate with them before any plan exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..errors import ConfigError

__all__ = ["adapted_layers", "expanded_rank", "module_ranks", "num_modules", "policy_rank", "rest_groups"]


def adapted_layers(selected: Sequence[int], groups: Sequence[Sequence[int]]) -> list[int]:
    """Every layer that carries LoRA: the selected ones and the members of share groups outside them."""
    return sorted(set(selected).union(*map(set, groups)))


def num_modules(selected: Sequence[int], groups: Sequence[Sequence[int]]) -> int:
    """Distinct LoRA module sets after sharing: adapted layers minus the layers that reuse a group's."""
    return len(adapted_layers(selected, groups)) - sum(len(g) - 1 for g in groups)


def module_ranks(selected: Sequence[int], groups: Sequence[Sequence[int]], rank_of: Callable[[int], int]) -> list[int]:
    """The rank (``rank_of(layer)``) of every distinct LoRA module set (a share group counts once), in layer order of
    its first layer: what the LoRA parameters are proportional to."""
    first = {layer: g[0] == layer for g in groups for layer in g}
    return [rank_of(layer) for layer in adapted_layers(selected, groups) if first.get(layer, True)]


def rest_groups(groups: Sequence[Sequence[int]], selected: Sequence[int]) -> list[list[int]]:
    """The groups that hold no selected layer: a shared rest's module sets (each paid at ``r``)."""
    chosen = set(selected)
    return [list(g) for g in groups if not chosen & set(g)]


def policy_rank(policy: int | str, selected: Sequence[int], groups: Sequence[Sequence[int]], base_rank: int) -> int:
    """The LoRA rank a ``rank_policy`` asks for, given the LoRA config's ``r``: an explicit rank; ``"budget"``, the
    selected layers' parameters spent on the module sets left after sharing among them (a shared rest adds its own
    module set at that rank); else ``r``."""
    if isinstance(policy, int):
        return policy
    if policy == "budget":
        chosen = set(selected)
        among = [list(g) for g in groups if set(g) <= chosen]
        return expanded_rank(len(selected), among, base_rank)
    return base_rank


def expanded_rank(num_layers: int, groups: list[list[int]], rank: int) -> int:
    """ShareLoRA's budget rule: the rank that spends the parameters of ``num_layers`` unshared rank-``rank``
    modules on the fewer modules left after sharing: ``floor(L r / (L - sum|S| + |S|))``.

    ``num_layers`` is the number of adapted layers; ``groups`` the share groups among them.
    """
    if num_layers < 1:
        raise ConfigError(f"`num_layers` must be at least 1, got {num_layers}.")
    if rank < 1:
        raise ConfigError(f"`rank` must be at least 1, got {rank}.")
    members = sum(len(g) for g in groups)
    modules = num_layers - members + len(groups)
    if modules < 1 or members > num_layers:
        raise ConfigError(
            f"`groups` {groups} hold {members} layers, more than the {num_layers} adapted layers they come from."
        )
    return max(rank, math.floor(num_layers * rank / modules))
