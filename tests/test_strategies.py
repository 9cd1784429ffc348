"""loraplan.strategies: how importance becomes layers (top-k, cumulative), what the planner accepts from a plugin's
selector or sharer, and the contexts strategies are given."""

from __future__ import annotations

import math

import pytest
import torch

import loraplan.calibration
import loraplan.calibration.stats
import loraplan.strategies
from loraplan import PlanConfig
from loraplan.errors import PluginError
from loraplan.hooks.manager import Registered
from loraplan.strategies import (
    CalibrationStats,
    SelectionContext,
    Selector,
    Sharer,
    SharingContext,
    SharingResult,
    check_groups,
    check_scores,
    cumulative_pick,
    top_k,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = math.nan


class _Mine(Selector):
    name = "mine"


class _Pairs(Sharer):
    name = "pairs"


def _stats(num_layers: int = 4, samples: int = 4) -> CalibrationStats:
    return CalibrationStats(
        num_layers=num_layers,
        tokens=torch.ones(samples, dtype=torch.float64),
        batch_index=torch.zeros(samples, dtype=torch.long),
        target_names=[["self_attn.q_proj"]] * num_layers,
    )


# -- importance to layers -----------------------------------------------------------------------------------------


def test_top_k_keeps_the_most_important_sorted_by_index():
    assert top_k([1.0, 9.0, 5.0, 3.0], 2) == [1, 2]
    assert top_k([1.0, 9.0, 5.0, 3.0], 0) == []
    assert top_k([1.0, 9.0, 5.0, 3.0], 10) == [0, 1, 2, 3]


def test_top_k_breaks_ties_by_the_lower_index():
    assert top_k([5.0, 5.0, 5.0, 5.0], 2) == [0, 1]
    assert top_k([1.0, 2.0, 2.0, 2.0], 2) == [1, 2]
    assert top_k([2.0, 1.0, 2.0, 1.0], 3) == [0, 1, 2]


def test_top_k_never_chooses_nan():
    assert top_k([NAN, 1.0, 0.0], 3) == [1, 2]  # even when k leaves room for it
    assert top_k([NAN, 1.0, NAN, 0.5], 2) == [1, 3]
    assert top_k([None, 1.0], 2) == [1]
    assert top_k([NAN, NAN], 1) == []


def test_cumulative_pick_by_hand():
    # normalised: 0.4, 0.3, 0.2, 0.1; 0.4 + 0.3 reaches 0.7
    assert cumulative_pick([4.0, 3.0, 2.0, 1.0], 0.7) == [0, 1]
    assert cumulative_pick([4.0, 3.0, 2.0, 1.0], 0.71) == [0, 1, 2]
    assert cumulative_pick([4.0, 3.0, 2.0, 1.0], 0.4) == [0]
    assert cumulative_pick([4.0, 3.0, 2.0, 1.0], 1.0) == [0, 1, 2, 3]
    # the most important first, returned by index
    assert cumulative_pick([1.0, 4.0, 2.0, 3.0], 0.7) == [1, 3]


def test_cumulative_pick_of_all_zero_keeps_one_layer_and_skips_nan():
    assert cumulative_pick([0.0, 0.0, 0.0, 0.0], 0.9) == [0]
    assert cumulative_pick([NAN, 0.0, 0.0], 0.9) == [1]
    assert cumulative_pick([NAN, 1.0, 3.0], 0.5) == [2]  # nan counts neither in the order nor in the total


def test_the_default_choose_is_top_k():
    ctx = SelectionContext(stats=_stats(), config=PlanConfig(), num_layers=4, k=2)
    assert _Mine().choose(ctx, [0.1, 0.4, NAN, 0.4]) == [1, 3] == top_k([0.1, 0.4, NAN, 0.4], 2)
    assert _Mine().minimum_samples(PlanConfig()) == 1 and _Mine.data_dependent


# -- what a plugin's selector may return --------------------------------------------------------------------------


def test_check_scores_accepts_one_value_per_layer_and_reads_none_as_nan():
    strategy = Registered(_Mine(), "my-plugin")
    scores = check_scores(strategy, {"importance": [1, None, 0.5], "cka": (0.1, 0.2, 0.3)}, 3)
    assert scores[0] == 1.0 and isinstance(scores[0], float)
    assert math.isnan(scores[1]) and scores[2] == 0.5
    assert len(scores) == 3


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([0.1, 0.2, 0.3], r"must return a dict of per-layer scores with an 'importance' entry, got list\."),
        ({"cka": [0.1, 0.2, 0.3]}, r"got dict with keys \['cka'\]\."),
        ({"importance": [0.1, 0.2]}, r"returned 2 values for score 'importance'; expected one per layer \(3\)\."),
        ({"importance": [0.1, 0.2, 0.3], "extra": [1.0]}, r"returned 1 values for score 'extra'"),
        ({"importance": 0.5}, r"returned 0\.5 values for score 'importance'"),
        ({"importance": torch.zeros(3)}, r"returned 3 values for score 'importance'"),  # not a list or tuple
    ],
    ids=["not-a-dict", "no-importance", "too-few", "other-score-too-few", "a-scalar", "a-tensor"],
)
def test_check_scores_refuses_what_a_plugin_may_not_return(scores, message):
    with pytest.raises(PluginError, match=r"^plugin 'my-plugin': selector 'mine' ") as exc:
        check_scores(Registered(_Mine(), "my-plugin"), scores, 3)
    assert exc.match(message)


# -- what a plugin's sharer may return ----------------------------------------------------------------------------


def test_check_groups_sorts_the_groups_of_the_result():
    result = SharingResult(groups=[[5, 4], (2, 1)], similarity=[[1.0]])
    checked = check_groups(Registered(_Pairs(), "my-plugin"), result, [1, 2, 4, 5])
    assert checked is result
    assert checked.groups == [[1, 2], [4, 5]]
    assert checked.similarity == [[1.0]] and checked.scores == {}
    assert check_groups(Registered(_Pairs(), "my-plugin"), SharingResult(groups=[]), [0, 1]).groups == []


def test_check_groups_needs_a_sharing_result():
    with pytest.raises(PluginError, match=r"^plugin 'my-plugin': sharer 'pairs' must return a") as exc:
        check_groups(Registered(_Pairs(), "my-plugin"), [[0, 1]], [0, 1])
    assert exc.match(r"loraplan\.strategies\.SharingResult, got list\.")


@pytest.mark.parametrize(
    ("groups", "shown"),
    [
        pytest.param([[0, 3]], r"\[0, 3\]", id="unselected-layer"),
        pytest.param([[1]], r"\[1\]", id="group-of-one"),
        pytest.param([[0, 1], [1, 2]], r"\[1, 2\]", id="overlapping"),
        pytest.param(
            [[2, 2]],
            r"\[2, 2\]",
            id="repeated-layer",
        ),
    ],
)
def test_check_groups_refuses_groups_that_are_not_disjoint_pairs_of_selected_layers(groups, shown):
    with pytest.raises(PluginError, match=rf"^plugin 'my-plugin': sharer 'pairs' returned group {shown}; ") as exc:
        check_groups(Registered(_Pairs(), "my-plugin"), SharingResult(groups=groups), [0, 1, 2])
    assert exc.match(r"two or more distinct selected layers \(\[0, 1, 2\]\) and not overlap\.")


# -- contexts and names -------------------------------------------------------------------------------------------


def test_sharing_context_selected_and_its_deprecated_alias():
    ctx = SharingContext(stats=_stats(), config=PlanConfig(), num_layers=4, selected=[1, 3])
    assert ctx.selected == [1, 3]
    with pytest.warns(DeprecationWarning, match=r"SharingContext\.layers is now SharingContext\.selected"):
        layers = ctx.layers
    assert layers is ctx.selected


def test_the_statistic_names_have_one_home():
    assert loraplan.strategies.HIDDEN is loraplan.calibration.HIDDEN
    assert loraplan.strategies.ACTIVATIONS is loraplan.calibration.ACTIVATIONS
    assert loraplan.strategies.GRADIENTS is loraplan.calibration.GRADIENTS
    assert loraplan.strategies.CalibrationStats is loraplan.calibration.CalibrationStats
    assert loraplan.strategies.LORA_OUTPUTS is loraplan.calibration.LORA_OUTPUTS


@pytest.mark.parametrize("module", [loraplan.strategies, loraplan.calibration, loraplan.calibration.stats])
def test_statistics_is_deprecated_and_still_there(module):
    assert "STATISTICS" not in module.__all__
    with pytest.warns(DeprecationWarning, match=rf"^{module.__name__}\.STATISTICS is deprecated: nothing in loraplan"):
        statistics = module.STATISTICS
    assert statistics is loraplan.calibration.stats._STATISTICS
    assert statistics == ("hidden", "activations", "gradients", "lora_outputs")
