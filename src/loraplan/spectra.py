"""What a weight matrix's singular values say, without data: Spectrum's signal-to-noise ratio and the condition
number (KappaTune's score).

**Singular values** of ``W`` (m x n, as stored) are the square roots of the eigenvalues of the smaller Gram matrix
(``W Wᵀ`` when ``m <= n``, else ``Wᵀ W``): one ``k x k`` matrix product and ``eigvalsh`` instead of an SVD, with
the weight cast to float32 (or float64) before the product, so a bf16 checkpoint is accumulated in full precision.
In float32 every singular value is within about 1e-4 of the largest one (the smallest lose their relative accuracy,
which the SNR's sums and quantiles do not need; the condition number does, so it uses float64).

**SNR** (Hartford, Atkins, Fernandes Neto and Golchinfar, "Spectrum: Targeted Training on Signal to Noise Ratio",
arXiv:2406.06623; as the reference code ``spectrum.py`` computes it): the noise scale is estimated from the singular
values themselves, ``σ̂ = IQR(S) / 1.349``; the noise edge is ``ε = σ̂ (1 + √β)`` with ``β = min(m, n) / max(m, n)``
(the Marchenko–Pastur edge of a matrix normalised by ``√max(m, n)``); then

    SNR = (Σ_{s > ε} s) / (Σ_{s <= ε} s) / σ_max

(plain sums of singular values; an empty noise set counts as 1, as in the reference). It is a heuristic: ``σ̂``
comes from the spectrum, not from the entries, so a rectangular matrix of pure noise can read as all signal.

**Condition number** (Ludwig, "The Condition Number as a Scale-Invariant Proxy for Information Encoding in Neural
Units", arXiv:2506.16289; PEFT's ``find_kappa_target_modules``): ``κ = σ_max / (σ_min + 1e-8)``; KappaTune adapts the
modules with the lowest κ. It is taken from a float64 Gram matrix, whose smallest eigenvalues keep their accuracy.
"""

from __future__ import annotations

import math

import torch

__all__ = ["condition_number", "singular_values", "snr"]


def singular_values(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The singular values of a 2-D ``weight``, largest first, from ``eigvalsh`` of its smaller Gram matrix computed
    in ``dtype``."""
    if weight.dim() != 2:
        raise ValueError(f"singular values need a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(dtype)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    eigenvalues = torch.linalg.eigvalsh(gram)
    return eigenvalues.clamp_min(0).sqrt().flip(0)


def snr(values: torch.Tensor, shape: tuple[int, int]) -> float:
    """Spectrum's signal-to-noise ratio of a matrix of ``shape`` from its singular ``values`` (largest first)."""
    s = values.to(torch.float64)
    largest = float(s[0])
    if largest <= 0:
        return math.nan  # an all-zero matrix has no spectrum to read
    sigma = float(torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    beta = min(shape) / max(shape)
    edge = sigma * (1 + math.sqrt(beta))
    signal = float(s[s > edge].sum())
    below = s[s <= edge]
    noise = float(below.sum()) if below.numel() else 1.0
    if noise == 0:
        return math.inf
    return signal / noise / largest


def condition_number(weight: torch.Tensor) -> float:
    """``σ_max / (σ_min + 1e-8)`` of a 2-D ``weight`` (float64 Gram matrix)."""
    s = singular_values(weight, torch.float64)
    return float(s[0] / (s[-1] + 1e-8))
