"""Online alerts of the cascade monitor: scores, conformal calibration, events, JSON and TensorBoard."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cascade_helpers import copy_team, relay_spec
from conftest import REPO
from gymnasium import spaces
from omegaconf import OmegaConf
from pettingzoo import ParallelEnv

from madistill.cascade.alerts import (
    AlertMonitor,
    Detection,
    calibrate,
    calibrated_monitor,
    configured_monitor,
    conformal_threshold,
    events_json,
    first_alerts,
    monitor_episodes,
    watch_fault,
)
from madistill.cascade.faults import Constant, Dead, Scope
from madistill.config import AlertConfig
from madistill.envs import EnvSpec, MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import Policy, TeamPolicy
from madistill.rollout import Rollout
from madistill.tb import TBLogger


class Beacon(ParallelEnv):
    """Two agents, Discrete(2) actions (``box``: Box actions of 2 components), ``length`` steps (``ragged``:
    ``length - seed % 3``). Each agent observes two features, ``base`` (+ Gaussian
    noise of std ``noise``, drawn from the episode seed); from step ``shift_at`` on, ``shift`` is added to
    feature 0 of agent ``shifted`` (an observation fault with a known size)."""

    metadata = {"name": "beacon_v0", "is_parallelizable": True, "render_modes": []}
    base = np.array([1.0, 2.0], dtype=np.float32)

    def __init__(self, length: int = 6, noise: float = 0.0, shift: float = 0.0, shift_at: int = 0, shifted: int = 0,
                 box: bool = False, ragged: bool = False):
        self.possible_agents = ["beacon_0", "beacon_1"]
        self._act_space = spaces.Box(-3.0, 3.0, (2,), np.float32) if box else spaces.Discrete(2)
        self.agents: list[str] = []
        self.length, self.noise, self.shift, self.shift_at, self.shifted = length, noise, shift, shift_at, shifted
        self.ragged, self.steps = ragged, length
        self._obs_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.rng = np.random.default_rng(0)
        self.t = 0

    def observation_space(self, agent):
        return self._obs_space

    def action_space(self, agent):
        return self._act_space

    def _obs(self) -> dict[str, np.ndarray]:
        out = {}
        for k, a in enumerate(self.possible_agents):
            o = self.base + self.noise * self.rng.standard_normal(2).astype(np.float32)
            if k == self.shifted and self.t >= self.shift_at:
                o[0] += self.shift
            out[a] = o
        return out

    def reset(self, seed=None, options=None):
        self.rng = np.random.default_rng(seed)
        self.t = 0
        self.steps = self.length - (seed % 3 if self.ragged else 0)
        self.agents = list(self.possible_agents)
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        done = self.t >= self.steps
        obs = self._obs()
        if done:
            self.agents = []
        return (obs, dict.fromkeys(self.possible_agents, 0.0), dict.fromkeys(self.possible_agents, False),
                dict.fromkeys(self.possible_agents, done), {a: {} for a in self.possible_agents})


BEACON = f"{__name__}.Beacon"
PROBS = torch.tensor([0.8, 0.2])  # every policy here acts from these fixed probabilities


class FixedGaussian(Policy):
    """Box actions: a unit Gaussian around ``mean`` whatever the observation."""

    def __init__(self, group, mean: float):
        super().__init__()
        self.group = group
        self.mean = torch.nn.Parameter(torch.full((group.act_dim,), mean), requires_grad=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mean.expand(obs.shape[0], -1)

    def log_std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)


class FixedPolicy(Policy):
    """Action probabilities ``probs`` whatever the observation."""

    def __init__(self, group, probs: torch.Tensor):
        super().__init__()
        self.group = group
        self.logits = torch.nn.Parameter(probs.log(), requires_grad=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(obs.shape[0], -1)


def _team(venv: MultiAgentVecEnv, probs: torch.Tensor = PROBS, std: tuple[float, float] = (2.0, 1.0)) -> TeamPolicy:
    """Fixed-probability policies with a normaliser of mean ``Beacon.base`` and standard deviation ``std``."""
    norms = {}
    for g in venv.groups:
        n = ObsNormalizer(2)
        n.mean, n.var = Beacon.base.astype(np.float64), np.square(std) - n.eps
        norms[g.name] = n
    return TeamPolicy(venv.groups, {g.name: FixedPolicy(g, probs) for g in venv.groups}, norms)


def _venv(num_envs: int = 2, **kwargs) -> MultiAgentVecEnv:
    return MultiAgentVecEnv(EnvSpec(BEACON, kwargs, name="beacon"), num_envs, grouping="per_agent")


def test_scores_are_the_z_score_of_a_known_shift_the_surprise_and_the_kl_from_the_reference():
    # raw shift 6 on a feature of std 2 from step 3: z = 3 there, 0 before; surprise -log 0.8; KL(ref || pi)
    with _venv(shift=6.0, shift_at=3, shifted=1) as venv:
        team = _team(venv)
        reference = _team(venv, probs=torch.tensor([0.5, 0.5]))
        monitor = AlertMonitor(team, ["obs", "surprise", "disagreement"], reference=reference)
        rollout = Rollout(venv, team, deterministic=True, seed=0)
        rows = []
        rollout.run(episodes=2, on_step=lambda tr: (rows.append(monitor.scores(tr)), monitor.observe(tr)))
    s = np.stack(rows)  # [steps, copies, agents, kinds]
    assert s.shape == (6, 2, 2, 3)
    assert np.allclose(s[:3, :, 1, 0], 0.0, atol=1e-5) and np.allclose(s[3:, :, 1, 0], 3.0, atol=1e-5)
    assert np.allclose(s[:, :, 0, 0], 0.0, atol=1e-5)
    assert np.allclose(s[..., 1], -math.log(0.8), atol=1e-6)  # greedy: the action of probability 0.8
    kl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert np.allclose(s[..., 2], kl, atol=1e-6)
    assert np.allclose(monitor.maxima([0, 1])[:, 1, 0], 3.0, atol=1e-5)


def test_box_scores_sum_over_action_components():
    # greedy = the mean: surprise = -2 log N(0; 0, 1) = log(2 pi); KL(N(1, 1) || N(0, 1)) = 1/2 per component
    with _venv(box=True) as venv:
        team, reference = (TeamPolicy(venv.groups, {g.name: FixedGaussian(g, m) for g in venv.groups},
                                      {g.name: ObsNormalizer(2, enabled=False) for g in venv.groups}) for m in (0.0, 1.0))
        monitor = AlertMonitor(team, ["surprise", "disagreement"], reference=reference)
        monitor_episodes(venv, monitor, 2, seed=0)
    assert np.allclose(monitor.maxima([0, 1]), [math.log(2 * math.pi), 1.0], atol=1e-5)


def test_conformal_threshold_is_the_right_order_statistic():
    maxima = np.random.default_rng(0).permutation(np.arange(1.0, 100.0))[:, None, None]  # 99 episodes, 1..99
    assert conformal_threshold(maxima, 0.1)[0, 0] == 90.0  # ceil(0.9 * 100) = 90th smallest
    assert conformal_threshold(maxima, 0.01)[0, 0] == 99.0  # ceil(0.99 * 100) = 99: the largest
    two = np.concatenate([maxima, 2 * maxima], axis=1)  # two agents share the rate: 0.1 each
    assert calibrate(two, 0.2)[:, 0].tolist() == [90.0, 180.0]
    with pytest.raises(MadistillError, match="needs at least 99 calibration episodes, got 98"):
        conformal_threshold(maxima[:98], 0.01)
    with pytest.raises(MadistillError, match="alerts.calibration_episodes"):
        calibrate(two, 0.018)  # 0.009 per agent needs 111 episodes


def test_the_threshold_floor_keeps_float_rounding_from_raising_alarms_but_not_a_real_disagreement():
    """A reference identical to the team on clean episodes calibrates the disagreement score to 0; a reference that
    differs at the level of float noise (a KL of 3e-7, the size of the thresholds DIGR students calibrate to
    against their teachers) then raises an alarm in every episode unless the floor holds the threshold above it,
    while a real change of the action distribution still alerts over the floor."""
    with _venv() as venv:
        team = _team(venv)
        default = AlertConfig().min_threshold
        thresholds = {floor: calibrated_monitor(venv, team, ["disagreement"], 0.5, episodes=8, seed=0,
                                                reference=_team(venv), min_threshold=floor).thresholds
                      for floor in (0.0, default)}
        assert np.all(thresholds[0.0] <= 1e-12) and np.all(thresholds[default] == default)
        alerted = {}
        for name, probs in (("rounding", [0.8003, 0.1997]), ("real", [0.5, 0.5])):
            for floor, t in thresholds.items():
                watch = AlertMonitor(team, ["disagreement"], t, reference=_team(venv, probs=torch.tensor(probs)))
                monitor_episodes(venv, watch, 4, seed=100)
                alerted[name, floor] = len({e.seed for e in watch.events})
    assert alerted == {("rounding", 0.0): 4, ("rounding", default): 0, ("real", 0.0): 4, ("real", default): 4}


def test_events_carry_agent_kind_episode_step_and_score_once_per_rise(tmp_path):
    # 3 episodes on 2 copies: copy 0 plays seeds 0 and 2, so the monitor follows a copy into its next episode
    with _venv(shift=6.0, shift_at=3, shifted=1) as venv:
        team = _team(venv)
        thresholds = np.array([[2.5, 1.0], [2.5, 1.0]])  # obs alerts above z = 2.5; surprise (0.22) never
        tb = TBLogger(tmp_path / "tb")
        monitor = AlertMonitor(team, ["obs", "surprise"], thresholds, tb=tb)
        monitor_episodes(venv, monitor, 3, seed=10)
    rows = [e for e in events_json(monitor.events) if e["seed"] in (10, 11, 12)]
    assert sorted((r["seed"], r["agent"], r["kind"], r["step"]) for r in rows) == [
        (s, "beacon_1", "obs", 3) for s in (10, 11, 12)]
    assert all(abs(r["score"] - 3.0) < 1e-5 and r["threshold"] == 2.5 for r in rows)
    assert json.loads(json.dumps(rows)) == rows
    assert abs(tb.last("alerts/beacon_1/obs") - 3.0) < 1e-5 and math.isnan(tb.last("alerts/beacon_0/obs"))
    tb.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert first_alerts(monitor.events, ["beacon_1"], [10, 11, 12]).tolist() == [3.0, 3.0, 3.0]
    assert np.isnan(first_alerts(monitor.events, ["beacon_1"], [10], onsets=4)).all()
    assert first_alerts(monitor.events, ["beacon_1"], [10, 11], onsets=[3, 4]).tolist()[0] == 3.0  # per episode
    assert np.isnan(first_alerts(monitor.events, ["beacon_1"], [10, 11], onsets=[3, 4])[1])
    assert np.isnan(first_alerts(monitor.events, ["beacon_0"], [10, 11, 12])).all()


def test_calibrated_thresholds_hold_the_false_alarm_rate_and_a_fault_alerts_from_onset():
    # noisy observations: rate 0.1 over 2 agents -> 0.05 each; 400 held-out clean episodes
    rate, held_out = 0.1, 400
    with _venv(num_envs=8, noise=1.0, length=8) as venv:
        monitor = calibrated_monitor(venv, _team(venv, std=(1.0, 1.0)), ["obs"], rate, episodes=200, seed=0)
        monitor_episodes(venv, monitor, held_out, seed=1000)
    seeds = range(1000, 1000 + held_out)
    alerted = {e.seed for e in monitor.events if e.seed in seeds}
    # the bound is <= 0.1 in expectation; the count is Binomial(400, <=0.1): above 60 has chance < 1e-3
    assert 0 < len(alerted) <= 60
    # calibrated against the per-episode maximum of |z| over 8 steps x 2 features, far above a single |z|'s 95%
    assert np.all(monitor.thresholds > 2.5)
    thresholds = monitor.thresholds
    with _venv(num_envs=8, noise=1.0, length=8, shift=10.0, shift_at=5, shifted=0) as venv:
        faulted = AlertMonitor(_team(venv, std=(1.0, 1.0)), ["obs"], thresholds)
        monitor_episodes(venv, faulted, held_out, seed=1000)
    first = first_alerts(faulted.events, ["beacon_0"], seeds, onsets=5)
    # detection at the onset, except where a clean false alarm raised before it is still up (one event per rise)
    raised_before = {e.seed for e in faulted.events if e.agent == "beacon_0" and e.step < 5}
    late = {s for s, f in zip(seeds, first, strict=True) if f != 5.0}
    assert late <= raised_before and len(late) < 10
    # before the onset and on the other agent the episodes are the clean ones: the same alerts as without fault
    before = {(e.seed, e.agent, e.step) for e in faulted.events if e.agent == "beacon_1" or e.step < 5}
    assert before == {(e.seed, e.agent, e.step) for e in monitor.events
                      if e.seed in seeds and (e.agent == "beacon_1" or e.step < 5)}


def test_bad_settings_are_one_line_errors():
    with _venv() as venv:
        team = _team(venv)
        with pytest.raises(MadistillError, match=r"alerts.scores must name distinct scores of \['obs'"):
            AlertMonitor(team, ["obs", "entropy"])
        with pytest.raises(MadistillError, match="disagreement score needs a reference policy: set alerts.reference"):
            AlertMonitor(team, ["disagreement"])
        other = _team(venv, std=(3.0, 1.0))
        with pytest.raises(MadistillError, match="normalises group 'beacon_0'"):
            AlertMonitor(team, ["disagreement"], reference=other)


def test_surprise_scores_the_executed_action_so_an_action_fault_alerts_from_its_onset():
    # greedy action 0 (probability 0.8); the constant fault executes action 1 (probability 0.2) from step 3
    with _venv(num_envs=2) as venv:
        team = _team(venv)
        clean = calibrated_monitor(venv, team, ["surprise"], 0.5, episodes=20, seed=0)
        assert np.allclose(clean.thresholds, -math.log(0.8))
        fault = Constant(Scope(("beacon_0",), onset=3, duration=None), [1.0])
        faulted = AlertMonitor(team, ["surprise"], clean.thresholds)
        monitor_episodes(venv, faulted, 4, seed=100, transforms=[fault])
        monitor_episodes(venv, clean, 4, seed=100)
    rows = sorted((e.seed, e.agent, e.step) for e in faulted.events if e.seed < 104)
    assert rows == [(s, "beacon_0", 3) for s in range(100, 104)]
    assert all(abs(e.score + math.log(0.2)) < 1e-6 for e in faulted.events)
    assert [e for e in clean.events if e.seed < 104] == []


def test_on_a_relay_chain_the_faulted_agent_alerts_before_its_downstream_agents_fail():
    # copying agents, target fixed per episode: a dead agent_1 (action 0) from step 4 is surprising exactly where
    # the target is not symbol 0, and agent_2 fails (leaves its clean twin) one step later
    onset, seeds = 4, list(range(50, 62))
    spec = relay_spec(n_agents=4)

    def make_venv(n: int, period: int) -> MultiAgentVecEnv:
        return MultiAgentVecEnv(spec, n, seed_period=period)

    with make_venv(3, 3) as venv:
        team = copy_team(venv)
        monitor = calibrated_monitor(venv, team, ["surprise"], 0.4, episodes=40, seed=0)
        monitor_episodes(venv, monitor, len(seeds), seeds[0])
    dead = Dead(Scope(("agent_1",), onset=onset, duration=None))
    detection = watch_fault(make_venv, monitor, dead, len(seeds), seeds[0], threshold=0.1)
    hit = np.isfinite(detection.first_alert)
    assert 0 < hit.sum() < len(seeds)  # some episodes have target 0, where a dead agent_1 emits the right symbol
    assert np.all(detection.first_alert[hit] == onset) and np.all(detection.first_failure[hit] == onset + 1)
    assert np.isnan(detection.first_failure[~hit]).all() and np.all(detection.onsets == onset)
    # failing by return loss alone (TV never exceeds 2): relay's reward is shared, the fraction of agents on
    # target, so the dead agent_1 costs every other agent 1/4 at the onset itself: no alert can come first
    by_return = watch_fault(make_venv, monitor, Dead(dead.scope), len(seeds), seeds[0], threshold=2.0, return_loss=0.25)
    assert np.all(by_return.first_failure[hit] == onset) and np.isnan(by_return.first_failure[~hit]).all()
    assert by_return.summary(n_boot=200)["alert_before_failure"]["mean"] == 0.0
    summary = detection.summary(n_boot=200)
    assert summary["detected"]["mean"] == hit.mean() and summary["delay"]["mean"] == 0.0
    assert summary["others_fail"]["mean"] == hit.mean() and summary["alert_before_failure"]["mean"] == 1.0
    assert summary["detected_by_score"] == {"surprise": hit.mean()} and summary["delay_by_score"] == {"surprise": 0.0}
    assert not [e for e in monitor.events if e.seed in seeds]  # the same episodes, clean: no alert
    pooled = Detection.pooled([detection, Detection.from_dict(json.loads(json.dumps(detection.to_dict())))])
    assert len(pooled.first_alert) == 2 * len(seeds) and pooled.summary(n_boot=200)["detected"]["mean"] == hit.mean()


def test_a_watched_paired_run_in_rounds_gives_the_alerts_of_one_run_and_none_past_the_measured_episodes():
    # ragged episodes: copies whose episode ended early play on into seeds that a later round (or no round) measures
    seeds = list(range(30, 41))

    def make_venv(n: int, period: int) -> MultiAgentVecEnv:
        return MultiAgentVecEnv(EnvSpec(BEACON, {"noise": 1.0, "ragged": True}, name="beacon"), n, grouping="per_agent",
                                seed_period=period)

    def detect(max_copies: int | None) -> Detection:
        with make_venv(2, 2) as venv:
            monitor = AlertMonitor(_team(venv), ["obs", "surprise"], np.full((2, 2), 1.2))
        fault = Constant(Scope(("beacon_0",), onset=1, onset_max=3, duration=None), [1.0])
        return watch_fault(make_venv, monitor, fault, len(seeds), seeds[0], 0.05, deterministic=False,
                           max_copies=max_copies)

    once, rounds = detect(None), detect(8)  # 2 blocks of 4 episodes: rounds of 4, 4 and 3 measured
    assert len(once.events) > 10 and {e.seed for e in once.events} <= set(seeds)
    assert sorted(events_json(once.events), key=json.dumps) == sorted(events_json(rounds.events), key=json.dumps)
    for name in ("onsets", "first_alert", "first_failure"):
        assert np.array_equal(getattr(once, name), getattr(rounds, name), equal_nan=True), name
    assert len(np.unique(once.onsets)) > 1  # onsets drawn per episode, the same in rounds


def test_the_alerts_config_section_builds_a_calibrated_monitor_or_refuses_in_one_line():
    with _venv() as venv:
        team = _team(venv)
        ac = OmegaConf.structured(AlertConfig(scores=["obs", "surprise"], false_alarm_rate=0.5, calibration_episodes=8,
                                              calibration_seed=0))
        monitor = configured_monitor(ac, venv, team)
        # the obs score is 0 on every clean step: its threshold is the floor alerts.min_threshold
        assert monitor.kinds == ["obs", "surprise"] and monitor.thresholds_dict()["beacon_1"] == pytest.approx(
            {"obs": 1e-6, "surprise": -math.log(0.8)}, abs=1e-6) and monitor.thresholds_dict()["beacon_1"]["obs"] == 1e-6
        ac.false_alarm_rate = 0.01  # 0.0025 per agent and score needs 399 episodes
        with pytest.raises(MadistillError, match="needs at least 399 calibration episodes, got 8"):
            configured_monitor(ac, venv, team)
        ac.scores = ["disagreement"]
        with pytest.raises(MadistillError, match="set alerts.reference"):
            configured_monitor(ac, venv, team)


def test_the_alerts_experiment_counts_clean_alarms_and_detections_per_score(monkeypatch: pytest.MonkeyPatch):
    """experiments/cascade_alerts.py pools the runs of one env: clean episodes with an alert of each score, and per
    fault the detection rate and mean delay of each score (None where a score never fired)."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import cascade_alerts

    nan = math.nan
    fault = {"onsets": [5, 5], "first_alert": [5, 7], "first_failure": [nan, 6],
             "first_by_kind": {"obs": [nan, nan], "disagreement": [5, 7]}}
    studies = [{"clean_alerts": [0, 2, 0, 0], "clean_alerts_by_kind": {"obs": [0, 1, 0, 0], "disagreement": [0, 1, 0, 0]},
                "faults": {"obs pgd / a": fault}},
               {"clean_alerts": [1, 0, 0, 0], "clean_alerts_by_kind": {"obs": [0, 0, 0, 0], "disagreement": [1, 0, 0, 0]},
                "faults": {"obs pgd / a": fault}}]
    s = cascade_alerts.summary(studies)
    assert s["clean_alerted_episodes"]["mean"] == 2 / 8 and s["clean_alerts_per_episode"]["mean"] == 3 / 8
    assert {k: v["mean"] for k, v in s["clean_alerted_episodes_by_kind"].items()} == {"obs": 1 / 8, "disagreement": 2 / 8}
    r = s["faults"]["obs pgd / a"]
    assert r["detected_by_score"] == {"obs": 0.0, "disagreement": 1.0} and r["delay_by_score"] == {"obs": None, "disagreement": 1.0}
    assert r["alert_before_failure"]["mean"] == 0.0  # the alert at 7 came after the failure at 6
    table = cascade_alerts.table("relay", s)
    assert "by score: obs 12.5 [" in table and "| obs 0, disagreement 100 | obs -, disagreement 1.0 |" in table
