"""Faults and the action hook: each fault changes only its victims' slots, only inside its window, re-armed
at every episode start; bad fault settings are one-line errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cascade_helpers import copy_team, relay_spec
from omegaconf import OmegaConf

from madistill.cascade.faults import FAULTS, ActionFault, FaultEnv, ObsFault, make_fault
from madistill.config import FaultConfig
from madistill.envs.features import feature_layouts
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.rollout import Rollout

VICTIM = "agent_1"


def fault_cfg(name: str, **kw: object):
    return OmegaConf.merge(OmegaConf.structured(FaultConfig), {"name": name, "victims": [VICTIM], **kw})


def fault_env(venv: MultiAgentVecEnv) -> FaultEnv:
    attack = SimpleNamespace(steps=3, restarts=1, step_size=2.5, spsa_samples=4, spsa_delta=0.3, target_candidates=1,
                             exclude={}, scale={}, lookahead_horizon=1, lookahead_gamma=0.99)
    return FaultEnv(venv.groups, feature_layouts(venv.groups, {}, venv.feature_names), attack, spec=venv.spec)


def record(name: str, num_envs: int = 3, steps: int = 30, **kw: object) -> list[dict]:
    """Per step: the episode step and seed of each copy, what the policies saw before and after the observation
    chain, and the intended and executed actions, under fault ``name`` on agent_1 (relay chain, 4 agents)."""
    with MultiAgentVecEnv(relay_spec(n_agents=4), num_envs) as venv:
        fault = make_fault(fault_cfg(name, **kw), fault_env(venv))
        rollout = Rollout(venv, copy_team(venv), [fault], seed=7, episode_streams=True)
        rows = []

        def keep(tr) -> None:
            rows.append({"clean_obs": torch.as_tensor(tr.raw_obs["agent"]), "obs": tr.obs["agent"].clone(),
                         "intended": tr.intended["agent"].clone(), "actions": tr.actions["agent"].clone()})

        for _ in range(steps):
            step, seeds = rollout.episode_step.copy(), rollout.playing.copy()
            rollout.run(steps=1, on_step=keep)
            rows[-1].update(step=step, seed=seeds)
    return rows


def changed(rows: list[dict], before: str, after: str) -> np.ndarray:
    """[steps, copies, agents] bool: where ``after`` differs from ``before``."""
    diffs = [(r[after] != r[before]).reshape(*r[after].shape[:2], -1).any(-1).numpy() for r in rows]
    return np.stack(diffs)


def window(rows: list[dict], onset: int, duration: int | None) -> np.ndarray:
    steps = np.stack([r["step"] for r in rows])
    return (steps >= onset) & (steps < onset + duration if duration else True)


@pytest.mark.parametrize("name", ["noise", "dropout", "frozen", "attack"])
def test_observation_faults_change_only_the_victims_slot_inside_the_window(name):
    rows = record(name, onset=4, duration=3, sigma=0.5, eps=0.5, method="random")
    diff = changed(rows, "clean_obs", "obs")
    inside = window(rows, 4, 3)
    assert not diff[:, :, [0, 2, 3]].any()  # other agents' slots never change
    assert not diff[:, :, 1][~inside].any()  # the victim's only inside the window
    if name != "frozen":  # a frozen observation equals the fresh one at its first step
        assert diff[:, :, 1][inside].mean() > 0.5


@pytest.mark.parametrize("name", ["random", "stuck", "constant", "dead", "worst"])
def test_action_faults_change_only_the_victims_executed_action_from_the_onset(name):
    rows = record(name, onset=4, duration=None, action=[2])
    diff = changed(rows, "intended", "actions")
    inside = window(rows, 4, None)
    assert not diff[:, :, [0, 2, 3]].any()
    assert not diff[:, :, 1][~inside].any()
    assert diff[:, :, 1][inside].any()
    executed = torch.stack([r["actions"][:, 1] for r in rows]).numpy()
    if name in ("constant", "dead"):
        assert (executed[inside] == (2 if name == "constant" else 0)).all()


def test_stuck_and_frozen_rearm_at_every_episode_start():
    """Each copy plays several episodes: the stuck action is the one chosen at that episode's onset."""
    rows = record("stuck", num_envs=2, steps=36, onset=3, duration=None)
    steps, seeds = np.stack([r["step"] for r in rows]), np.stack([r["seed"] for r in rows])
    intended = torch.stack([r["intended"][:, 1] for r in rows]).numpy()
    executed = torch.stack([r["actions"][:, 1] for r in rows]).numpy()
    assert len(np.unique(seeds)) >= 5
    for seed in np.unique(seeds):
        t, c = np.nonzero((seeds == seed) & (steps >= 3))
        at_onset = intended[(seeds == seed) & (steps == 3)]
        assert len(at_onset) == 1 and (executed[t, c] == at_onset[0]).all()
    frozen = record("frozen", num_envs=2, steps=36, onset=3, duration=None)
    for seed in np.unique(seeds):
        seen = [r["obs"][c, 1] for r in frozen for c in np.flatnonzero((r["seed"] == seed) & (r["step"] >= 3))]
        onset_obs = [r["clean_obs"][c, 1] for r in frozen for c in np.flatnonzero((r["seed"] == seed) & (r["step"] == 3))]
        assert all(torch.equal(s, onset_obs[0]) for s in seen)


def test_drawn_onsets_depend_on_the_episode_seed_only():
    def onsets(num_envs: int) -> dict[int, int]:
        rows = record("noise", num_envs=num_envs, steps=36, onset=1, onset_max=8, duration=1)
        out: dict[int, int] = {}
        for r in rows:
            for c in np.flatnonzero((r["obs"][:, 1] != r["clean_obs"][:, 1]).any(-1).numpy()):
                assert out.setdefault(int(r["seed"][c]), int(r["step"][c])) == int(r["step"][c])  # one step each
        return out

    two, three = onsets(2), onsets(3)
    common = set(two) & set(three)
    assert len(common) >= 5 and all(two[s] == three[s] for s in common)
    assert len(set(three.values())) > 1  # drawn, not fixed


def test_intermittent_fault_acts_at_about_its_rate():
    rows = record("constant", num_envs=4, steps=60, onset=0, duration=None, rate=0.5, action=[2])
    hit = np.stack([(r["actions"][:, 1] == 2).numpy() for r in rows])
    assert 0.3 < hit.mean() < 0.85  # the copy policy picks 2 a third of the time anyway


def test_every_registered_fault_has_a_yaml():
    from madistill.cli import config_dir

    yamls = {p.stem: OmegaConf.load(p).name for p in Path(config_dir(), "fault").glob("*.yaml")}
    assert set(FAULTS) <= set(yamls.values())
    # each fault changes either what its victims see or what they do; the project's action faults are among them
    assert all(issubclass(f, ActionFault) != issubclass(f, ObsFault) for f in FAULTS.values())
    assert {"random", "stuck", "constant", "dead", "worst"} <= {n for n, f in FAULTS.items() if issubclass(f, ActionFault)}


@pytest.mark.parametrize(("kw", "message"), [
    ({"name": "melt"}, "unknown fault 'melt'"),
    ({"victims": ["agent_9"]}, "fault.victims names ['agent_9']"),
    ({"name": "constant", "action": [0.5, 0.5]}, "has Discrete actions: set fault.action=[k]"),
    ({"name": "constant", "action": [3]}, "k in 0..2"),
    ({"name": "noise", "features": ["nope"]}, "fault.features names 'nope'"),
    ({"name": "attack", "method": "learned"}, "not a per-step attack the fault can play: use one of random, fgsm, pgd, critic, spsa, targeted_random, targeted_lowest"),
    ({"name": "attack", "method": "bogus"}, "fault.method='bogus' is not a per-step attack the fault can play"),
    ({"name": "attack", "method": "targeted_lookahead"}, "fault=worst plays the lookahead's worst action"),
])
def test_bad_fault_settings_are_one_line_errors(kw, message):
    with MultiAgentVecEnv(relay_spec(n_agents=4), 1) as venv:
        cfg = fault_cfg(kw.pop("name", "random"), **kw)
        with pytest.raises(MadistillError) as err:
            make_fault(cfg, fault_env(venv))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("override", "message"), [
    ("fault.onset_max=2", "fault.onset_max must be null or at least fault.onset, got 2"),
    ("fault.duration=0", "fault.duration must be at least 1, got 0"),
    ("fault.rate=0", "fault.rate must be in (0, 1], got 0.0"),
    ("cascade.onsets=[]", "cascade.onsets must be a non-empty list of steps at least 0, got []"),
])
def test_fault_and_cascade_ranges_are_checked_with_the_config(override, message):
    from conftest import compose_config, tiny

    with pytest.raises(MadistillError) as err:
        compose_config(tiny("env=relay", override))
    assert str(err.value) == message


def test_message_fault_silences_only_the_listeners_message():
    """conf/fault/message.yaml: the listener's message features read the normaliser's mean from the onset on."""
    from madistill.cli import config_dir
    from madistill.envs.factory import EnvSpec
    from madistill.normalize import ObsNormalizer
    from madistill.policies.base import TeamPolicy
    from madistill.policies.uniform import UniformPolicy

    spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 8}, name="sl")
    with MultiAgentVecEnv(spec, 2) as venv:
        norms = {g.name: ObsNormalizer(g.obs_dim) for g in venv.groups}
        norms["listener"].mean = np.linspace(1, 2, 11)  # a mean that is not 0 in raw units
        team = TeamPolicy(venv.groups, {g.name: UniformPolicy(g) for g in venv.groups}, norms)
        layouts = feature_layouts(venv.groups, {"listener": {"message": [8, 9, 10]}}, venv.feature_names)
        fc = OmegaConf.merge(OmegaConf.structured(FaultConfig), OmegaConf.load(Path(config_dir(), "fault", "message.yaml")),
                             {"onset": 3})
        fault = make_fault(fc, FaultEnv(venv.groups, layouts))
        rows = []
        Rollout(venv, team, [fault], seed=0).run(steps=8, on_step=lambda tr: rows.append(
            (tr.obs["listener"][:, 0].clone(), norms["listener"].normalize(torch.as_tensor(tr.raw_obs["listener"][:, 0])),
             tr.obs["speaker"].clone(), norms["speaker"].normalize(torch.as_tensor(tr.raw_obs["speaker"])))))
    for t, (seen, clean, speaker_seen, speaker_clean) in enumerate(rows):
        assert torch.equal(speaker_seen, speaker_clean) and torch.equal(seen[:, :8], clean[:, :8])
        assert torch.equal(seen[:, 8:], clean[:, 8:]) if t < 3 else torch.allclose(seen[:, 8:], torch.zeros(2, 3))
