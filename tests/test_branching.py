"""Env branching: replay from the episode seed and the action prefix, and the batched port's state copy, give
the returns of playing the continuation directly; an env that is not reproducible is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cascade_helpers import copy_team, relay_spec

from madistill.branching import ActionHistory, Branching, action_returns
from madistill.envs.factory import EnvSpec
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import Policy, TeamPolicy
from madistill.rollout import Rollout, env_actions, team_actions
from madistill.transforms import StepContext, normalize

SL = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 10}, name="sl")


class RandomLinear(Policy):
    """Fixed random logits ``W x``: a deterministic team whose greedy actions vary with the observation."""

    def __init__(self, group, seed: int):
        super().__init__()
        self.group = group
        self.w = torch.nn.Parameter(torch.randn(group.action_space.n, group.obs_dim,
                                                generator=torch.Generator().manual_seed(seed)), requires_grad=False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs @ self.w.T


def sl_team(venv: MultiAgentVecEnv) -> TeamPolicy:
    return TeamPolicy(venv.groups, {g.name: RandomLinear(g, i) for i, g in enumerate(venv.groups)},
                      {g.name: ObsNormalizer(g.obs_dim, enabled=False) for g in venv.groups})


def direct_returns(spec, team, seeds, prefix, first, horizon) -> np.ndarray:
    """The continuation played by hand: one env copy per (episode, candidate), reset to its seed."""
    out = np.zeros((len(seeds), len(first)))
    for i, seed in enumerate(seeds):
        for k, cand in enumerate(first):
            with MultiAgentVecEnv(spec, 1, backend="pettingzoo") as venv:
                venv.reset(int(seed))
                for a in prefix:
                    venv.step({g: x[i:i + 1] for g, x in a.items()})
                total, acts = 0.0, {g: x[i:i + 1] for g, x in cand.items()}
                for _ in range(horizon + 1):
                    res = venv.step(acts)
                    total += sum(r.sum() for r in res.rewards.values()) / len(venv.possible_agents)
                    if res.episodes:
                        break
                    acts = env_actions(team, team_actions(team, normalize(team, res.obs), True, None)[1])
                out[i, k] = total
    return out


@pytest.mark.parametrize("prefix_len", [0, 3, 7])
def test_replay_and_state_copy_give_the_returns_of_playing_the_branch(prefix_len):
    seeds = np.array([11, 12, 40])
    with MultiAgentVecEnv(SL, 1, backend="pettingzoo") as venv:
        team = sl_team(venv)
        groups = venv.groups
    rng = np.random.default_rng(prefix_len)
    prefix = [{"speaker": rng.integers(3, size=(3, 1)), "listener": rng.integers(5, size=(3, 1))}
              for _ in range(prefix_len)]
    first = [{"speaker": np.full((3, 1), s), "listener": np.full((3, 1), li)} for s in range(3) for li in (0, 4)]
    horizon = 3 if prefix_len < 7 else 4  # the last case runs past the episode's end (10 steps)
    replay = Branching(SL, groups, "pettingzoo").returns(team, seeds, prefix, first, horizon)
    copy = Branching(SL, groups, "batched")
    assert copy.backend == "batched"
    state = copy.returns(team, seeds, prefix, first, horizon)
    direct = direct_returns(SL, team, seeds, prefix, first, horizon)
    assert replay.shape == (3, 6)
    np.testing.assert_allclose(replay, direct, rtol=0, atol=1e-5)
    np.testing.assert_allclose(state, direct, rtol=0, atol=1e-5)
    assert np.ptp(direct, axis=1).min() > 0  # the candidates differ, so the match is not vacuous
    # the trunk follows a growing prefix one step at a time and gives the same numbers as a fresh replay
    more = [*prefix, {"speaker": np.zeros((3, 1), np.int64), "listener": np.ones((3, 1), np.int64)}]
    np.testing.assert_allclose(copy.returns(team, seeds, more, first, 2),
                               direct_returns(SL, team, seeds, more, first, 2), rtol=0, atol=1e-5)


def played(venv: MultiAgentVecEnv, steps: int) -> tuple[TeamPolicy, ActionHistory, Rollout, dict]:
    """A relay copy team's greedy rollout of ``steps`` steps with an action history, and its current observations."""
    team, history = copy_team(venv), ActionHistory()
    rollout = Rollout(venv, team, [history], deterministic=True, seed=5)
    for _ in range(steps):
        rollout.step()
    return team, history, rollout, normalize(team, rollout.raw_obs)


def test_action_returns_in_a_rollout_match_brute_force_and_history_is_the_executed_prefix():
    spec = relay_spec()
    with MultiAgentVecEnv(spec, 2) as venv:
        team, history, rollout, ctx_obs = played(venv, 4)
        ctx = StepContext(team, rollout.steps, rollout.episode_step, rollout.active, rollout.generator, rollout.playing)
        _, intended = team_actions(team, ctx_obs, True, None)
        actions = env_actions(team, intended)
        branching = Branching(spec, venv.groups)
        g = venv.groups[0]
        rows = np.arange(2)
        ret = action_returns(branching, team, history, actions, ctx, g, 0, rows, horizon=2, obs=ctx_obs)
        prefix = history.prefix(rows)
        assert len(prefix) == 4
        first = []
        for k in range(g.action_space.n):
            cand = {name: a.copy() for name, a in actions.items()}
            cand[g.name][:, 0] = k
            first.append(cand)
        brute = direct_returns(spec, team, rollout.playing, prefix, first, 2)
        np.testing.assert_allclose(ret, brute, rtol=0, atol=1e-6)
        assert (brute.min(1) < brute[np.arange(2), actions[g.name][:, 0]]).all()  # worse than the team's own choice


def test_env_not_reproducible_from_its_seed_is_refused():
    spec = EnvSpec("cascade_helpers.UnseededRelay", {"n_symbols": 3, "switch_prob": 0.5, "max_cycles": 12})
    # an unseeded copy replays its observations by chance with probability about 1/3 (its target of 3 symbols);
    # 16 copies leave about (1/3)^16 for a false pass
    with MultiAgentVecEnv(spec, 16) as venv:
        team, history, rollout, obs = played(venv, 3)
        first = [env_actions(team, team_actions(team, obs, True, None)[1])]
        with pytest.raises(MadistillError, match="not reproducible from its seed"):
            Branching(spec, venv.groups).returns(team, rollout.playing, history.prefix(np.arange(16)), first, 1,
                                                 expect=obs)
