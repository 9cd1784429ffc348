"""Bad input gets a clear error (key, value, what is allowed, the fix) and nothing is planned wrongly."""

from __future__ import annotations

import pytest

from loraplan import PlanConfig, make_plan
from loraplan.errors import CalibrationError, ConfigError


def test_count_beyond_the_layers(pm, make_llama, make_batches):
    with pytest.raises(ConfigError, match="`count` must be between 1 and the model's 6 layers, got 7"):
        make_plan(make_llama(layers=6), make_batches(), PlanConfig(count=7), plugin_manager=pm, progress=False)


@pytest.mark.parametrize(("debiased", "needed"), [(False, 2), (True, 4)], ids=["biased", "debiased"])
def test_fewer_samples_than_cka_needs(debiased, needed, pm, make_llama, make_batches):
    batches = make_batches(n_batches=1, batch=needed - 1)
    with pytest.raises(CalibrationError) as exc:
        make_plan(make_llama(), batches, PlanConfig(debiased=debiased), plugin_manager=pm, progress=False)
    assert f"{needed - 1} calibration sample(s) given" in str(exc.value) and f"needs at least {needed}" in str(
        exc.value
    )


def test_fewer_samples_than_asked_is_recorded(pm, make_llama, make_batches):
    plan = make_plan(
        make_llama(), make_batches(n_batches=1), PlanConfig(calibration_samples=50), plugin_manager=pm, progress=False
    )
    assert plan.calibration["num_samples"] == 4
    assert any("only 4 calibration samples" in w for w in plan.warnings)


def test_cumulative_with_a_fixed_baseline(pm, make_llama, make_batches):
    with pytest.raises(ConfigError, match="`cumulative` needs a data-driven selector"):
        make_plan(
            make_llama(), make_batches(), PlanConfig(selector="top", cumulative=0.5), plugin_manager=pm, progress=False
        )
