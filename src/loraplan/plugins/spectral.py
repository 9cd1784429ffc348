"""Weight-only selectors: no calibration data, no forward pass; they read each target module's weight
(:mod:`loraplan.weights`: from the model in memory, or streamed from a checkpoint's shards). The formulas and their
sources are in :mod:`loraplan.spectra`.

- ``snr``: Spectrum's signal-to-noise ratio of each target module's weight; a layer's importance is the mean over
  its target modules (higher: more of the spectrum above the noise edge).
- ``condition``: after KappaTune, the condition number ``κ`` of each target module's weight; a layer's importance is
  ``1 / mean(log κ)`` over its target modules (higher: better-conditioned, more isotropic weights, which KappaTune
  adapts first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..hooks import hookimpl
from ..spectra import condition_number, singular_values, snr
from ..strategies import WEIGHTS, SelectionContext, Selector


def _per_layer(ctx: SelectionContext, measure: Callable[[torch.Tensor], float], what: str) -> list[list[float]]:
    """``measure`` of every target module's weight, layer by layer (a progress bar on long reads)."""
    from tqdm.auto import tqdm

    weights = ctx.weights
    if weights is None:  # the planner always provides them to a selector that requires WEIGHTS
        raise RuntimeError(f"the {what} selector needs SelectionContext.weights")
    found = []
    bar = tqdm(
        total=weights.num_layers, desc=f"loraplan {what}", unit="layer", disable=not weights.progress, leave=False
    )
    for layer in range(weights.num_layers):
        found.append([measure(weights.weight(layer, name)) for name in weights.names(layer)])
        bar.update(1)
    bar.close()
    return found


def _mean(values: list[float]) -> float:
    usable = [v for v in values if math.isfinite(v)]
    return sum(usable) / len(usable) if usable else math.nan


class SNRSelector(Selector):
    """Spectrum's SNR (Hartford et al. 2024, arXiv:2406.06623), the mean over a layer's target modules."""

    name = "snr"
    requires = frozenset({WEIGHTS})
    data_dependent = False

    def score(self, ctx: SelectionContext) -> dict[str, Any]:
        def measure(weight: torch.Tensor) -> float:
            return snr(singular_values(weight), (int(weight.shape[0]), int(weight.shape[1])))

        values = [_mean(layer) for layer in _per_layer(ctx, measure, "snr")]
        return {"importance": values, "snr": values}


class ConditionSelector(Selector):
    """KappaTune's condition number (Ludwig 2025, arXiv:2506.16289): importance ``1 / mean(log κ)``."""

    name = "condition"
    requires = frozenset({WEIGHTS})
    data_dependent = False

    def score(self, ctx: SelectionContext) -> dict[str, Any]:
        kappas = _per_layer(ctx, condition_number, "condition")
        log_kappa = [_mean([math.log(max(k, 1.0 + 1e-12)) for k in layer]) for layer in kappas]
        importance = [1.0 / v if math.isfinite(v) and v > 0 else math.nan for v in log_kappa]
        return {"importance": importance, "log_condition": log_kappa}


@hookimpl
def loraplan_register_selectors(register: Callable[[Selector], None]) -> None:
    register(SNRSelector())
    register(ConditionSelector())
