"""The similarity maths: linear CKA (biased and debiased), ShareLoRA's angular similarity, rank correlation.

Everything is computed in float64 whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["angular_similarity", "is_constant", "linear_cka", "sample_variance_share", "spearman"]

#: a representation whose centred variance is below this fraction of its raw energy counts as constant
CONSTANT_TOLERANCE = 1e-10


def _as64(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"expected an (n, d) matrix, got a tensor of shape {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float64)


def is_constant(x: torch.Tensor) -> bool:
    """True when every row of ``x`` (n, d) is the same, up to rounding: CKA is undefined (0/0) there."""
    x = _as64(x)
    centred = x - x.mean(dim=0, keepdim=True)
    return float(centred.pow(2).sum()) <= CONSTANT_TOLERANCE * (float(x.pow(2).sum()) + 1e-300)


def sample_variance_share(x: torch.Tensor) -> float:
    """The largest share of the total variance across samples that a single sample carries.

    1/n for a perfectly spread representation, 1.0 when one sample differs and all others coincide (then CKA is
    decided by that one sample). ``nan`` for a constant representation.
    """
    x = _as64(x)
    centred = x - x.mean(dim=0, keepdim=True)
    per_sample = centred.pow(2).sum(dim=1)
    total = float(per_sample.sum())
    if is_constant(x) or total <= 0:
        return math.nan
    return float(per_sample.max()) / total


def _hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> float:
    """Unbiased HSIC estimator (Song et al., 2012) of two Gram matrices with zeroed diagonals."""
    n = k.shape[0]
    ones = torch.ones(n, dtype=k.dtype)
    trace = float((k * l).sum())
    middle = float(ones @ k @ ones) * float(ones @ l @ ones) / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * float(ones @ k @ (l @ ones))
    return (trace + middle - last) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA between two representations of the same ``n`` samples.

    ``x`` is (n, d1), ``y`` is (n, d2). Columns are centred; the biased estimator is
    ``||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. ``debiased=True`` uses the unbiased HSIC estimator
    (Song et al., 2012), which needs n >= 4 and is close to 0 for independent data where the biased estimator is
    not. Returns ``nan`` when either representation is constant across samples (CKA is 0/0 there).
    """
    x, y = _as64(x), _as64(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must describe the same samples, got {x.shape[0]} and {y.shape[0]} rows")
    n = x.shape[0]
    if n < (4 if debiased else 2):
        raise ValueError(f"linear_cka needs at least {4 if debiased else 2} samples, got {n}")
    if is_constant(x) or is_constant(y):
        return math.nan
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    k = x @ x.T
    l = y @ y.T
    if not debiased:
        num = float((k * l).sum())
        den = math.sqrt(float((k * k).sum())) * math.sqrt(float((l * l).sum()))
        return num / den if den > 0 else math.nan
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    kl, kk, ll = _hsic_unbiased(k, l), _hsic_unbiased(k, k), _hsic_unbiased(l, l)
    if kk <= 0 or ll <= 0:
        return math.nan
    return kl / math.sqrt(kk * ll)


def angular_similarity(vectors: Sequence[torch.Tensor]) -> list[list[float]]:
    """ShareLoRA's layer similarity: ``1 - mean_n arccos(cos(v_i[n], v_j[n])) / pi`` for every pair of layers.

    ``vectors[i]`` is the (n, d) matrix of one vector per sample for layer i (the layer's output). The cosine is
    clamped to [-1, 1]. Returns an L x L nested list with ones on the diagonal.
    """
    stacked = torch.stack([_as64(v) for v in vectors])  # (L, n, d)
    norms = stacked.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    unit = stacked / norms
    cos = torch.einsum("ind,jnd->ijn", unit, unit).clamp(-1.0, 1.0)
    sim = 1.0 - torch.arccos(cos).mean(dim=-1) / math.pi
    sim.fill_diagonal_(1.0)
    sim = (sim + sim.T) / 2  # exact symmetry despite rounding
    return [[float(v) for v in row] for row in sim]


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two score lists (average ranks for ties; nan entries dropped pairwise)."""
    pairs = [(x, y) for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 2:
        return math.nan
    ra, rb = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else math.nan
