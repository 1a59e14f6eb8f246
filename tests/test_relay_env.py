"""Tests for the relay_v0 ParallelEnv (envs/relay.py)."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import api_test, parallel_api_test

from envs import relay


def _onehot(k: int, n: int) -> list[float]:
    v = [0.0] * n
    v[k] = 1.0
    return v


# --------------------------------------------------------------------- API
@pytest.mark.parametrize(
    "kwargs",
    [
        {"topology": "chain"},
        {"topology": "star", "n_agents": 5, "n_symbols": 4},
        {"topology": "edges", "n_agents": 5, "edges": [[0, 2], [1, 2], [2, 3], [3, 4], [4, 2]]},
    ],
)
def test_parallel_api(kwargs):
    parallel_api_test(relay.parallel_env(**kwargs), num_cycles=30)


def test_parallel_api_short_episode_and_aec_api():
    parallel_api_test(relay.parallel_env(max_cycles=5), num_cycles=5)
    api_test(relay.env(topology="star"), num_cycles=20)


def test_spaces_and_metadata():
    env = relay.parallel_env(topology="edges", n_agents=4, edges=[[0, 2], [1, 2], [2, 3]], n_symbols=3)
    assert env.metadata["name"] == "relay_v0"
    assert env.metadata["is_parallelizable"] is True
    assert env.possible_agents == ["agent_0", "agent_1", "agent_2", "agent_3"]
    assert env.sources == ["agent_0", "agent_1"]
    assert env.in_neighbours["agent_2"] == ["agent_0", "agent_1"]
    for a in env.possible_agents:
        assert env.observation_space(a) is env.observation_space(a)
        assert env.action_space(a) is env.action_space(a)
        assert env.action_space(a).n == 3
        assert env.observation_space(a).dtype == np.float32
        assert env.observation_space(a).shape == (len(env.feature_names(a)),)
    assert env.feature_names("agent_0") == ["target=sym0", "target=sym1", "target=sym2"]
    assert env.feature_names("agent_2") == [
        "in:agent_0=sym0",
        "in:agent_0=sym1",
        "in:agent_0=sym2",
        "in:agent_1=sym0",
        "in:agent_1=sym1",
        "in:agent_1=sym2",
    ]
    assert env.feature_names("agent_3") == ["in:agent_2=sym0", "in:agent_2=sym1", "in:agent_2=sym2"]


# -------------------------------------------------------------- dynamics
def test_observations_reflect_previous_actions():
    env = relay.parallel_env(
        topology="edges", n_agents=4, edges=[[1, 2], [0, 2], [2, 3]], n_symbols=3, switch_prob=0.0
    )
    obs, _ = env.reset(seed=3)
    # t = 0: non-sources see all zeros, sources see the target
    assert obs["agent_2"].tolist() == [0.0] * 6
    assert obs["agent_3"].tolist() == [0.0] * 3
    for src in ("agent_0", "agent_1"):
        assert obs[src].tolist() == _onehot(env.target, 3)

    seq = [
        {"agent_0": 2, "agent_1": 0, "agent_2": 1, "agent_3": 0},
        {"agent_0": 1, "agent_1": 1, "agent_2": 2, "agent_3": 2},
        {"agent_0": 0, "agent_1": 2, "agent_2": 0, "agent_3": 1},
    ]
    for acts in seq:
        obs, *_ = env.step(acts)
        assert obs["agent_2"].tolist() == _onehot(acts["agent_0"], 3) + _onehot(acts["agent_1"], 3)
        assert obs["agent_3"].tolist() == _onehot(acts["agent_2"], 3)
        for a in env.possible_agents:
            assert env.observation_space(a).contains(obs[a])


def test_source_sees_current_target_when_it_switches():
    env = relay.parallel_env(topology="star", n_agents=3, n_symbols=4, switch_prob=1.0)
    obs, _ = env.reset(seed=0)
    prev = env.target
    for _ in range(10):
        assert obs["agent_0"].tolist() == _onehot(env.target, 4)
        obs, *_ = env.step({a: 0 for a in env.agents})
        assert env.target != prev  # switch_prob=1 always moves to a *different* symbol
        prev = env.target


def test_reward_is_fraction_matching_target():
    env = relay.parallel_env(n_agents=4, n_symbols=3, switch_prob=0.0)
    env.reset(seed=1)
    tgt = env.target
    other = (tgt + 1) % 3
    for n_match in range(5):
        acts = {a: (tgt if i < n_match else other) for i, a in enumerate(env.possible_agents)}
        _, rew, term, trunc, _ = env.step(acts)
        assert set(rew) == set(env.possible_agents)
        assert all(r == pytest.approx(n_match / 4) for r in rew.values())
        assert not any(term.values()) and not any(trunc.values())


def test_reward_uses_target_in_effect_when_acting():
    env = relay.parallel_env(n_agents=2, n_symbols=3, switch_prob=1.0)
    env.reset(seed=5)
    for _ in range(10):
        tgt = env.target
        _, rew, *_ = env.step({a: tgt for a in env.agents})
        assert rew["agent_0"] == 1.0
        assert env.target_history[-1] == tgt


def test_truncation_after_max_cycles():
    env = relay.parallel_env(max_cycles=7)
    env.reset(seed=0)
    for t in range(7):
        _, _, term, trunc, _ = env.step({a: 0 for a in env.agents})
        assert not any(term.values())
        assert all(trunc.values()) == (t == 6)
    assert env.agents == []


def _target_sequence(seed: int, switch_prob: float = 0.4) -> list[int]:
    env = relay.parallel_env(n_symbols=5, switch_prob=switch_prob, max_cycles=40)
    env.reset(seed=seed)
    while env.agents:
        env.step({a: 0 for a in env.agents})
    return list(env.target_history)


def test_same_seed_same_target_sequence():
    a, b = _target_sequence(7), _target_sequence(7)
    assert a == b and len(a) == 40
    assert len(set(a)) > 1  # it actually switches
    assert _target_sequence(8) != a


# ---------------------------------------------------------- ground truth
def test_influence_lags_chain():
    env = relay.parallel_env(topology="chain", n_agents=4)
    lags = env.influence_lags()
    assert lags[("agent_0", "agent_3")] == 3
    assert lags[("agent_0", "agent_1")] == 1
    assert lags[("agent_1", "agent_3")] == 2
    assert ("agent_3", "agent_0") not in lags
    assert ("agent_0", "agent_0") not in lags
    assert len(lags) == 6
    assert env.dependency_graph == {
        "edges": [("agent_0", "agent_1", 1), ("agent_1", "agent_2", 1), ("agent_2", "agent_3", 1)]
    }
    assert env.sources == ["agent_0"]


def test_influence_lags_star_and_edges():
    star = relay.parallel_env(topology="star", n_agents=4)
    assert star.influence_lags() == {("agent_0", f"agent_{i}"): 1 for i in range(1, 4)}
    g = relay.parallel_env(topology="edges", n_agents=4, edges=[[0, 1], [1, 2], [0, 2], [2, 3]])
    lags = g.influence_lags()
    assert lags[("agent_0", "agent_2")] == 1  # shortest path, not via agent_1
    assert lags[("agent_0", "agent_3")] == 2
    assert ("agent_2", "agent_1") not in lags


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"topology": "ring"}, "unknown topology"),
        ({"topology": "edges"}, "edges="),
        ({"topology": "chain", "edges": [[0, 1]]}, "topology='edges'"),
        ({"topology": "edges", "n_agents": 3, "edges": [[0, 3]]}, "out of range"),
        ({"topology": "edges", "n_agents": 3, "edges": [[-1, 2]]}, "out of range"),
        ({"topology": "edges", "n_agents": 3, "edges": [[1, 1]]}, "self loop"),
        ({"topology": "edges", "n_agents": 3, "edges": [[0, 1], [0, 1]]}, "duplicate"),
        ({"topology": "edges", "n_agents": 3, "edges": [[0, 1, 2]]}, "pair"),
        ({"topology": "edges", "n_agents": 2, "edges": [[0, 1], [1, 0]]}, "no source"),
        ({"n_symbols": 1}, "n_symbols"),
        ({"switch_prob": 1.5}, "switch_prob"),
        ({"render_mode": "video"}, "render_mode"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        relay.parallel_env(**kwargs)


def test_bad_actions_raise():
    env = relay.parallel_env(n_symbols=3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="missing"):
        env.step({"agent_0": 0})
    with pytest.raises(ValueError, match="invalid action"):
        env.step({a: 3 for a in env.agents})


# --------------------------------------------------------------- render
def test_rgb_render():
    env = relay.parallel_env(n_agents=3, n_symbols=3, render_mode="rgb_array")
    env.reset(seed=0)
    img0 = env.render()
    assert img0.ndim == 3 and img0.shape[2] == 3 and img0.dtype == np.uint8
    env.step({"agent_0": 0, "agent_1": 1, "agent_2": 2})
    img1 = env.render()
    assert img1.shape == img0.shape and img1.dtype == np.uint8
    assert not np.array_equal(img0, img1)  # squares got coloured
    assert relay.parallel_env(render_mode="ansi").render().startswith("t=0")


# ------------------------------------------------------------- policies
def _optimal_policy(env, obs):
    k = env.n_symbols
    acts = {}
    for a in env.agents:
        o = obs[a]
        if a in env.sources:
            acts[a] = int(np.argmax(o))  # the target one-hot
        else:
            first = o[:k]  # copy the first in-neighbour's last symbol
            acts[a] = int(np.argmax(first)) if first.any() else 0
    return acts


def _mean_reward(policy: str, topology: str, episodes: int = 20) -> float:
    env = relay.parallel_env(topology=topology, n_agents=4, n_symbols=3, switch_prob=0.1, max_cycles=25)
    rng = np.random.default_rng(123)
    total, steps = 0.0, 0
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        while env.agents:
            if policy == "optimal":
                acts = _optimal_policy(env, obs)
            else:
                acts = {a: int(rng.integers(3)) for a in env.agents}
            obs, rew, *_ = env.step(acts)
            total += rew["agent_0"]
            steps += 1
    return total / steps


@pytest.mark.parametrize("topology, floor", [("chain", 0.7), ("star", 0.85)])
def test_optimal_policy_beats_random(topology, floor):
    opt = _mean_reward("optimal", topology)
    rnd = _mean_reward("random", topology)
    assert abs(rnd - 1 / 3) < 0.06, rnd
    assert opt > floor, opt
    assert opt - rnd > 0.35, (opt, rnd)


def test_a_shared_group_gets_feature_names_only_where_its_agents_name_their_features_alike():
    """The source reads its target where the others read a neighbour: agent_0's names would mislabel the rest."""
    from madistill.envs.factory import EnvSpec
    from madistill.envs.vector import MultiAgentVecEnv

    spec = EnvSpec("envs.relay.parallel_env", {"n_agents": 3})
    with MultiAgentVecEnv(spec, 1, num_workers=0) as venv:
        assert venv.feature_names == {"agent": None}
    with MultiAgentVecEnv(spec, 1, num_workers=0, grouping="per_agent") as venv:
        assert venv.feature_names["agent_0"] == ["target=sym0", "target=sym1", "target=sym2"]
        assert venv.feature_names["agent_2"] == ["in:agent_1=sym0", "in:agent_1=sym1", "in:agent_1=sym2"]
