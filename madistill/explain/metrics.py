"""Explanation-quality metrics comparing saliency maps ``[B, G]`` row by row (one row per observation)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata


def spearman(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b`` (ties get average ranks).

    Rows where either map is constant have no defined correlation and come back as NaN.
    """
    ra = rankdata(_np(a), axis=1)
    rb = rankdata(_np(b), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1), np.nan)


def overlap_k(k: int, groups: int) -> int:
    """The k a top-k overlap over ``groups`` feature groups uses: ``k`` capped at one less than the number of
    groups, since picking every group would make any two maps agree perfectly."""
    return max(1, min(k, groups - 1))


def topk_overlap(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """|top-k(a) ∩ top-k(b)| / k per row, k capped by :func:`overlap_k`."""
    a, b = _np(a), _np(b)
    k = overlap_k(k, a.shape[1])
    ta = np.argsort(-a, axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b, axis=1, kind="stable")[:, :k]
    hits = (ta[:, :, None] == tb[:, None, :]).any(-1).sum(1)
    return hits / k


def gini(s: torch.Tensor | np.ndarray) -> np.ndarray:
    """Gini coefficient of each row's non-negative scores: 0 = spread evenly, (G-1)/G = all on one group.

    The sparsity measure of Chalasani et al. 2020 for attributions.
    """
    x = np.sort(np.abs(_np(s)), axis=1)
    g = x.shape[1]
    total = x.sum(1)
    ranks = np.arange(1, g + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((2 * ranks - g - 1) * x).sum(1) / (g * total)
    return np.where(total > 0, out, 0.0)


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float64) if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def agreement(explained: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray, k: int) -> dict[str, float]:
    """How well saliency maps ``explained [B, G]`` agree with ``reference [B, G]``, averaged over rows:
    Spearman rank correlation (rows where it is undefined are skipped), top-k overlap, and the Gini
    sparsity of ``explained``. NaN where ``G < 2`` (nothing to rank)."""
    e = _np(explained)
    if e.shape[1] < 2 or len(e) == 0:
        return {"spearman": float("nan"), "topk": float("nan"), "gini": float("nan")}
    rho = spearman(e, reference)
    return {
        "spearman": float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"),
        "topk": float(topk_overlap(e, reference, k).mean()),
        "gini": float(gini(e).mean()),
    }
