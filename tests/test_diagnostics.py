"""loraplan.diagnostics on hand-built calibration statistics: why a layer could not be scored, calibration data that
one sample dominates, and how stable a selector's ranking is across halves of the data."""

from __future__ import annotations

import math

import pytest
import torch

from loraplan import PlanConfig
from loraplan.calibration import CalibrationStats
from loraplan.diagnostics import DEGENERATE_SHARE, calibration_diagnostics, flag_reasons, stability
from loraplan.hooks.manager import get_plugin_manager, lookup, selectors

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = math.nan


def _stats(hidden: list[torch.Tensor] | None, batches: int = 1, samples: int | None = None) -> CalibrationStats:
    """Statistics of ``len(hidden) - 1`` layers; the samples are split evenly into ``batches`` calibration batches."""
    n = hidden[0].shape[0] if hidden is not None else samples
    assert n is not None and n % batches == 0
    num_layers = len(hidden) - 1 if hidden is not None else 3
    return CalibrationStats(
        num_layers=num_layers,
        tokens=torch.full((n,), 5.0, dtype=torch.float64),
        batch_index=torch.arange(batches).repeat_interleave(n // batches),
        target_names=[["self_attn.q_proj", "self_attn.v_proj"]] * num_layers,
        hidden=hidden,
    )


def _random(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _cka():
    return lookup(selectors(get_plugin_manager(load_entrypoints=False)), "cka", "selector")


# -- flag_reasons -------------------------------------------------------------------------------------------------


def test_a_constant_hidden_state_is_the_reason_named_for_both_layers_it_touches():
    constant = torch.ones(8, 16)
    stats = _stats([_random(8, seed=0), constant, _random(8, seed=2), _random(8, seed=3)])
    reasons = flag_reasons(stats, [NAN, NAN, 0.3], "cka")
    assert sorted(reasons) == [0, 1]  # layer 2 has a score: not flagged
    assert reasons[0].startswith("its output h_1 is identical for every calibration sample (zero variance): cka ")
    assert reasons[1].startswith("its input h_1 is identical for every calibration sample (zero variance): cka ")
    assert "CKA is 0/0" in reasons[1]


def test_a_layer_unscored_for_another_reason_names_the_selector():
    stats = _stats([_random(8, seed=s) for s in range(4)])
    assert flag_reasons(stats, [0.1, NAN, 0.2], "activation") == {1: "selector 'activation' could not score it"}
    assert flag_reasons(stats, [0.1, 0.2, 0.3], "cka") == {}
    # without hidden states no hidden state can be blamed
    no_hidden = _stats(None, samples=8)
    assert flag_reasons(no_hidden, [NAN, 0.2, NAN], "gradient") == {
        0: "selector 'gradient' could not score it",
        2: "selector 'gradient' could not score it",
    }


# -- calibration_diagnostics --------------------------------------------------------------------------------------


def test_spread_calibration_data_gives_no_warning():
    hidden = [_random(8, seed=s) for s in range(3)]
    facts, warnings = calibration_diagnostics(_stats(hidden))
    assert warnings == []
    assert facts["distinct_vectors"] == [8, 8, 8]
    shares = facts["max_sample_variance_share"]
    assert len(shares) == 3 and all(1 / 8 <= s < DEGENERATE_SHARE for s in shares)


def test_one_sample_carrying_most_variance_makes_calibration_degenerate():
    dominated = torch.zeros(8, 16)
    dominated[5] = 3.0  # every other sample coincides: that one sample carries all the variance
    hidden = [_random(8, seed=0), dominated, _random(8, seed=2)]
    facts, warnings = calibration_diagnostics(_stats(hidden))
    shares = facts["max_sample_variance_share"]
    assert shares[1] >= 0.5 and shares[1] == pytest.approx(7 / 8)  # the mean sits 1/8 of the way to that sample
    assert shares[0] < 0.5 and shares[2] < 0.5
    assert facts["distinct_vectors"] == [8, 2, 8]
    assert len(warnings) == 1
    assert warnings[0].startswith("calibration is degenerate at h_1: one sample carries 88% of the variance")
    assert "(2 distinct vectors among 8)" in warnings[0]


def test_the_warning_counts_the_other_degenerate_states_and_skips_constant_ones():
    dominated = torch.zeros(8, 16)
    dominated[0] = 1.0
    hidden = [torch.ones(8, 16), dominated, dominated.clone(), _random(8)]
    facts, warnings = calibration_diagnostics(_stats(hidden))
    assert math.isnan(facts["max_sample_variance_share"][0])  # constant: no share, and no warning for it
    assert facts["distinct_vectors"][0] == 1
    assert len(warnings) == 1
    assert warnings[0].startswith("calibration is degenerate at h_1 (and 1 more hidden states): ")


def test_with_two_samples_no_warning_though_each_carries_half():
    facts, warnings = calibration_diagnostics(_stats([_random(2, seed=0), _random(2, seed=1)]))
    assert facts["max_sample_variance_share"] == pytest.approx([0.5, 0.5])
    assert warnings == []


def test_without_hidden_states_there_is_nothing_to_diagnose():
    assert calibration_diagnostics(_stats(None, samples=4)) == ({}, [])


# -- stability ----------------------------------------------------------------------------------------------------


def test_stability_needs_two_batches():
    hidden = [_random(8, seed=s) for s in range(4)]
    assert stability(_cka(), _stats(hidden, batches=1), PlanConfig(), num_layers=3, k=2) is None
    value = stability(_cka(), _stats(hidden, batches=2), PlanConfig(), num_layers=3, k=2)
    assert isinstance(value, float) and -1.0 <= value <= 1.0


def test_the_same_data_in_both_halves_is_perfectly_stable():
    half = [_random(4, seed=s) for s in range(4)]
    hidden = [torch.cat([h, h]) for h in half]
    assert stability(_cka(), _stats(hidden, batches=2), PlanConfig(), num_layers=3, k=2) == pytest.approx(1.0)


def test_stability_is_not_told_when_it_cannot_be():
    hidden = [_random(8, seed=s) for s in range(4)]
    stats = _stats(hidden, batches=2)
    assert stability(_cka(), stats, PlanConfig(stability=False), num_layers=3, k=2) is None
    # a fixed baseline does not depend on the data
    top = lookup(selectors(get_plugin_manager(load_entrypoints=False)), "top", "selector")
    assert stability(top, stats, PlanConfig(), num_layers=3, k=2) is None
    # debiased CKA needs 4 samples: halves of 3 are too few (plain CKA can rank with them)
    small = _stats([_random(6, seed=s) for s in range(4)], batches=2)
    assert stability(_cka(), small, PlanConfig(debiased=True), num_layers=3, k=2) is None
    assert stability(_cka(), small, PlanConfig(), num_layers=3, k=2) is not None
