"""PlanConfig: defaults and validation live here once; every message names the key, the value and the fix."""

from __future__ import annotations

import pytest

from loraplan import PlanConfig
from loraplan.errors import ConfigError


def test_defaults_match_the_documented_api():
    cfg = PlanConfig()
    assert (cfg.selector, cfg.ratio, cfg.share, cfg.share_threshold, cfg.rank_policy) == (
        "cka",
        0.5,
        None,
        0.85,
        "keep",
    )
    assert (cfg.calibration_samples, cfg.max_length, cfg.seed) == (128, 512, 0)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"count": 0}, "count"),
        ({"cumulative": 1.2}, "cumulative"),
        ({"share_threshold": -0.1}, "share_threshold"),
        ({"share_threshold": 1.01}, "share_threshold"),
        ({"rank_policy": "double"}, "rank_policy"),
        ({"rank_policy": 0}, "rank_policy"),
        ({"calibration_samples": 0}, "calibration_samples"),
        ({"max_length": 0}, "max_length"),
        ({"batch_size": True}, "batch_size"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"pooling": "max"}, "pooling"),
        ({"last_token": "eos"}, "last_token"),
        ({"selector": ""}, "selector"),
    ],
    ids=lambda v: str(v),
)
def test_bad_values_name_the_key_and_the_value(changes, key):
    with pytest.raises(ConfigError) as exc:
        PlanConfig(**changes)
    message = str(exc.value)
    assert f"`{key}`" in message
    assert repr(next(iter(changes.values()))) in message or str(next(iter(changes.values()))) in message
    assert isinstance(exc.value, ValueError)


def test_ratio_one_and_threshold_bounds_are_allowed():
    PlanConfig(ratio=1.0, share_threshold=0.0)
    PlanConfig(share_threshold=1.0, rank_policy=16)


def test_layer_count():
    assert PlanConfig(ratio=0.5).layer_count(30) == 15
    assert PlanConfig(ratio=0.5).layer_count(7) == 3  # floor
    assert PlanConfig(ratio=0.01).layer_count(12) == 1  # at least one
    assert PlanConfig(ratio=0.3, count=5).layer_count(12) == 5  # count overrides ratio
    with pytest.raises(ConfigError, match="`count` must be between 1 and the model's 12 layers, got 13"):
        PlanConfig(count=13).layer_count(12)


def test_from_dict_rejects_unknown_keys_with_a_suggestion():
    with pytest.raises(ConfigError) as exc:
        PlanConfig.from_dict({"selector": "cka", "share_treshold": 0.8})
    assert "`share_treshold`" in str(exc.value)
    assert "did you mean `share_threshold`" in str(exc.value)


def test_round_trip_through_a_dict():
    cfg = PlanConfig(selector="activation", cumulative=0.9, share="angular", rank_policy="budget", options={"x": 1})
    assert PlanConfig.from_dict(cfg.to_dict()) == cfg
