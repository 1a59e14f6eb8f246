"""Online alerts: per agent, scores from what that agent sees and does, thresholds calibrated on clean episodes.

The monitor needs no clean twin, so it runs inside any rollout (evaluation, deployment) as an ``on_step`` hook.
Per agent and step it computes

- ``obs``: the largest absolute feature of the observation the policy saw, in the normaliser's units
  (``max_j |x_j - mean_j| / std_j``): how many standard deviations of the teacher's data one feature is away;
- ``surprise``: ``-log pi(a | o)`` of the action taken under the agent's own policy (the executed action
  where an action fault replaced the chosen one);
- ``disagreement``: ``KL(reference(o) || pi(o))``, how far the acting policy is from a reference policy (e.g.
  a student's teacher) on the same observation.

A threshold per agent and score is the conformal ``(1 - alpha)`` quantile of the per-episode maximum of that
score over clean calibration episodes, so a new clean episode (exchangeable with them) exceeds it with
chance at most ``alpha``; the target false-alarm rate is split evenly over agents and scores (Bonferroni), so
it bounds the chance that a clean episode raises any alert. An alert is the step a score rises above its
threshold (one event per rise, not one per step above it). No threshold is below a floor (``min_threshold``):
a score that clean episodes keep at float rounding (a student that matches its reference exactly on every clean
observation) would otherwise calibrate to a threshold that any other rounding (other hardware, batch size or
reference) crosses. Raising a threshold only lowers the false-alarm rate, so the guarantee holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributions import kl_divergence

from madistill.cascade.faults import Fault
from madistill.cascade.measures import cascade
from madistill.cascade.paired import MakeVenv, paired_rollouts
from madistill.envs.episodes import EpisodeRecord
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.evaluate.stats import bootstrap_ci
from madistill.policies import store
from madistill.policies.base import TeamPolicy, log_prob
from madistill.rollout import Rollout, Transition
from madistill.tb import TBLogger
from madistill.transforms import ActionTransform, ObsTransform

SCORES = ("obs", "surprise", "disagreement")


@dataclass(frozen=True)
class AlertEvent:
    """A score of one agent rising above its threshold."""

    agent: str
    kind: str  # the score: obs | surprise | disagreement
    seed: int  # the episode's seed
    step: int  # the episode step (0: the first action)
    score: float
    threshold: float


class AlertMonitor:
    """Scores every agent of ``team`` at every step and records alerts where a score exceeds its threshold.

    ``kinds``: the scores (of ``SCORES``); ``thresholds``: ``[agents, kinds]`` in the order of ``agents`` and
    ``kinds`` (None: +inf, which records the per-episode maxima calibration needs and raises no alert);
    ``reference``: the team the ``disagreement`` score compares with (same observation normalisation);
    ``tb``: where each alert is logged as it happens (scalar ``alerts/<agent>/<kind>`` and a text line).
    """

    def __init__(
        self,
        team: TeamPolicy,
        kinds: Sequence[str] = ("obs", "surprise"),
        thresholds: np.ndarray | None = None,
        reference: TeamPolicy | None = None,
        tb: TBLogger | None = None,
    ):
        self.team, self.kinds, self.reference, self.tb = team, checked_kinds(kinds, reference), reference, tb
        if reference is not None:
            _check_same_normalisation(team, reference)
        self.agents = [a for g in team.groups for a in g.agents]
        shape = (len(self.agents), len(self.kinds))
        self.thresholds = np.full(shape, np.inf) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        if self.thresholds.shape != shape:
            raise ValueError(f"thresholds must have shape {shape} (agents x kinds), got {self.thresholds.shape}")
        self.events: list[AlertEvent] = []
        self.episode_max: dict[int, np.ndarray] = {}  # episode seed -> [agents, kinds] maximum score
        self.steps = 0  # transitions seen (the TensorBoard step)
        self._max = self._above = np.zeros(0)

    def scores(self, tr: Transition) -> np.ndarray:
        """``[N, agents, kinds]`` scores of one step of every env copy (NaN where an agent did not act)."""
        cols = []
        for g in self.team.groups:
            x = tr.obs[g.name]
            n, k = x.shape[:2]
            dist = tr.dists[g.name]
            per_kind = []
            for kind in self.kinds:
                if kind == "obs":
                    s = x.abs().amax(-1)
                elif kind == "surprise":
                    a = tr.actions[g.name]
                    s = -log_prob(dist, a.reshape(n * k, *a.shape[2:])).reshape(n, k)
                else:
                    with torch.no_grad():
                        kl = kl_divergence(self.reference[g.name].dist(x.reshape(n * k, -1)), dist)  # type: ignore[index]
                    s = (kl if kl.dim() == 1 else kl.sum(-1)).reshape(n, k)
                per_kind.append(s.float())
            s = torch.stack(per_kind, -1)
            s[~tr.active[g.name].bool()] = float("nan")
            cols.append(s)
        return torch.cat(cols, 1).cpu().numpy().astype(np.float64)

    def observe(self, tr: Transition, watched: np.ndarray | None = None) -> None:
        """Score one transition (its episode seeds and steps name the events; an episode that ended there has its
        maxima kept). ``watched``: ``[N]`` bool, the env copies to watch (None: all); the others raise no alert
        and keep no maxima (a paired run's clean block, and its copies past their first episode, whose seeds
        another round plays)."""
        s, seeds, steps, ended = self.scores(tr), tr.episode_seeds, tr.episode_steps, tr.ended
        if watched is not None:
            s, ended = np.where(watched[:, None, None], s, np.nan), ended & watched
        if self._max.shape != s.shape:
            self._max, self._above = np.full(s.shape, -np.inf), np.zeros(s.shape, dtype=bool)
        self._max = np.fmax(self._max, s)
        above = s > self.thresholds  # NaN (not acting) compares False
        for i, a, k in np.argwhere(above & ~self._above):
            event = AlertEvent(self.agents[a], self.kinds[k], int(seeds[i]), int(steps[i]), float(s[i, a, k]),
                               float(self.thresholds[a, k]))
            self.events.append(event)
            if self.tb is not None:
                self.tb.scalar(f"alerts/{event.agent}/{event.kind}", event.score, self.steps)
                self.tb.text("alerts/events", f"episode {event.seed} step {event.step}: {event.agent} {event.kind} "
                             f"{event.score:.3g} > {event.threshold:.3g}", self.steps)
        self._above = above
        for i in np.flatnonzero(ended):
            self.episode_max[int(seeds[i])] = self._max[i].copy()
            self._max[i], self._above[i] = -np.inf, False
        self.steps += 1

    def maxima(self, seeds: Sequence[int]) -> np.ndarray:
        """``[episodes, agents, kinds]`` per-episode maxima of the finished episodes ``seeds``."""
        missing = [s for s in seeds if s not in self.episode_max]
        if missing:
            raise ValueError(f"episodes {missing[:5]} have not finished under this monitor")
        return np.stack([self.episode_max[s] for s in seeds])

    def thresholds_dict(self) -> dict[str, dict[str, float]]:
        """The thresholds as ``{agent: {kind: threshold}}`` (for JSON)."""
        return {a: dict(zip(self.kinds, map(float, row), strict=True)) for a, row in zip(self.agents, self.thresholds, strict=True)}


def checked_kinds(kinds: Sequence[str], reference: TeamPolicy | None) -> list[str]:
    """The score names, once checked to be known, distinct and computable (``disagreement`` needs a reference)."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in SCORES]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise MadistillError(f"alerts.scores must name distinct scores of {list(SCORES)}, got {kinds}")
    if "disagreement" in kinds and reference is None:
        raise MadistillError("the disagreement score needs a reference policy: set alerts.reference=<run or policy "
                             "directory> (e.g. the student's teacher) or drop disagreement from alerts.scores")
    return kinds


def _check_same_normalisation(team: TeamPolicy, reference: TeamPolicy) -> None:
    """The reference reads the acting team's normalised observations, so both must normalise alike."""
    for g in team.groups:
        mine, theirs = team.normalizers[g.name], reference.normalizers.get(g.name)
        if theirs is None or not (np.allclose(mine.mean, theirs.mean) and np.allclose(mine.std, theirs.std)):
            raise MadistillError(f"the reference policy normalises group {g.name!r}'s observations differently from the "
                                 "acting team: use a reference of the same env and normaliser (a student's teacher)")


def conformal_threshold(maxima: np.ndarray, alpha: float) -> np.ndarray:
    """Per column of ``maxima`` ``[episodes, ...]``, the ``ceil((1 - alpha)(E + 1))``-th smallest of the ``E``
    values: a new exchangeable value exceeds it with chance at most ``alpha`` (split conformal)."""
    if not 0.0 < alpha < 1.0:
        raise MadistillError(f"a false-alarm rate must be in (0, 1), got {alpha}")
    e = len(maxima)
    rank = math.ceil((1.0 - alpha) * (e + 1) - 1e-9)
    if rank > e:
        need = math.ceil(1.0 / alpha - 1.0 - 1e-9)
        raise MadistillError(f"a false-alarm rate of {alpha:.3g} per agent and score needs at least {need} calibration "
                             f"episodes, got {e}: raise alerts.calibration_episodes or alerts.false_alarm_rate")
    return np.sort(maxima, axis=0)[rank - 1]


def calibrate(maxima: np.ndarray, false_alarm_rate: float, min_threshold: float = 0.0) -> np.ndarray:
    """Thresholds ``[agents, kinds]`` from clean per-episode maxima ``[episodes, agents, kinds]``: the target rate of
    clean episodes with any alert, split evenly over the agents and kinds, each at least ``min_threshold``."""
    return np.maximum(conformal_threshold(maxima, false_alarm_rate / (maxima.shape[1] * maxima.shape[2])),
                      min_threshold)


def monitor_episodes(
    venv: MultiAgentVecEnv,
    monitor: AlertMonitor,
    episodes: int,
    seed: int,
    transforms: Sequence[ObsTransform | ActionTransform] = (),
    deterministic: bool = True,
) -> list[EpisodeRecord]:
    """Play episodes ``seed .. seed+episodes-1`` of ``monitor.team`` under ``transforms`` (observation and action
    faults, attacks) with the monitor attached; its events and per-episode maxima accumulate."""
    rollout = Rollout(venv, monitor.team, transforms=transforms, deterministic=deterministic, seed=seed,
                      episode_streams=True)
    return rollout.run(episodes=episodes, on_step=monitor.observe)


def calibrated_monitor(
    venv: MultiAgentVecEnv,
    team: TeamPolicy,
    kinds: Sequence[str],
    false_alarm_rate: float,
    episodes: int,
    seed: int,
    reference: TeamPolicy | None = None,
    deterministic: bool = True,
    tb: TBLogger | None = None,
    min_threshold: float = 0.0,
) -> AlertMonitor:
    """A monitor of ``team`` with thresholds calibrated on clean episodes ``seed .. seed+episodes-1`` (keep them
    apart from the episodes it then watches), each at least ``min_threshold``."""
    probe = AlertMonitor(team, kinds, reference=reference)
    monitor_episodes(venv, probe, episodes, seed, deterministic=deterministic)
    thresholds = calibrate(probe.maxima(range(seed, seed + episodes)), false_alarm_rate, min_threshold)
    return AlertMonitor(team, kinds, thresholds, reference, tb)


def configured_monitor(ac: Any, venv: MultiAgentVecEnv, team: TeamPolicy, tb: TBLogger | None = None,
                       deterministic: bool = True) -> AlertMonitor:
    """The monitor the ``alerts`` config section ``ac`` describes, calibrated on its clean episodes in the action
    mode the team will act in (``deterministic``: greedy; sampled actions are more surprising), the reference
    policy loaded from ``ac.reference`` where set."""
    reference = None
    if ac.reference is not None:
        reference = store.load_team(ac.reference, venv.groups, device=team.device)[0]
        reference.eval()
    checked_kinds(ac.scores, reference)  # before the calibration episodes, not after them
    return calibrated_monitor(venv, team, ac.scores, ac.false_alarm_rate, ac.calibration_episodes,
                              ac.calibration_seed, reference, deterministic, tb, ac.min_threshold)


def first_alerts(
    events: Sequence[AlertEvent], agents: Sequence[str], seeds: Sequence[int], onsets: int | Sequence[int] = 0
) -> np.ndarray:
    """Per episode of ``seeds``, the first step at or after its onset (one for all, or one per episode) at which
    one of ``agents`` raised any alert (NaN: none)."""
    onset = dict(zip(seeds, np.broadcast_to(onsets, len(seeds)).tolist(), strict=True))
    first = dict.fromkeys(seeds, math.nan)
    for e in events:
        if e.agent in agents and e.seed in first and e.step >= onset[e.seed] and not e.step >= first[e.seed]:  # NaN: none yet
            first[e.seed] = e.step
    return np.array([first[s] for s in seeds], dtype=np.float64)


def mean_ci(x: np.ndarray, n_boot: int = 1000, confidence: float = 0.95,
            strata: Sequence[Any] | None = None) -> dict[str, float]:
    """``{mean, lo, hi, n}``: the mean of ``x`` (booleans: a rate) with its percentile-bootstrap CI (NaN when empty);
    ``strata``: one label per value (e.g. the seed of the run it comes from), resampled within each label."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    lo, hi = bootstrap_ci(x, np.mean, n_boot=n_boot, confidence=confidence, strata=strata)
    return {"mean": float(np.mean(x)), "lo": lo, "hi": hi, "n": len(x)}


@dataclass
class Detection:
    """How the monitor did on one fault, per episode: when the fault began, when a victim first raised an alert
    (overall and per score) and when a non-faulted agent first failed (NaN: never)."""

    onsets: np.ndarray  # [E] the fault's onset step
    first_alert: np.ndarray  # [E] first step at or after the onset with an alert on a victim
    first_by_kind: dict[str, np.ndarray]  # score -> [E] the same for that score's alerts alone
    first_failure: np.ndarray  # [E] first step at which another agent failed (the cascade monitor's definition)
    events: list[AlertEvent] = field(default_factory=list)  # the alerts raised in the faulted episodes

    @staticmethod
    def pooled(parts: Sequence[Detection]) -> Detection:
        """The episodes of several detections (e.g. teachers of several seeds) as one."""
        return Detection(np.concatenate([p.onsets for p in parts]), np.concatenate([p.first_alert for p in parts]),
                         {k: np.concatenate([p.first_by_kind[k] for p in parts]) for k in parts[0].first_by_kind},
                         np.concatenate([p.first_failure for p in parts]), [e for p in parts for e in p.events])

    def summary(self, n_boot: int = 1000, confidence: float = 0.95) -> dict[str, Any]:
        """Detection rate, delay (steps from the onset), per-score detection rates and mean delays (None: never
        detected by that score), the share of episodes where another agent failed and, among those, where the alert
        came strictly before the first failure; means with percentile-bootstrap CIs over episodes."""
        detected, failed = np.isfinite(self.first_alert), np.isfinite(self.first_failure)
        before = self.first_alert[failed] < self.first_failure[failed]
        return {
            "detected": mean_ci(detected, n_boot, confidence),
            "delay": mean_ci((self.first_alert - self.onsets)[detected], n_boot, confidence),
            "detected_by_score": {k: float(np.isfinite(v).mean()) for k, v in self.first_by_kind.items()},
            "delay_by_score": {k: float(np.mean((v - self.onsets)[np.isfinite(v)])) if np.isfinite(v).any() else None
                               for k, v in self.first_by_kind.items()},
            "others_fail": mean_ci(failed, n_boot, confidence),
            "alert_before_failure": mean_ci(before, n_boot, confidence),
        }

    def to_dict(self) -> dict[str, Any]:
        """The per-episode arrays as JSON lists (NaN: none)."""
        return {"onsets": self.onsets.tolist(), "first_alert": self.first_alert.tolist(),
                "first_by_kind": {k: v.tolist() for k, v in self.first_by_kind.items()},
                "first_failure": self.first_failure.tolist()}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Detection:
        """The detection ``to_dict`` wrote."""
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in ("onsets", "first_alert", "first_failure")}
        by_kind = {k: np.asarray(v, dtype=np.float64) for k, v in d["first_by_kind"].items()}
        return Detection(arrays["onsets"], arrays["first_alert"], by_kind, arrays["first_failure"])


def watch_fault(
    make_venv: MakeVenv,
    monitor: AlertMonitor,
    fault: Fault,
    episodes: int,
    seed: int,
    threshold: float,
    deterministic: bool = True,
    return_loss: float | None = None,
    tb: TBLogger | None = None,
    max_copies: int | None = None,
) -> Detection:
    """Episodes ``seed .. seed+episodes-1`` played as clean and faulted twins (``paired_rollouts``), the faulted
    ones watched by a monitor with ``monitor``'s thresholds; another agent fails as the cascade monitor says
    (``cascade``): its action distribution's total variation from its clean twin's exceeds ``threshold``
    (``cascade.threshold``), or its reward since the onset falls ``return_loss`` below (``cascade.return_loss``).
    ``tb``: where the faulted episodes' alerts are logged as they happen. ``max_copies``: ``paired_rollouts``'."""
    watch = AlertMonitor(monitor.team, monitor.kinds, monitor.thresholds, monitor.reference, tb)

    def faulted(tr: Transition, measured: np.ndarray) -> None:  # block 0 of the paired run plays clean, block 1 faulted
        watch.observe(tr, measured & (np.arange(measured.size) >= measured.size // 2))

    run = paired_rollouts(make_venv, monitor.team, [fault], episodes, seed, deterministic, watch=faulted,
                          max_copies=max_copies)
    victims = list(fault.scope.victims)
    seeds, onsets = run.seeds.tolist(), run.onsets[0]
    delays = cascade(run, 0, victims, threshold, return_loss=return_loss).delays
    first_failure = onsets + (np.fmin.reduce(delays, axis=1) if delays.shape[1] else np.nan)
    by_kind = {k: first_alerts([e for e in watch.events if e.kind == k], victims, seeds, onsets) for k in watch.kinds}
    return Detection(onsets.astype(np.float64), first_alerts(watch.events, victims, seeds, onsets), by_kind,
                     first_failure.astype(np.float64), list(watch.events))


def clean_alarms(events: Sequence[AlertEvent], seeds: Sequence[int], n_boot: int = 1000,
                 confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """False alarms of clean episodes ``seeds``: ``per_episode`` (alerts per episode) and ``any`` (share of
    episodes with at least one), means with percentile-bootstrap CIs over episodes."""
    count = dict.fromkeys(seeds, 0)
    for e in events:
        if e.seed in count:
            count[e.seed] += 1
    n = np.array(list(count.values()), dtype=np.float64)
    return {"per_episode": mean_ci(n, n_boot, confidence), "any": mean_ci(n > 0, n_boot, confidence)}


def events_json(events: Sequence[AlertEvent]) -> list[dict[str, object]]:
    """The events as JSON rows ``{agent, kind, seed, step, score, threshold}``."""
    return [asdict(e) for e in events]
