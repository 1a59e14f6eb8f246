"""The Python API: ``madistill.load_team(path).act(raw observations)`` and the runnable docs/python_api.md example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

import madistill
from madistill.envs import EnvSpec, MultiAgentVecEnv, group_agents, make_env
from madistill.envs.groups import flatten_obs
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import run_episodes
from madistill.normalize import ObsNormalizer
from madistill.policies import SB3Policy, TeamPolicy
from madistill.policies.store import load_team, save_team

SPEAKER = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 25, "continuous_actions": False},
                  name="simple_speaker_listener_v4")
SPREAD_BOX = EnvSpec("mpe2.simple_spread_v3.parallel_env", {"N": 2, "max_cycles": 10, "continuous_actions": True})


def _save(path: Path, spec: EnvSpec) -> Path:
    """A random but opinionated SB3 team whose normaliser is far from the identity, saved at ``path``."""
    env = make_env(spec)
    groups = group_agents(env)
    env.close()
    torch.manual_seed(0)
    policies = {g.name: SB3Policy.from_arch(g, {"hidden_sizes": [16], "activation": "tanh"}) for g in groups}
    with torch.no_grad():  # SB3 initialises the action head near zero: make the policy opinionated
        for p in policies.values():
            p.sb3.action_net.weight.mul_(100.0)
    rng = np.random.default_rng(0)
    normalizers = {}
    for g in groups:
        normalizers[g.name] = ObsNormalizer(g.obs_dim)
        normalizers[g.name].update(rng.normal(1.0, 0.3, size=(64, g.obs_dim)))
    return save_team(path, TeamPolicy(groups, policies, normalizers), spec, "teacher")


@pytest.fixture(scope="module")
def speaker_team(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("api") / "policies" / "teacher", SPEAKER)


def _api_returns(path: Path, seeds: range) -> list[float]:
    team = madistill.load_team(path)
    env = team.make_env()
    out = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        totals = dict.fromkeys(env.agents, 0.0)
        while env.agents:
            obs, rewards, _, _, _ = env.step(team.act(obs))
            for a, r in rewards.items():
                totals[a] += r
        out.append(float(np.mean(list(totals.values()))))
    env.close()
    return out


def _evaluated_returns(path: Path, seeds: range) -> list[float]:
    team, _ = load_team(path)
    with MultiAgentVecEnv(SPEAKER, 3) as venv:
        return [r.team_return for r in run_episodes(venv, team, len(seeds), seeds.start, deterministic=True)]


def test_act_on_raw_observations_plays_the_evaluate_stages_episodes(speaker_team):
    seeds = range(10_000, 10_006)
    assert _api_returns(speaker_team, seeds) == pytest.approx(_evaluated_returns(speaker_team, seeds), abs=1e-4)


def test_act_normalises_the_raw_observations_inside(speaker_team):
    team = madistill.load_team(speaker_team)
    policy = team.policy
    env = team.make_env()
    obs, _ = env.reset(seed=3)
    differs = 0
    for _ in range(10):
        actions = team.act(obs)
        for agent, o in obs.items():
            g = policy.group_of[agent]
            x = torch.as_tensor(flatten_obs(policy[g].group.observation_space, o))[None]
            assert actions[agent] == int(policy[g](policy.normalizers[g].normalize(x)).argmax())
            differs += actions[agent] != int(policy[g](x).argmax())
        obs, *_ = env.step(actions)
    env.close()
    assert differs > 0  # the normaliser matters for this team, so the check above can tell


def test_box_actions_are_arrays_within_the_bounds_and_sampling_follows_the_generator(tmp_path):
    team = madistill.load_team(_save(tmp_path / "box", SPREAD_BOX))
    env = team.make_env()
    obs, _ = env.reset(seed=0)
    draws = [team.act(obs, deterministic=False, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    for agent, a in draws[0].items():
        space = env.action_space(agent)
        assert a.dtype == np.float32 and a.shape == space.shape and space.contains(a)
        np.testing.assert_array_equal(a, draws[1][agent])
    env.close()


def test_foreign_agents_and_observations_are_refused_in_one_line(speaker_team):
    team = madistill.load_team(speaker_team)
    env = team.make_env()
    obs, _ = env.reset(seed=0)
    with pytest.raises(MadistillError, match=r"no policy for agents \['agent_9'\].*simple_speaker_listener_v4"):
        team.act({**obs, "agent_9": obs["speaker_0"]})
    with pytest.raises(MadistillError, match=r"observation of 'listener_0' does not fit .*mpe2.simple_speaker_listener"):
        team.act({"listener_0": np.zeros(4, dtype=np.float32)})
    assert team.act({"speaker_0": obs["speaker_0"]}).keys() == {"speaker_0"}  # done agents get no action
    env.close()


@pytest.mark.slow
def test_the_documented_example_runs_verbatim_and_matches_the_evaluate_stage(speaker_team, tmp_path):
    text = (REPO / "docs" / "python_api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    script = tmp_path / "act.py"
    script.write_text(blocks[0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(speaker_team.parent.parent)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    mean = float(re.fullmatch(r"team return over 10 episodes: (-?\d+\.\d\d)\n", proc.stdout).group(1))
    assert mean == pytest.approx(np.mean(_evaluated_returns(speaker_team, range(10_000, 10_010))), abs=0.006)
