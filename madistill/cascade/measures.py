"""What the paired runs measure: per-agent deviation over time, the influence matrix of impulse faults, and
the structure of a fault's cascade (who fails, in what order, how soon, how many hops from the victim)."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from madistill.cascade.paired import PairedRun
from madistill.envs.teams import several_teams
from madistill.evaluate.stats import bootstrap_ci

Matrix = dict[str, dict[str, Any]]  # src -> dst -> value


def after_onset(series: np.ndarray, onsets: np.ndarray, lags: int, offset: int = 0) -> np.ndarray:
    """``[E, lags]``: ``series[e, onset_e + offset + k]`` for k = 0..lags-1 (NaN past the episode) from a
    ``[E, T]`` series (one fault's values of one agent)."""
    e, t = series.shape
    idx = onsets[:, None] + offset + np.arange(lags)[None]
    inside = (idx >= 0) & (idx < t)
    return np.where(inside, series[np.arange(e)[:, None], np.clip(idx, 0, t - 1)], np.nan)


@dataclass
class Influence:
    """The influence matrix of impulse faults: effect (mean TV) of src's impulse on dst's action distribution k
    steps later, for k = 1..K, with bootstrap CIs over episodes and onsets."""

    agents: list[str]
    effect: np.ndarray  # [A, A, K] mean over samples (NaN on the diagonal)
    lo: np.ndarray  # [A, A, K] CI lower bound
    hi: np.ndarray  # [A, A, K] CI upper bound
    samples: np.ndarray  # [A, A, K] number of (episode, onset) samples behind each cell
    min_effect: float  # a cell is significant when its CI's lower bound exceeds this

    @property
    def lags(self) -> int:
        return self.effect.shape[-1]

    def first_lag(self) -> Matrix:
        """``{src: {dst: k or None}}``: the first lag whose effect is significant (None: none within K)."""
        sig = self.lo > self.min_effect
        return {s: {d: (int(np.argmax(sig[i, j])) + 1 if sig[i, j].any() else None)
                    for j, d in enumerate(self.agents) if j != i} for i, s in enumerate(self.agents)}

    def edges(self) -> list[list[Any]]:
        """``[[src, dst, 1], ...]``: the lag-1 influence graph."""
        return [[s, d, 1] for s, row in self.first_lag().items() for d, k in row.items() if k == 1]

    def reachable(self) -> dict[int, list[list[str]]]:
        """``{k: [[src, dst], ...]}``: pairs whose first significant lag is at most k, for k = 1..K."""
        first = self.first_lag()
        return {k: [[s, d] for s, row in first.items() for d, lag in row.items() if lag is not None and lag <= k]
                for k in range(1, self.lags + 1)}

    def matrix(self, values: np.ndarray) -> Matrix:
        """``{src: {dst: [value per lag 1..K]}}`` of a ``[A, A, K]`` array (self pairs left out)."""
        return {s: {d: [float(v) for v in values[i, j]] for j, d in enumerate(self.agents) if j != i}
                for i, s in enumerate(self.agents)}


def influence(run: PairedRun, sources: Sequence[str], lags: int, n_boot: int = 1000, confidence: float = 0.95,
              min_effect: float = 1e-6, seed: int = 0) -> Influence:
    """The influence matrix from a paired run whose faults are impulses on single agents: fault f's victim is
    ``sources[f]`` (several faults per source: several onsets, pooled). The effect at lag k is dst's TV k steps
    after the onset; where every sample is exactly 0 (the fault cannot have reached dst) the CI is [0, 0]."""
    a = len(run.agents)
    effect, lo, hi = (np.full((a, a, lags), np.nan) for _ in range(3))
    samples = np.zeros((a, a, lags), dtype=np.int64)
    for i, src in enumerate(run.agents):
        rows = [f for f, s in enumerate(sources) if s == src]
        if not rows:
            continue
        for j in range(a):
            if j == i:
                continue
            per_lag = np.concatenate([after_onset(run.tv[f, :, :, j], run.onsets[f], lags, offset=1) for f in rows])
            for k in range(lags):
                x = per_lag[:, k][~np.isnan(per_lag[:, k])]
                samples[i, j, k] = x.size
                if x.size == 0:
                    continue
                effect[i, j, k] = x.mean()
                lo[i, j, k], hi[i, j, k] = (0.0, 0.0) if not x.any() else bootstrap_ci(
                    x, np.mean, n_boot=n_boot, confidence=confidence, seed=seed)
    return Influence(list(run.agents), effect, lo, hi, samples, min_effect)


def hop_depths(edges: Sequence[Sequence[Any]], victims: Sequence[str]) -> dict[str, int]:
    """Shortest number of lag-1 influence edges from any victim to each agent it reaches."""
    succ: dict[str, list[str]] = {}
    for s, d, *_ in edges:
        succ.setdefault(s, []).append(d)
    depth = {v: 0 for v in victims}
    queue = deque(victims)
    while queue:
        u = queue.popleft()
        for v in succ.get(u, []):
            if v not in depth:
                depth[v] = depth[u] + 1
                queue.append(v)
    return depth


@dataclass
class Cascade:
    """One fault's cascade over the paired episodes: which non-faulted agents fail (TV from their clean twin above
    ``threshold`` at or after the onset, or a return loss; see :func:`cascade`), when, and at what hop depth."""

    agents: list[str]  # the non-faulted agents
    victims: list[str]
    threshold: float
    delays: np.ndarray  # [E, A'] steps from the onset to the agent's first failure (NaN: it never failed)
    return_delta: np.ndarray  # [E, A'] faulted - clean return
    depth: dict[str, int | None]  # hop depth in the lag-1 influence graph (None: unreachable)
    clean_return: np.ndarray  # [E, A'] the clean twin's return: what the fault's return delta is taken from

    @property
    def failed(self) -> np.ndarray:
        return ~np.isnan(self.delays)

    @property
    def sizes(self) -> np.ndarray:
        """``[E]`` number of failed agents per episode."""
        return self.failed.sum(1)

    def order(self, e: int) -> list[str]:
        """Episode e's failed agents by time of failure (ties by agent order)."""
        return [self.agents[j] for j in np.argsort(self.delays[e], kind="stable") if self.failed[e, j]]

    def representative(self) -> int:
        """The episode whose cascade size is the median's (the first such)."""
        sizes = self.sizes
        return int(np.argmin(np.abs(sizes - np.median(sizes))))

    def summary(self, n_boot: int = 1000, confidence: float = 0.95,
                teams: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
        """The cascade's distributions over episodes, as JSON-ready values; ``sizes``, ``others_return_deltas`` and
        ``others_clean_returns`` keep the per-episode values, which policies played on the same episodes are paired by.
        With several ``teams``, ``others_return_delta_by_team`` gives the non-faulted agents' mean return delta
        within each team that has any (across opposing teams the deltas partly cancel)."""
        sizes = self.sizes
        per_agent = {}
        for j, a in enumerate(self.agents):
            d = self.delays[:, j][self.failed[:, j]]
            r = self.return_delta[:, j]
            per_agent[a] = {
                "fail_rate": float(self.failed[:, j].mean()),
                "median_delay": float(np.median(d)) if d.size else None,
                "hop_depth": self.depth.get(a),
                "return_delta": float(r.mean()),
                "return_delta_ci": list(bootstrap_ci(r, np.mean, n_boot=n_boot, confidence=confidence)),
            }
        others = self.return_delta.mean(1)  # per episode: the non-faulted agents' mean return delta
        by_team = {}
        for team, members in teams.items() if several_teams(teams) else ():  # type: ignore[union-attr]
            cols = [j for j, a in enumerate(self.agents) if a in members]
            if cols:
                d = self.return_delta[:, cols].mean(1)
                by_team[team] = {"agents": [self.agents[j] for j in cols], "mean": float(d.mean()),
                                 "ci": list(bootstrap_ci(d, np.mean, n_boot=n_boot, confidence=confidence))}
        return {
            "victims": self.victims,
            "threshold": self.threshold,
            "size_mean": float(sizes.mean()),
            "size_ci": list(bootstrap_ci(sizes, np.mean, n_boot=n_boot, confidence=confidence)),
            "others_return_delta": float(others.mean()),
            "others_return_delta_ci": list(bootstrap_ci(others, np.mean, n_boot=n_boot, confidence=confidence)),
            **({"others_return_delta_by_team": by_team} if by_team else {}),
            "size_histogram": np.bincount(sizes, minlength=len(self.agents) + 1).tolist(),
            "sizes": sizes.tolist(),
            "others_return_deltas": others.tolist(),
            "others_clean_returns": self.clean_return.mean(1).tolist(),
            "agents": per_agent,
            "representative_episode": self.representative(),
            "representative_order": self.order(self.representative()),
        }


def cascade(run: PairedRun, f: int, victims: Sequence[str], threshold: float,
            edges: Sequence[Sequence[Any]] = (), return_loss: float | None = None) -> Cascade:
    """Fault f's cascade in ``run``; ``edges``: the lag-1 influence graph that hop depths are counted in. An
    agent fails at the first step from the onset where its TV from its clean twin exceeds ``threshold`` or, with a
    ``return_loss``, where its reward summed since the onset has fallen that far below its clean twin's."""
    others = [j for j, a in enumerate(run.agents) if a not in victims]
    t = run.tv.shape[2]
    steps = np.arange(t)[None]
    started = steps >= run.onsets[f][:, None]
    delays = np.full((run.tv.shape[1], len(others)), np.nan)
    for col, j in enumerate(others):
        over = (np.nan_to_num(run.tv[f, :, :, j]) > threshold) & started
        if return_loss is not None:
            lost = -np.cumsum(np.where(started, np.nan_to_num(run.reward_delta[f, :, :, j]), 0.0), axis=1)
            over |= lost >= return_loss
        hit = over.any(1)
        delays[hit, col] = over[hit].argmax(1) - run.onsets[f][hit]
    depth = hop_depths(edges, victims)
    names = [run.agents[j] for j in others]
    return Cascade(names, list(victims), float(threshold), delays,
                   run.returns[f + 1][:, others] - run.returns[0][:, others], {a: depth.get(a) for a in names},
                   run.returns[0][:, others])


def deviation_summary(run: PairedRun, f: int, victims: Sequence[str]) -> dict[str, Any]:
    """Fault f's per-agent deviation over episode steps (means over episodes; NaN-free lists, None where no
    episode lasts that long) and each agent's mean return delta."""
    def curve(x: np.ndarray) -> list[float | None]:
        counts = (~np.isnan(x)).sum(0)
        means = np.nansum(x, 0) / np.maximum(counts, 1)
        return [float(m) if c else None for m, c in zip(means, counts)]

    return {
        "victims": list(victims),
        "onset_mean": float(run.onsets[f].mean()),
        "agents": {a: {"tv": curve(run.tv[f, :, :, j]), "kl": curve(run.kl[f, :, :, j]),
                       "disagree": curve(run.disagree[f, :, :, j]), "reward_delta": curve(run.reward_delta[f, :, :, j]),
                       "return_delta": float((run.returns[f + 1, :, j] - run.returns[0, :, j]).mean())}
                   for j, a in enumerate(run.agents)},
    }


def precision_recall(first_lag: Mapping[str, Mapping[str, int | None]], truth: Mapping[tuple[str, str], int]) -> dict[str, float]:
    """Pairs found (non-null first lag) against the true influence pairs (``truth``: (src, dst) -> lag), and the
    share of true pairs whose first lag is exactly right."""
    found = {(s, d) for s, row in first_lag.items() for d, k in row.items() if k is not None}
    true = set(truth)
    hits = found & true
    return {
        "precision": len(hits) / len(found) if found else 1.0,
        "recall": len(hits) / len(true) if true else 1.0,
        "lag_exact": sum(first_lag[s][d] == truth[(s, d)] for s, d in true) / len(true) if true else 1.0,
    }
