"""Episode records and robust summary statistics for policy evaluation.

The statistics follow the recommendations of Agarwal et al. (2021), *Deep
Reinforcement Learning at the Edge of the Statistical Precipice* (the
``rliable`` library): report the interquartile mean (IQM) next to the mean, and
attach percentile-bootstrap confidence intervals, optionally stratified (each
stratum, e.g. a training seed or a task, is resampled independently so that
every bootstrap replicate keeps the original stratum sizes).

:class:`EpisodeRecord` (seed, length, ``agent_returns`` dict, ``team_return``
property = mean over agents) is defined once, in :mod:`madistill.envs.episodes`,
where the vector env produces it; it is re-exported here so that evaluation
code can import everything from one place and there is a single class.

Everything returned by :func:`summarize` is made of plain Python ``int``,
``float``, ``str``, ``list`` and ``dict`` objects so that it can be passed to
:func:`json.dumps` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from madistill.common.bootstrap import resample_indices
from madistill.envs.episodes import EpisodeRecord
from madistill.envs.teams import several_teams, team_arrays

__all__ = [
    "EpisodeRecord",
    "bootstrap_ci",
    "iqm",
    "record_from_dict",
    "record_to_dict",
    "summarize",
    "summarize_scores",
]


def record_to_dict(record: EpisodeRecord) -> dict[str, Any]:
    """JSON-serialisable row of one episode (includes the derived ``team_return``).

    Values are cast to Python ``int``/``float``/``str`` (the vector env may hand
    over numpy scalars, and ``np.float32`` is not JSON-serialisable).
    """
    return {
        "seed": int(record.seed),
        "length": int(record.length),
        "team_return": float(record.team_return),
        "agent_returns": {str(k): float(v) for k, v in record.agent_returns.items()},
    }


def record_from_dict(row: Mapping[str, Any]) -> EpisodeRecord:
    """Inverse of :func:`record_to_dict` (derived fields such as ``team_return`` are ignored)."""
    return EpisodeRecord(
        seed=int(row["seed"]),
        length=int(row["length"]),
        agent_returns={str(k): float(v) for k, v in row["agent_returns"].items()},
    )


def iqm(x: np.ndarray | Sequence[float], axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean: mean of the middle 50% of the values.

    Trims 25% of the observations from each end and averages the rest, which is
    the definition used by ``rliable`` (``scipy.stats.trim_mean(x, 0.25)``).
    Note that ``trim_mean`` removes ``int(0.25 * n)`` whole observations from
    each side (no fractional weighting), e.g. ``iqm(1..8) == mean(3..6) == 4.5``.

    Args:
        x: Scores.
        axis: Axis along which to compute. ``None`` (default) flattens ``x`` and
            returns a Python ``float``; an integer returns an array with that
            axis reduced (used by :func:`bootstrap_ci` for vectorisation).
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("iqm of an empty array is undefined")
    if axis is None:
        return float(_trimmed_mean(arr.ravel(), 0))
    return np.asarray(_trimmed_mean(arr, axis), dtype=np.float64)


def _trimmed_mean(arr: np.ndarray, axis: int, in_place: bool = False) -> np.ndarray:
    """The mean along ``axis`` of the values left after ``int(0.25 * n)`` of the lowest and as many of the
    highest are dropped: the values at sorted positions cut..n-cut-1, placed there by one partition at its two
    ends (without importing SciPy, whose ``trim_mean`` gives these numbers, for one function). ``in_place``
    partitions ``arr`` itself (the same numbers, without a copy of a bootstrap matrix the caller is done with)."""
    n = arr.shape[axis]
    cut = int(0.25 * n)
    middle = [slice(None)] * arr.ndim
    middle[axis] = slice(cut, n - cut)
    if in_place:
        arr.partition((cut, n - cut - 1), axis)
    else:
        arr = np.partition(arr, (cut, n - cut - 1), axis)
    return np.mean(arr[tuple(middle)], axis=axis)


def _apply_statistic(statistic: Callable[..., Any], samples: np.ndarray) -> np.ndarray:
    """Evaluate ``statistic`` on every row of ``samples`` (shape ``(n_boot, n)``).

    First tries the vectorised call ``statistic(samples, axis=-1)`` (works for
    ``np.mean``, ``np.median``, :func:`iqm`, ...); if the callable does not take
    an ``axis`` keyword or does not return one value per row, falls back to a
    per-row loop with ``statistic(row)``.
    """
    n_boot = samples.shape[0]
    try:
        out = np.asarray(statistic(samples, axis=-1), dtype=np.float64)
        if out.shape == (n_boot,):
            return out
    except (TypeError, ValueError):
        pass
    return np.fromiter((float(statistic(row)) for row in samples), dtype=np.float64, count=n_boot)


def bootstrap_ci(
    scores: np.ndarray | Sequence[float],
    statistic: Callable[..., Any],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    strata: np.ndarray | Sequence[Any] | None = None,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``statistic(scores)``.

    All ``n_boot`` resampling index matrices are drawn at once from
    ``numpy.random.default_rng(seed)``, so the result is deterministic for a
    given seed and input. With ``strata`` (one label per score, e.g. the
    training run or task each score belongs to), indices are resampled with
    replacement *within* each stratum independently, so every replicate has
    exactly the original number of scores from each stratum (the stratified
    bootstrap of ``rliable``). Resampled values are kept at the positions of
    their stratum, so the statistic sees arrays of the original shape.

    Args:
        scores: 1-D array of ``n`` scores (must be non-empty).
        statistic: Reduction to bootstrap. Called as ``statistic(x, axis=-1)``
            on the ``(n_boot, n)`` matrix of replicates when it accepts an
            ``axis`` keyword (fast path), otherwise once per replicate as
            ``statistic(row)``; it must return a scalar per replicate.
        n_boot: Number of bootstrap replicates (>= 1).
        confidence: Two-sided coverage level in ``(0, 1)``.
        seed: Seed of the random generator.
        strata: Optional array of ``n`` hashable labels.

    Returns:
        ``(lo, hi)``: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
        percentiles of the bootstrap distribution. With a single score (or
        only constant strata) the interval collapses to the point value.
    """
    return _percentile_ci(_apply_statistic(statistic, _replicates(scores, n_boot, seed, strata)), confidence)


def _replicates(
    scores: np.ndarray | Sequence[float], n_boot: int, seed: int, strata: np.ndarray | Sequence[Any] | None
) -> np.ndarray:
    """The ``(n_boot, n)`` matrix of (stratified) bootstrap resamples of ``scores``."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    return x[_indices(x.size, n_boot, seed, strata)]


def _indices(n: int, n_boot: int, seed: int, strata: np.ndarray | Sequence[Any] | None) -> np.ndarray:
    """The ``(n_boot, n)`` indices of ``_replicates`` for ``n`` scores."""
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one score")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return resample_indices(n, int(n_boot), np.random.default_rng(seed), strata)


def _percentile_ci(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    lo, hi = np.percentile(boot, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(lo), float(hi)


def summarize_scores(
    scores: np.ndarray | Sequence[float],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    strata: np.ndarray | Sequence[Any] | None = None,
    indices: np.ndarray | None = None,
) -> dict[str, Any]:
    """Point statistics and bootstrap CIs of one 1-D array of scores.

    Returns a JSON-serialisable dict with keys ``mean``, ``iqm``, ``std``
    (sample standard deviation, ``ddof=1``; 0.0 for a single score), ``min``,
    ``max``, ``mean_ci`` and ``iqm_ci`` (``[lo, hi]`` lists) and ``n``.
    ``indices``: the resample indices of scores of this length and ``strata``
    with this seed, where the caller has drawn them for other scores already.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("cannot summarise an empty array of scores")
    mean = float(np.mean(x))
    point_iqm = float(iqm(x))
    if x.size == 1:
        mean_ci = (mean, mean)
        iqm_ci = (point_iqm, point_iqm)
    else:
        # one draw serves both statistics (same seed as two calls); the IQM comes last, as it reorders the draw
        samples = x[_indices(x.size, n_boot, seed, strata) if indices is None else indices]
        mean_ci = _percentile_ci(np.mean(samples, axis=-1), confidence)
        iqm_ci = _percentile_ci(_trimmed_mean(samples, -1, in_place=True), confidence)
    return {
        "mean": mean,
        "iqm": point_iqm,
        "std": float(np.std(x, ddof=1)) if x.size > 1 else 0.0,
        "min": float(np.min(x)),
        "max": float(np.max(x)),
        "mean_ci": [float(mean_ci[0]), float(mean_ci[1])],
        "iqm_ci": [float(iqm_ci[0]), float(iqm_ci[1])],
        "n": int(x.size),
    }


def summarize(
    records: Sequence[EpisodeRecord],
    n_boot: int = 2000,
    seed: int = 0,
    strata: np.ndarray | Sequence[Any] | None = None,
    confidence: float = 0.95,
    teams: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Summarise a batch of evaluation episodes.

    Args:
        records: Non-empty sequence of episodes.
        n_boot: Bootstrap replicates per confidence interval.
        seed: Bootstrap seed (the same seed is used for every statistic).
        strata: Optional label per record (e.g. the training seed of the
            policy that produced it) for a stratified bootstrap.
        confidence: Coverage of the confidence intervals.
        teams: Team name -> agent ids (:mod:`madistill.envs.teams`). With several teams the summary also
            has ``"teams"``: each team's return (mean over its agents) summarised like ``team``.

    Returns:
        A JSON-serialisable dict::

            {
              "n_episodes": int,
              "confidence": float, "n_boot": int,
              "team": {mean, iqm, std, min, max, mean_ci, iqm_ci, n},
              "agents": {agent_id: {mean, iqm, std, min, max, mean_ci, iqm_ci, n}, ...},
              "episode_length": {"mean": float, "std": float, "min": int, "max": int},
              "teams": {team: {mean, iqm, ...}, ...},  # only with several teams
            }

        ``team`` uses :attr:`EpisodeRecord.team_return`. Agents appear in order
        of first appearance; an agent missing from some episodes is summarised
        over the episodes where it is present (its ``n`` says how many). With a
        single episode all CIs collapse to the point value.
    """
    records = list(records)
    if not records:
        raise ValueError("summarize needs at least one EpisodeRecord")
    n_ep = len(records)
    labels: np.ndarray | None = None
    if strata is not None:
        labels = np.asarray(strata).ravel()
        if labels.shape[0] != n_ep:
            raise ValueError(f"strata has {labels.shape[0]} labels but there are {n_ep} records")

    team = np.array([r.team_return for r in records], dtype=np.float64)
    agent_ids: list[str] = []
    for r in records:
        for aid in r.agent_returns:
            if aid not in agent_ids:
                agent_ids.append(aid)

    drawn: dict[bytes, np.ndarray] = {}  # the resample indices per subset of the episodes: the same for its scores

    def indices(present: np.ndarray) -> np.ndarray:
        key = present.tobytes()
        if key not in drawn:
            drawn[key] = _indices(int(present.sum()), n_boot, seed, None if labels is None else labels[present])
        return drawn[key]

    agents: dict[str, Any] = {}
    for aid in agent_ids:
        present = np.array([aid in r.agent_returns for r in records], dtype=bool)
        vals = np.array([r.agent_returns[aid] for r in records if aid in r.agent_returns])
        agents[aid] = summarize_scores(
            vals, n_boot, confidence, seed, None if labels is None else labels[present], indices(present)
        )

    lengths = np.array([r.length for r in records], dtype=np.float64)
    out = {
        "n_episodes": n_ep,
        "confidence": float(confidence),
        "n_boot": int(n_boot),
        "team": summarize_scores(team, n_boot, confidence, seed, labels, indices(np.ones(n_ep, dtype=bool))),
        "agents": agents,
        "episode_length": {
            "mean": float(np.mean(lengths)),
            "std": float(np.std(lengths, ddof=1)) if n_ep > 1 else 0.0,
            "min": int(np.min(lengths)),
            "max": int(np.max(lengths)),
        },
    }
    if several_teams(teams):
        out["teams"] = {}
        for team, members in teams.items():  # type: ignore[union-attr]
            vals = team_arrays(records, members)
            present = ~np.isnan(vals)
            out["teams"][team] = summarize_scores(
                vals[present], n_boot, confidence, seed, None if labels is None else labels[present], indices(present)
            )
    return out
