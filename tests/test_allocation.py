"""loraplan.allocation: the one home of the allocation decision, its counting, its budget records, and the old
places of the names that moved there."""

from __future__ import annotations

import importlib

import pytest

import loraplan.allocation as allocation
from loraplan.allocation import RankedBudget, RanksRecord, SearchBudget, counting
from loraplan.plan import LoraPlan


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("loraplan.ranks", "allocate_ranks", "loraplan.allocation.ranks"),
        ("loraplan.cost", "select_within_budget", "loraplan.allocation.budget"),
        ("loraplan.cost.budget", "select_within_budget", "loraplan.allocation.budget"),
        ("loraplan.cost.budget", "Completion", "loraplan.allocation.budget"),
        ("loraplan.sharing", "expanded_rank", "loraplan.allocation.counting"),
    ],
)
def test_a_moved_name_still_works_from_its_old_place_and_says_where_it_went(old: str, name: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} has moved to {new}\.{name}"):
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        importlib.import_module(old).nothing_here  # noqa: B018 - the attribute access is the test


LAYOUTS = [
    ([1, 2, 5], []),
    ([1, 2, 5, 6], [[1, 5]]),
    ([3, 4], [[0, 1, 2]]),  # a shared rest: one group of layers that are not selected
    ([2, 3, 6, 7], [[2, 3], [6, 7]]),
]


@pytest.mark.parametrize(("selected", "groups"), LAYOUTS)
@pytest.mark.parametrize("policy", ["keep", "budget", 12])
def test_counting_a_layout_agrees_with_the_plan_that_holds_it(selected, groups, policy) -> None:
    plan = LoraPlan(num_layers=8, selected_layers=selected, share_groups=groups, config={"rank_policy": policy})
    plan.validate()
    assert counting.adapted_layers(selected, groups) == plan.adapted_layers
    assert counting.num_modules(selected, groups) == plan.num_modules()
    rank = counting.policy_rank(policy, selected, groups, 8)
    assert rank == plan.resolve_rank(8)
    assert counting.module_ranks(selected, groups, lambda _: rank) == plan.module_ranks(8)
    assert len(plan.module_ranks(8)) == plan.num_modules()


def test_the_budget_rank_spends_the_selected_layers_parameters_on_fewer_modules() -> None:
    # four selected layers in two pairs: two module sets carry the parameters of four at r=8
    assert counting.policy_rank("budget", [2, 3, 6, 7], [[2, 3], [6, 7]], 8) == 16
    # a shared rest's group holds no selected layer: it does not raise the rank of the selected ones
    assert counting.policy_rank("budget", [3, 4], [[0, 1, 2]], 8) == 8


def test_budget_records_write_the_keys_the_plan_file_has_always_had() -> None:
    search = SearchBudget(time_budget=None, param_budget=0.5, checkpointing=False, chosen={"layers": [1]}, summary="s")
    search.param_layers = 3
    assert search.to_dict() == {
        "time_budget": None,
        "param_budget": 0.5,
        "checkpointing": False,
        "objective": "sum of importance, shifted so that the least important layer counts 0",
        "param_layers": 3,
        "chosen": {"layers": [1]},
        "summary": "s",
    }
    ranks = RanksRecord(rank_units=16, module_sets=2, left_out=[4], ranks={1: 8, 3: 8})
    search.add_ranks(ranks, 2)  # no rank units counted by this search: the summary stays as it was
    assert search.to_dict()["ranks"] == {"rank_units": 16, "module_sets": 2, "left_out": [4], "ranks": {1: 8, 3: 8}}
    assert search.summary == "s"
    ranked = RankedBudget(param_budget=0.5, rank_units=16, summary="t")
    ranked.add_ranks(ranks, 2)
    assert ranked.to_dict() == {
        "param_budget": 0.5,
        "rank_policy": "importance",
        "rank_units": 16,
        "summary": "t; 1 of them left out again after sharing (16 units for the 2 selected layers)",
        "ranks": ranks.to_dict(),
    }


def test_the_package_names_what_it_decides_with() -> None:
    assert {"allocate", "score", "select", "select_within_budget", "allocate_ranks", "Allocation"} <= set(
        allocation.__all__
    )
