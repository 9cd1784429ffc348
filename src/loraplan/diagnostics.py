"""How far the scores can be trusted: layers no selector could score, calibration data dominated by one sample,
and how stable a ranking is across two halves of the data."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .calibration import CalibrationStats
from .config import PlanConfig
from .plan_records import DiagnosticsRecord
from .similarity import is_constant, sample_variance_share, spearman
from .strategies import SelectionContext, check_scores

if TYPE_CHECKING:
    from .hooks.calls import Registered

__all__ = ["calibration_diagnostics", "flag_reasons", "one_read_token", "stability"]

#: a single sample carrying at least this share of a layer's variance across samples makes calibration degenerate
DEGENERATE_SHARE = 0.5


def one_read_token(stats: CalibrationStats) -> str | None:
    """When every sample (of more than two) is read at the same token by last-token pooling: that token, described
    (``"id 2, the EOS token"``), with the ``last_token`` mode that chose it; else ``None``."""
    tokens = stats.read_tokens
    if tokens is None or stats.meta.get("pooling") != "last" or stats.num_samples <= 2:
        return None
    distinct = torch.unique(tokens)
    if distinct.numel() != 1:
        return None
    token = int(distinct[0])
    eos = " (the EOS token)" if token == stats.meta.get("eos_token_id") else ""
    return f"token id {token}{eos}, with last_token={stats.meta.get('last_token')!r}"


def flag_reasons(stats: CalibrationStats, importance: list[float], selector: str) -> dict[int, str]:
    """Why each unscorable (nan) layer could not be scored."""
    flagged: dict[int, str] = {}
    constant = [is_constant(h) for h in stats.hidden] if stats.hidden is not None else None
    same_token = one_read_token(stats)
    for i, value in enumerate(importance):
        if not math.isnan(value):
            continue
        if constant is not None and (constant[i] or constant[i + 1]):
            which = f"input h_{i}" if constant[i] else f"output h_{i + 1}"
            flagged[i] = (
                f"its {which} is identical for every calibration sample (zero variance): {selector} cannot score it "
                "(CKA is 0/0; the reference code would call it 'most important')"
            )
            if same_token is not None and i == 0 and constant[0]:
                flagged[i] += f"; every sample is read at the same {same_token} ({_SAME_TOKEN_FIX})"
        else:
            flagged[i] = f"selector {selector!r} could not score it"
    return flagged


_SAME_TOKEN_FIX = (
    "rows that all end with EOS: last_token='auto', the default, reads the token before a trailing EOS; "
    "last_token='reference' drops every EOS, as the CKA reference code does"
)


def calibration_diagnostics(stats: CalibrationStats) -> tuple[DiagnosticsRecord, list[str]]:
    """Per hidden state, the largest variance share of one sample and the distinct vectors; warnings where one
    sample dominates."""
    if stats.hidden is None:
        return DiagnosticsRecord(), []
    shares = [sample_variance_share(h) for h in stats.hidden]
    distinct = [int(torch.unique(h, dim=0).shape[0]) for h in stats.hidden]
    warnings = []
    bad = [i for i, s in enumerate(shares) if not math.isnan(s) and s >= DEGENERATE_SHARE and stats.num_samples > 2]
    if bad:
        warnings.append(
            f"calibration is degenerate at h_{bad[0]}"
            + (f" (and {len(bad) - 1} more hidden states)" if len(bad) > 1 else "")
            + f": one sample carries {shares[bad[0]]:.0%} of the variance across samples there "
            f"({distinct[bad[0]]} distinct vectors among {stats.num_samples}); scores that use it rest on that sample. "
            "Use more varied calibration data, or last_token='auto' (the default) or 'mask'."
        )
    same_token = one_read_token(stats)
    if same_token is not None:
        warnings.append(
            f"calibration is degenerate: all {stats.num_samples} samples are read at the same {same_token}, so their "
            "embedding-level vectors (h_0) are identical and layer 0 cannot be scored. For "
            + _SAME_TOKEN_FIX
            + "; otherwise give varied calibration data."
        )
    return DiagnosticsRecord(max_sample_variance_share=shares, distinct_vectors=distinct), warnings


def stability(
    strategy: Registered, stats: CalibrationStats, config: PlanConfig, num_layers: int, k: int
) -> float | None:
    """Spearman correlation of the selector's importance on two disjoint halves of the batches (``None`` when it
    cannot be told)."""
    if not strategy.strategy.data_dependent or not config.stability:
        return None
    halves = stats.halves()
    if halves is None:
        return None
    need = strategy.strategy.minimum_samples(config)
    if any(h.num_samples < need for h in halves):
        return None
    rankings = []
    for half in halves:
        scores = strategy.call("score", SelectionContext(half, config, num_layers, k))
        rankings.append(check_scores(strategy, scores, num_layers))
    value = spearman(rankings[0], rankings[1])
    return None if math.isnan(value) else value
