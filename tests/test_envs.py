"""Env layer: factory, grouping, the vector env (shapes, workers, seeds, early termination, NaN policy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv

from envs import relay
from madistill.envs import EnvSpec, MultiAgentVecEnv, group_agents, make_env
from madistill.envs.groups import check_supported, flatten_obs
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies import MLPPolicy, TeamPolicy
from madistill.rollout import Rollout
from madistill.teacher import MaskedRolloutBuffer, TeacherTrainer

SPREAD = "mpe2.simple_spread_v3.parallel_env"
SPEAKER = "mpe2.simple_speaker_listener_v4.parallel_env"
ADVERSARY = "mpe2.simple_adversary_v3.parallel_env"


# ------------------------------------------------------------------ a tiny custom env
class ToyEnv(ParallelEnv):
    """Two agents; ``walker_0`` terminates at step ``term_at`` (or is truncated there, ``early_end="truncated"``)
    and ``walker_1`` is truncated at ``trunc_at``.

    Observation of agent k at step t: ``arange(size) + 1 + 10 k + 100 t`` in the given shape (never zero,
    so absorbing zero padding is recognisable). Rewards: 1.0 for walker_0, 0.5 for walker_1 per step.
    ``nan_at=t`` puts a NaN into walker_0's observation at step t.
    """

    metadata = {"name": "toy_v0", "is_parallelizable": True, "render_modes": []}

    def __init__(self, term_at: int = 2, trunc_at: int = 5, obs_shape=(2,), nan_at: int | None = None,
                 early_end: str = "terminated"):
        self.possible_agents = ["walker_0", "walker_1"]
        self.agents: list[str] = []
        self.term_at = {"walker_0": term_at, "walker_1": None}
        self.trunc_at = trunc_at
        self.obs_shape = tuple(obs_shape)
        self.nan_at = nan_at
        self.early_end = early_end
        self.rewards = {"walker_0": 1.0, "walker_1": 0.5}
        self._obs_space = spaces.Box(-np.inf, np.inf, shape=self.obs_shape, dtype=np.float32)
        self._act_space = spaces.Discrete(2)
        self.t = 0

    def observation_space(self, agent):
        return self._obs_space

    def action_space(self, agent):
        return self._act_space

    def obs_of(self, agent: str, t: int) -> np.ndarray:
        k = self.possible_agents.index(agent)
        size = int(np.prod(self.obs_shape))
        o = (np.arange(size, dtype=np.float32) + 1 + 10 * k + 100 * t).reshape(self.obs_shape)
        if self.nan_at is not None and t == self.nan_at and k == 0:
            o.flat[0] = np.nan
        return o

    def reset(self, seed=None, options=None):
        self.t = 0
        self.agents = list(self.possible_agents)
        return {a: self.obs_of(a, 0) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        assert set(actions) == set(self.agents), (actions, self.agents)
        self.t += 1
        rew = {a: self.rewards[a] for a in self.agents}
        ends = {a: self.term_at[a] == self.t for a in self.agents}
        term = {a: ends[a] and self.early_end == "terminated" for a in self.agents}
        trunc = {a: (self.t >= self.trunc_at or ends[a]) and not term[a] for a in self.agents}
        obs = {a: self.obs_of(a, self.t) for a in self.agents}
        infos = {a: {} for a in self.agents}
        self.agents = [a for a in self.agents if not (term[a] or trunc[a])]
        return obs, rew, term, trunc, infos


TOY = f"{__name__}.ToyEnv"


class EchoEnv(ParallelEnv):
    """Box actions; each agent observes the action it was given one step before, read from the reference
    the env kept (as envs with action-rate penalties do). ``echo_1`` joins the episode at step ``join_at``."""

    metadata = {"name": "echo_v0", "is_parallelizable": True, "render_modes": []}

    def __init__(self, join_at: int = 0, max_cycles: int = 6):
        self.possible_agents = ["echo_0", "echo_1"]
        self.join_at, self.max_cycles = join_at, max_cycles
        self._space = spaces.Box(-10, 10, shape=(2,), dtype=np.float32)

    def observation_space(self, agent):
        return self._space

    def action_space(self, agent):
        return self._space

    def _present(self) -> list[str]:
        return [a for a in self.possible_agents if a == "echo_0" or self.t >= self.join_at]

    def reset(self, seed=None, options=None):
        self.t, self.kept = 0, {}
        self.agents = self._present()
        return {a: np.full(2, -1, np.float32) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        end = self.t >= self.max_cycles
        self.agents = self._present()
        obs = {a: np.asarray(self.kept.get(a, np.full(2, -1)), np.float32).copy() for a in self.agents}
        self.kept.update(actions)  # keeps the arrays it was given, not copies
        flags = {a: False for a in self.agents}
        if end:
            self.agents = []
        return obs, {a: 0.0 for a in obs}, flags, {a: end for a in obs}, {a: {} for a in obs}


def _zeros(venv: MultiAgentVecEnv) -> dict[str, np.ndarray]:
    return {g.name: np.zeros((venv.num_envs, g.n_agents), dtype=np.int64) for g in venv.groups}


# ------------------------------------------------------------------ factory and groups
@pytest.mark.parametrize(
    "target, kwargs, expected",
    [
        (SPREAD, {"N": 3}, [("agent", ("agent_0", "agent_1", "agent_2"), 18, 5)]),
        (SPEAKER, {}, [("speaker", ("speaker_0",), 3, 3), ("listener", ("listener_0",), 11, 5)]),
        (
            ADVERSARY,
            {"N": 2},
            [("adversary", ("adversary_0",), 8, 5), ("agent", ("agent_0", "agent_1"), 10, 5)],
        ),
        (
            "envs.relay.parallel_env",
            {"n_agents": 4},
            [("agent", ("agent_0", "agent_1", "agent_2", "agent_3"), 3, 3)],
        ),
        # an AEC factory is converted to a parallel env
        ("mpe2.simple_spread_v3.env", {"N": 3}, [("agent", ("agent_0", "agent_1", "agent_2"), 18, 5)]),
        # a module exposing parallel_env()
        ("mpe2.simple_spread_v3", {"N": 3}, [("agent", ("agent_0", "agent_1", "agent_2"), 18, 5)]),
    ],
)
def test_make_env_and_auto_groups(target, kwargs, expected):
    spec = EnvSpec(target, kwargs)
    env = make_env(spec)
    assert isinstance(env, ParallelEnv)
    groups = group_agents(env)
    got = [(g.name, g.agents, g.obs_dim, g.action_space.n) for g in groups]
    assert got == expected
    assert all(g.discrete for g in groups)
    env.close()


def test_env_spec_id_and_round_trip():
    assert EnvSpec(SPREAD).id == "simple_spread_v3"
    assert EnvSpec("mpe2.simple_spread_v3.env").id == "simple_spread_v3"
    assert EnvSpec(SPREAD, name="mine").id == "mine"
    spec = EnvSpec(SPEAKER, {"max_cycles": 7})
    back = EnvSpec.from_dict(spec.to_dict())
    assert (
        back.target == SPEAKER
        and back.kwargs == {"max_cycles": 7}
        and back.id == "simple_speaker_listener_v4"
    )


def test_aec_target_steps_like_the_parallel_env():
    """``mpe2.simple_spread_v3.env`` (AEC) converted to parallel gives the same trajectories."""
    rng = np.random.default_rng(0)
    with (
        MultiAgentVecEnv(EnvSpec("mpe2.simple_spread_v3.env", {"N": 3, "max_cycles": 6}), 2) as a,
        MultiAgentVecEnv(EnvSpec(SPREAD, {"N": 3, "max_cycles": 6}), 2) as p,
    ):
        oa, _ = a.reset(seed=3)
        op, _ = p.reset(seed=3)
        np.testing.assert_array_equal(oa["agent"], op["agent"])
        for _ in range(8):
            act = {"agent": rng.integers(0, 5, size=(2, 3))}
            ra, rp = a.step(act), p.step(act)
            np.testing.assert_array_equal(ra.obs["agent"], rp.obs["agent"])
            np.testing.assert_array_equal(ra.rewards["agent"], rp.rewards["agent"])
            assert ra.episodes == rp.episodes


def _same_steps(ours: ParallelEnv, theirs: ParallelEnv, episodes: int) -> int:
    """Step both envs with the same random actions; assert every returned dict is equal. Returns steps run."""
    def same(x: dict, y: dict) -> bool:
        return set(x) == set(y) and all(x[k] == y[k] if isinstance(x[k], dict) else np.array_equal(x[k], y[k]) for k in x)

    steps = 0
    for ep in range(episodes):
        assert all(same(x, y) for x, y in zip(ours.reset(seed=ep), theirs.reset(seed=ep), strict=True))
        for a in theirs.possible_agents:
            theirs.action_space(a).seed(ep)
        while theirs.agents:
            act = {a: theirs.action_space(a).sample() for a in theirs.agents}
            assert all(same(x, y) for x, y in zip(ours.step(act), theirs.step(act), strict=True))
            assert ours.agents == theirs.agents
            steps += 1
    return steps


@pytest.mark.parametrize("module", ["simple_spread_v3", "simple_speaker_listener_v4", "simple_adversary_v3"])
@pytest.mark.parametrize("continuous", [False, True])
def test_aec_cycle_conversion_matches_pettingzoo(module, continuous):
    """madistill's AEC->parallel driver returns exactly what PettingZoo's ``aec_to_parallel`` returns, and passes
    PettingZoo's parallel API test; mpe2's ``parallel_env`` is routed through it."""
    import importlib

    from pettingzoo.test import parallel_api_test
    from pettingzoo.utils.conversions import aec_to_parallel

    from madistill.envs.aec_cycle import AECCycleParallelEnv

    mod = importlib.import_module(f"mpe2.{module}")
    kwargs = {"max_cycles": 7, "continuous_actions": continuous}
    ours = make_env(EnvSpec(f"mpe2.{module}.parallel_env", kwargs))
    assert isinstance(ours, AECCycleParallelEnv)
    assert _same_steps(ours, aec_to_parallel(mod.env(**kwargs)), episodes=3) == 21
    parallel_api_test(make_env(EnvSpec(f"mpe2.{module}.env", kwargs)), num_cycles=20)


def test_an_aec_env_built_from_a_parallel_one_is_used_as_that_parallel_env():
    """``envs.relay.env`` is PettingZoo's parallel_to_aec around the relay env: unwrapped, as PettingZoo's own
    conversion does, instead of converted there and back."""
    assert isinstance(make_env(EnvSpec("envs.relay.env")), relay.RelayEnv)


def test_aec_cycle_conversion_with_agents_leaving_and_a_stateful_wrapper():
    """Agents that terminate mid-episode take their dead steps as in PettingZoo's conversion; a wrapper that
    keeps its own rewards is read through, not skipped."""
    from pettingzoo.utils.conversions import aec_to_parallel, parallel_to_aec
    from pettingzoo.utils.wrappers import BaseWrapper

    from madistill.envs.aec_cycle import AECCycleParallelEnv

    assert _same_steps(AECCycleParallelEnv(parallel_to_aec(ToyEnv())), aec_to_parallel(parallel_to_aec(ToyEnv())), 2) == 10

    class DoubleRewards(BaseWrapper):
        @property
        def rewards(self):
            return {a: 2 * r for a, r in self.env.rewards.items()}

    ours = AECCycleParallelEnv(DoubleRewards(parallel_to_aec(ToyEnv())))
    ours.reset(seed=0)
    assert ours.step({"walker_0": 0, "walker_1": 0})[1] == {"walker_0": 2.0, "walker_1": 1.0}


def test_make_env_errors_name_the_fix():
    with pytest.raises(MadistillError, match="env.target"):
        make_env(EnvSpec("mpe2.simple_spread_v3.no_such_factory"))
    with pytest.raises(MadistillError, match="cannot import env target"):
        make_env(EnvSpec("no_such_module_xyz.parallel_env"))
    with pytest.raises(MadistillError, match="rejected its arguments"):
        make_env(EnvSpec(SPREAD, {"not_a_kwarg": 1}))


def test_per_agent_grouping():
    env = make_env(EnvSpec(SPREAD, {"N": 3}))
    groups = group_agents(env, "per_agent")
    assert [g.agents for g in groups] == [("agent_0",), ("agent_1",), ("agent_2",)]
    assert len({g.name for g in groups}) == 3
    with MultiAgentVecEnv(EnvSpec(SPREAD, {"N": 3}), 2, grouping="per_agent") as venv:
        obs, active = venv.reset(seed=0)
        assert len(obs) == 3 and venv.group_names == [g.name for g in groups]
        assert all(o.shape == (2, 1, 18) for o in obs.values())
        assert all(a.shape == (2, 1) and a.all() for a in active.values())
    with pytest.raises(MadistillError, match="grouping"):
        group_agents(env, "by_colour")


def test_per_agent_group_names_are_agent_ids():
    groups = group_agents(make_env(EnvSpec(SPREAD, {"N": 3})), "per_agent")
    assert [g.name for g in groups] == ["agent_0", "agent_1", "agent_2"]


@pytest.mark.parametrize(
    "target, kwargs, shapes",
    [
        (SPEAKER, {}, {"speaker": (1, 3), "listener": (1, 11)}),
        (SPREAD, {"N": 3}, {"agent": (3, 18)}),
        (ADVERSARY, {"N": 2}, {"adversary": (1, 8), "agent": (2, 10)}),
    ],
)
def test_vec_env_shapes(target, kwargs, shapes):
    n = 3
    with MultiAgentVecEnv(EnvSpec(target, kwargs), n) as venv:
        assert venv.group_names == list(shapes)
        obs, active = venv.reset(seed=0)
        for g, (k, d) in shapes.items():
            assert obs[g].shape == (n, k, d) and obs[g].dtype == np.float32
            assert active[g].shape == (n, k) and active[g].dtype == bool and active[g].all()
        res = venv.step(_zeros(venv))
        for g, (k, d) in shapes.items():
            assert res.obs[g].shape == res.final_obs[g].shape == (n, k, d)
            for arr in (res.rewards, res.terminated, res.truncated, res.active, res.dones):
                assert arr[g].shape == (n, k)
            assert not res.final_obs[g].any()  # nobody's episode ended
        # copies differ (different episode seeds), the first observation is the env's own
        first = next(iter(shapes))
        assert not np.array_equal(obs[first][0], obs[first][1])


def test_workers_match_in_process_stepping():
    """num_workers=0 and num_workers=2 (uneven split 2+1) give identical results for the same seed/actions."""
    spec = EnvSpec(SPEAKER, {"max_cycles": 10})
    rng = np.random.default_rng(1)
    actions = [
        {"speaker": rng.integers(0, 3, size=(3, 1)), "listener": rng.integers(0, 5, size=(3, 1))}
        for _ in range(25)
    ]
    with (
        MultiAgentVecEnv(spec, 3, num_workers=0) as local,
        MultiAgentVecEnv(spec, 3, num_workers=2) as workers,
    ):
        assert len(workers._procs) == 2  # really uses worker processes
        ol, al = local.reset(seed=5)
        ow, aw = workers.reset(seed=5)
        for g in ol:
            np.testing.assert_array_equal(ol[g], ow[g])
            np.testing.assert_array_equal(al[g], aw[g])
        n_episodes = 0
        for act in actions:
            rl, rw = local.step(act), workers.step(act)
            for field in ("obs", "rewards", "terminated", "truncated", "final_obs", "active"):
                for g in ol:
                    np.testing.assert_array_equal(getattr(rl, field)[g], getattr(rw, field)[g], err_msg=field)
            assert sorted(rl.episodes, key=lambda e: e.seed) == sorted(rw.episodes, key=lambda e: e.seed)
            n_episodes += len(rl.episodes)
        assert n_episodes == 6  # two resets of each of the three copies in 25 steps of 10-step episodes


@pytest.mark.parametrize("workers", [0, 1])
def test_kept_results_survive_later_steps(workers):
    """Steps exchange data through one reused (shared) buffer; what a caller keeps must not change under it."""
    spec = EnvSpec(SPREAD, {"N": 3, "max_cycles": 5})
    with MultiAgentVecEnv(spec, 2, num_workers=workers) as venv:
        obs, active = venv.reset(seed=0)
        kept_obs, kept_active = obs["agent"].copy(), active["agent"].copy()
        first = venv.step({"agent": np.full((2, 3), 1)})
        snapshot = {f: getattr(first, f)["agent"].copy() for f in ("obs", "rewards", "active", "truncated")}
        for k in range(9):  # crosses an episode end: resets and final observations overwrite the buffer
            venv.step({"agent": np.full((2, 3), k % 5)})
        np.testing.assert_array_equal(obs["agent"], kept_obs)
        np.testing.assert_array_equal(active["agent"], kept_active)
        for f, before in snapshot.items():
            np.testing.assert_array_equal(getattr(first, f)["agent"], before, err_msg=f)
        assert not np.array_equal(first.obs["agent"], venv.step({"agent": np.zeros((2, 3), int)}).obs["agent"])


@pytest.mark.parametrize("workers", [0, 1])
def test_an_env_that_keeps_its_actions_keeps_them_unchanged(workers):
    with MultiAgentVecEnv(EnvSpec(f"{__name__}.EchoEnv"), 2, num_workers=workers) as venv:
        venv.reset(seed=0)
        for k in range(1, 4):
            res = venv.step({"echo": np.full((2, 2, 2), float(k))})
            np.testing.assert_array_equal(res.obs["echo"], np.full((2, 2, 2), float(k - 1) if k > 1 else -1.0))


def test_an_agent_joining_mid_episode_is_observed_and_active_from_its_first_step():
    with MultiAgentVecEnv(EnvSpec(f"{__name__}.EchoEnv", {"join_at": 2}), 1) as venv:
        _, active = venv.reset(seed=0)
        assert active["echo"].tolist() == [[True, False]]
        res = venv.step({"echo": np.zeros((1, 2, 2))})
        assert res.active["echo"].tolist() == [[True, False]]
        res = venv.step({"echo": np.ones((1, 2, 2))})  # echo_1 joins here
        assert res.active["echo"].tolist() == [[True, True]]
        np.testing.assert_array_equal(res.obs["echo"][0, 1], [-1, -1])  # its own first observation


@pytest.mark.parametrize("actions, match", [
    (np.zeros((3, 1), np.int64), r"'speaker' needs actions of shape \(2, 1\)"),
    (np.zeros((2, 1, 1), np.int64), r"'speaker' needs actions of shape \(2, 1\)"),
    (np.full((2, 1), 0.7), "'speaker' has Discrete actions: give integers"),
    (np.full((2, 1), 3), r"'speaker': actions must be in 0..2, got 3..3"),
    (None, "'speaker' needs actions .* got no actions"),
])
def test_malformed_actions_are_a_one_line_error_naming_the_group(actions, match):
    with MultiAgentVecEnv(EnvSpec(SPEAKER), 2) as venv:
        venv.reset(seed=0)
        step = {"listener": np.zeros((2, 1), np.int64)} | ({} if actions is None else {"speaker": actions})
        with pytest.raises(MadistillError, match=match):
            venv.step(step)


@pytest.mark.parametrize("obs_space, act_space, match", [
    (spaces.Dict({"x": spaces.Discrete(2)}), spaces.Discrete(2), "cannot flatten"),
    (spaces.Box(0, 1, (2,)), spaces.MultiDiscrete([2, 2]), "supports Discrete and Box actions"),
    (spaces.Box(0, 1, (2,)), spaces.Discrete(3, start=1), "Discrete actions start at 0"),
])
def test_unsupported_spaces_fail_early_naming_the_fix(obs_space, act_space, match):
    with pytest.raises(MadistillError, match=match):
        check_supported("a_0", obs_space, act_space)


def test_episode_seeds_are_seed_plus_copy_plus_k_times_n():
    n, seed, cycles = 3, 7, 4
    kwargs = {"n_agents": 3, "n_symbols": 8, "max_cycles": cycles, "switch_prob": 0.0}
    expected_obs = {}
    for s in range(seed, seed + 3 * n):
        o, _ = relay.parallel_env(**kwargs).reset(seed=s)
        expected_obs[s] = o["agent_0"]  # the source sees the seed-dependent target
    assert len({tuple(v) for v in expected_obs.values()}) > 2  # the check below can tell seeds apart

    with MultiAgentVecEnv(EnvSpec("envs.relay.parallel_env", kwargs), n, num_workers=2) as venv:
        obs, _ = venv.reset(seed=seed)
        for i in range(n):
            np.testing.assert_array_equal(obs["agent"][i, 0], expected_obs[seed + i])
        assert venv.episode_seeds.tolist() == [seed + i for i in range(n)]
        seeds_seen = []
        for step in range(1, 2 * cycles + 1):
            res = venv.step(_zeros(venv))
            assert venv.episode_seeds.tolist() == [seed + i + step // cycles * n for i in range(n)]
            if step % cycles:
                assert res.episodes == []
                continue
            k = step // cycles
            got = sorted(e.seed for e in res.episodes)
            assert got == [seed + i + (k - 1) * n for i in range(n)]
            assert all(e.length == cycles for e in res.episodes)
            seeds_seen += got
            for i in range(n):  # after the auto-reset copy i plays episode seed + i + k * n
                np.testing.assert_array_equal(res.obs["agent"][i, 0], expected_obs[seed + i + k * n])
        assert seeds_seen == list(range(seed, seed + 2 * n))


# ------------------------------------------------------------------ early termination
@pytest.mark.parametrize("num_workers", [0, 2])
def test_early_termination_absorbing_obs_and_flags(num_workers):
    toy = ToyEnv()
    with MultiAgentVecEnv(EnvSpec(TOY), 2, num_workers=num_workers) as venv:
        assert venv.group_names == ["walker"]
        obs, active = venv.reset(seed=0)
        np.testing.assert_array_equal(obs["walker"][:, 0], np.stack([toy.obs_of("walker_0", 0)] * 2))
        assert active["walker"].all()
        act = _zeros(venv)

        r1 = venv.step(act)
        np.testing.assert_array_equal(r1.rewards["walker"], [[1.0, 0.5]] * 2)
        assert not r1.terminated["walker"].any() and r1.active["walker"].all()

        r2 = venv.step(act)  # walker_0 terminates here
        np.testing.assert_array_equal(r2.terminated["walker"], [[True, False]] * 2)
        assert not r2.truncated["walker"].any()
        np.testing.assert_array_equal(r2.active["walker"], [[False, True]] * 2)
        assert not r2.obs["walker"][:, 0].any()  # absorbing zero observation
        np.testing.assert_array_equal(r2.obs["walker"][:, 1], np.stack([toy.obs_of("walker_1", 2)] * 2))
        np.testing.assert_array_equal(r2.final_obs["walker"][:, 0], np.stack([toy.obs_of("walker_0", 2)] * 2))
        assert not r2.final_obs["walker"][:, 1].any()
        assert r2.episodes == []

        for _ in (3, 4):
            r = venv.step(act)
            np.testing.assert_array_equal(r.rewards["walker"], [[0.0, 0.5]] * 2)
            np.testing.assert_array_equal(r.active["walker"], [[False, True]] * 2)
            assert not r.terminated["walker"].any() and not r.truncated["walker"].any()
            assert not r.obs["walker"][:, 0].any()

        r5 = venv.step(act)  # walker_1 hits the time limit: the episode ends and the copies reset
        np.testing.assert_array_equal(r5.truncated["walker"], [[False, True]] * 2)
        assert not r5.terminated["walker"].any()
        np.testing.assert_array_equal(r5.final_obs["walker"][:, 1], np.stack([toy.obs_of("walker_1", 5)] * 2))
        assert r5.active["walker"].all()
        np.testing.assert_array_equal(r5.obs["walker"][:, 0], np.stack([toy.obs_of("walker_0", 0)] * 2))
        recs = sorted(r5.episodes, key=lambda e: e.seed)
        assert [e.seed for e in recs] == [0, 1]
        for e in recs:
            assert e.length == 5
            assert e.agent_returns == {"walker_0": 2.0, "walker_1": 2.5}
            assert e.team_return == pytest.approx(2.25)


@pytest.mark.parametrize("fast_update", [True, False])
def test_teacher_buffer_masks_steps_of_terminated_agents(make_cfg, monkeypatch, tmp_path, fast_update):
    """PPO never trains on the absorbing padding of an agent that terminated early, in the fast update and in
    SB3's own ``train()`` (both flatten the rollout with ``prepare`` and gather minibatches with ``samples``)."""
    cfg = make_cfg(
        "env=custom",
        f"env.target={TOY}",
        "env.name=toy",
        "teacher.normalize_obs=false",
        "teacher.ppo.n_steps=10",
        "teacher.ppo.batch_size=8",
        "teacher.ppo.n_epochs=1",
        f"teacher.ppo.fast_update={str(fast_update).lower()}",
        "teacher.total_agent_steps=40",
        "logger.tensorboard=false",
    )
    seen: dict[str, list] = {"valid": [], "obs": []}
    orig_prepare, orig_samples = MaskedRolloutBuffer.prepare, MaskedRolloutBuffer.samples

    def prepare(self):
        if not self.generator_ready:
            seen["valid"].append(self.valid.copy())
        orig_prepare(self)

    def samples(self, rows):
        batch = orig_samples(self, rows)
        seen["obs"].append(batch.observations.detach().cpu().numpy())
        return batch

    monkeypatch.setattr(MaskedRolloutBuffer, "prepare", prepare)
    monkeypatch.setattr(MaskedRolloutBuffer, "samples", samples)
    from madistill.runtime import env_spec, make_vec_env

    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv:
        trainer = TeacherTrainer(cfg, venv, spec, torch.device("cpu"), None)
        trainer.train(tmp_path)
    assert trainer.agent_steps == 40  # 10 steps x 2 copies x 2 agents
    assert len(seen["valid"]) == 1
    valid = seen["valid"][0]
    # columns: copy i, agent j -> i * 2 + j; walker_0 acts on steps 0, 1 of each 5-step episode
    t = np.arange(10)
    expected = np.stack([t % 5 < 2, np.ones(10, bool), t % 5 < 2, np.ones(10, bool)], axis=1)
    np.testing.assert_array_equal(valid, expected)
    sampled = np.concatenate(seen["obs"])
    assert sampled.shape == (28, 2)  # exactly the 2 copies x 2 episodes x (2 + 5) live agent-steps
    assert (np.abs(sampled).sum(1) > 0).all()  # no absorbing zero observation reaches PPO


# ------------------------------------------------------------------ spaces and observations
def test_box_observation_2x3_is_flattened_to_6():
    toy = ToyEnv(obs_shape=(2, 3))
    env_groups = group_agents(toy)
    assert env_groups[0].obs_dim == 6
    with MultiAgentVecEnv(EnvSpec(TOY, {"obs_shape": [2, 3]}), 2) as venv:
        obs, _ = venv.reset(seed=0)
        assert obs["walker"].shape == (2, 2, 6)
        np.testing.assert_array_equal(obs["walker"][1, 1], toy.obs_of("walker_1", 0).reshape(-1))
        res = venv.step(_zeros(venv))
        np.testing.assert_array_equal(res.obs["walker"][0, 0], toy.obs_of("walker_0", 1).reshape(-1))
    np.testing.assert_array_equal(
        flatten_obs(toy.observation_space("walker_0"), toy.obs_of("walker_0", 3)),
        toy.obs_of("walker_0", 3).reshape(-1),
    )


@pytest.mark.parametrize("num_workers", [0, 1])
def test_nan_observation_is_an_error_naming_nan_policy(num_workers):
    with MultiAgentVecEnv(EnvSpec(TOY, {"nan_at": 2}), 2, num_workers=num_workers) as venv:
        venv.reset(seed=0)
        venv.step(_zeros(venv))
        with pytest.raises(MadistillError, match="nan_policy") as info:
            venv.step(_zeros(venv))
        assert "walker_0" in str(info.value) and "episode step 2" in str(info.value)
    with (
        MultiAgentVecEnv(EnvSpec(TOY, {"nan_at": 0}), 1) as venv,
        pytest.raises(MadistillError, match="nan_policy"),
    ):
        venv.reset(seed=0)


def test_nan_policy_zero_replaces_non_finite_values():
    toy = ToyEnv(nan_at=2)
    with MultiAgentVecEnv(EnvSpec(TOY, {"nan_at": 2}), 2, nan_policy="zero") as venv:
        venv.reset(seed=0)
        venv.step(_zeros(venv))
        res = venv.step(_zeros(venv))  # walker_0 terminates with a NaN in its final observation
        expected = toy.obs_of("walker_0", 2)
        expected[0] = 0.0
        assert np.isfinite(res.final_obs["walker"]).all()
        np.testing.assert_array_equal(res.final_obs["walker"][:, 0], np.stack([expected] * 2))
    with MultiAgentVecEnv(EnvSpec(TOY, {"nan_at": 0}), 1, nan_policy="zero") as venv:
        obs, _ = venv.reset(seed=0)
        np.testing.assert_array_equal(obs["walker"][0, 0], [0.0, 2.0])


def test_continuous_actions_are_clipped_into_the_box():
    spec = EnvSpec(SPREAD, {"N": 3, "continuous_actions": True, "max_cycles": 10})
    with MultiAgentVecEnv(spec, 2) as venv:
        (g,) = venv.groups
        assert isinstance(g.action_space, spaces.Box) and g.act_dim == 5 and not g.discrete
        torch.manual_seed(0)
        policy = MLPPolicy(g, {"hidden_sizes": [8], "activation": "tanh"})
        with torch.no_grad():
            policy._log_std.fill_(2.0)  # std ~7: samples far outside [0, 1]
        team = TeamPolicy(venv.groups, {g.name: policy}, {g.name: ObsNormalizer(g.obs_dim, enabled=False)})
        sent = []
        orig_step = venv.step
        venv.step = lambda actions: (sent.append(actions), orig_step(actions))[1]
        rollout = Rollout(venv, team, seed=0)
        pre = [rollout.step().actions["agent"].numpy() for _ in range(5)]
    pre_all = np.stack(pre)
    env_all = np.stack([a["agent"] for a in sent])
    assert pre_all.shape == env_all.shape == (5, 2, 3, 5)
    assert (pre_all < 0).any() and (pre_all > 1).any()
    assert env_all.dtype == np.float32
    assert env_all.min() >= 0.0 and env_all.max() <= 1.0
    np.testing.assert_allclose(env_all, np.clip(pre_all, 0.0, 1.0))


# ------------------------------------------------------------------ the project's envs
@pytest.mark.parametrize("target, kwargs", [
    ("envs.duel.parallel_env", {"n": 1, "max_cycles": 3}),
    ("envs.pixels.parallel_env", {"n_agents": 2, "size": 8, "square": 2, "max_cycles": 3}),
    ("envs.relay.parallel_env", {"n_agents": 3, "max_cycles": 3}),
])
def test_project_envs_end_by_truncation_after_max_cycles(target, kwargs):
    """Every project env runs max_cycles steps, nobody terminates, everyone is truncated on the last step with
    empty infos, and the ended episode has no live agents (the shared ``envs.steps.truncating_step``)."""
    from pettingzoo.test import parallel_api_test

    from envs.steps import truncating_step

    parallel_api_test(make_env(EnvSpec(target, kwargs)), num_cycles=10)
    env = make_env(EnvSpec(target, kwargs))
    env.reset(seed=0)
    agents = list(env.possible_agents)
    for t in range(3):
        _, rewards, terms, truncs, infos = env.step({a: 0 for a in env.agents})
        assert sorted(rewards) == sorted(agents) and not any(terms.values()) and infos == {a: {} for a in agents}
        assert all(truncs.values()) == (t == 2) and any(truncs.values()) == (t == 2)
    assert env.agents == []

    class Stub:
        agents = ["a", "b"]

    stub = Stub()
    assert truncating_step(stub, {"a": 1}, {"a": 0.5}, False) == (
        {"a": 1}, {"a": 0.5}, {"a": False, "b": False}, {"a": False, "b": False}, {"a": {}, "b": {}})
    assert stub.agents == ["a", "b"]
    assert truncating_step(stub, {}, {}, True)[3] == {"a": True, "b": True} and stub.agents == []


@pytest.mark.parametrize("target", ["os.system", "shutil.rmtree", "os.removedirs"])
def test_a_target_that_is_no_env_factory_is_refused_before_it_is_called(tmp_path, target):
    """A saved policy's manifest names its env's target and arguments: loading it calls env factories only."""
    victim = tmp_path / "victim"
    victim.mkdir()
    kwargs = {"command": f"touch {tmp_path / 'called'}"} if target == "os.system" else {"path": str(victim)}
    with pytest.raises(MadistillError, match=f"env target '{target}' is no PettingZoo env factory"):
        make_env(EnvSpec(target, kwargs))
    assert victim.is_dir() and not (tmp_path / "called").exists()
