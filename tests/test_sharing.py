"""ShareLoRA's Algorithm 1 on hand-made similarity matrices, and the budget rank rule."""

from __future__ import annotations

import pytest

from loraplan.allocation import expanded_rank
from loraplan.errors import ConfigError
from loraplan.sharing import group_layers, odd_even_groups


def _matrix(size, pairs, high=0.9, low=0.1):
    sim = [[1.0 if i == j else low for j in range(size)] for i in range(size)]
    for i, j in pairs:
        sim[i][j] = sim[j][i] = high
    return sim


def test_groups_collect_every_later_similar_layer():
    sim = _matrix(6, [(0, 1), (0, 3), (2, 4), (4, 5)])
    # 0 takes 1 and 3; 2 takes 4 (5 is not similar to 2, only to 4, and Algorithm 1 only looks from the leader)
    assert group_layers(sim, 0.85) == [[0, 1, 3], [2, 4]]


def test_a_grouped_layer_is_not_a_leader_again():
    sim = _matrix(4, [(0, 1), (1, 2), (1, 3)])
    # 1 is visited by 0's group, so 2 and 3 (similar only to 1) stay alone
    assert group_layers(sim, 0.85) == [[0, 1]]


def test_threshold_is_inclusive_and_bounds_are_checked():
    sim = _matrix(3, [(0, 2)], high=0.85)
    assert group_layers(sim, 0.85) == [[0, 2]]
    assert group_layers(sim, 0.850001) == []
    with pytest.raises(ConfigError, match="share_threshold"):
        group_layers(sim, 1.5)
    with pytest.raises(ConfigError, match="square"):
        group_layers([[1.0, 0.2]], 0.5)


def test_only_layers_that_carry_lora_are_grouped():
    sim = _matrix(6, [(0, 1), (1, 2), (3, 5)])
    assert group_layers(sim, 0.85, layers=[1, 2, 5, 3]) == [[1, 2], [3, 5]]
    assert group_layers(sim, 0.85, layers=[0, 2, 4]) == []


def test_everything_similar_forms_one_group():
    sim = [[1.0] * 5 for _ in range(5)]
    assert group_layers(sim, 0.0) == [[0, 1, 2, 3, 4]]


def test_odd_layers_share_with_the_even_layer_below():
    assert odd_even_groups(list(range(6))) == [[0, 1], [2, 3], [4, 5]]
    assert odd_even_groups([0, 1, 3, 4, 7]) == [[0, 1]]
    assert odd_even_groups([1, 2]) == []


def test_budget_rule_matches_the_paper_example():
    # LLaMA-7B, groups {16,17},{18,19},{20,21,22},{23..27},{28,29,30}: 32 modules become 22
    groups = [[16, 17], [18, 19], [20, 21, 22], [23, 24, 25, 26, 27], [28, 29, 30]]
    assert 32 - sum(len(g) for g in groups) + len(groups) == 22
    assert expanded_rank(32, groups, 8) == 11  # floor(32 * 8 / 22)
    assert expanded_rank(32, groups, 6) == 8  # floor(192 / 22) = 8.7 -> 8


def test_budget_rule_hand_cases():
    assert expanded_rank(10, [], 8) == 8
    assert expanded_rank(4, [[0, 1, 2, 3]], 4) == 16
    assert expanded_rank(6, [[0, 1], [2, 3]], 3) == 4  # floor(18 / 4)
    with pytest.raises(ConfigError, match="more than"):
        expanded_rank(2, [[0, 1, 2]], 8)
    with pytest.raises(ConfigError, match="rank"):
        expanded_rank(2, [], 0)
