"""Bootstrap resampling, shared by the evaluation's confidence intervals and the paired comparisons of
the attack checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def resample(x: np.ndarray, n_boot: int, rng: np.random.Generator,
             strata: np.ndarray | Sequence[Any] | None = None) -> np.ndarray:
    """The ``(n_boot, n)`` matrix of bootstrap resamples of the 1-D ``x``; with ``strata`` (one label per
    value) each stratum is resampled on its own and keeps its size and positions."""
    return x[resample_indices(x.size, n_boot, rng, strata)]


def resample_indices(n: int, n_boot: int, rng: np.random.Generator,
                     strata: np.ndarray | Sequence[Any] | None = None) -> np.ndarray:
    """The ``(n_boot, n)`` indices of ``resample``: they depend on the number of values, their strata and the
    generator alone, so values of the same length and strata can share them."""
    if strata is None:
        idx = rng.integers(0, n, size=(n_boot, n))
    else:
        labels = np.asarray(strata).ravel()
        if labels.shape[0] != n:
            raise ValueError(f"strata has {labels.shape[0]} labels but there are {n} scores")
        _, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.ravel()
        idx = np.empty((n_boot, n), dtype=np.int64)
        for k in range(int(inverse.max()) + 1):
            members = np.flatnonzero(inverse == k)
            draws = rng.integers(0, members.size, size=(n_boot, members.size))
            idx[:, members] = members[draws]
    return idx


def crossed_resample(block: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """The ``(n_boot, R, C)`` bootstrap resamples of a 2-D ``block`` of values on a crossed design (every row
    measured on every column, e.g. random draws x observations): rows and columns are resampled independently,
    so that the spread of both enters the CI (resampling the ``R * C`` cells as if independent would ignore that
    the cells of a row share its draw)."""
    rows = rng.integers(0, block.shape[0], size=(n_boot, block.shape[0]))
    cols = rng.integers(0, block.shape[1], size=(n_boot, block.shape[1]))
    return block[rows[:, :, None], cols[:, None, :]]
