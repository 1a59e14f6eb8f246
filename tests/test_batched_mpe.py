"""The batched mpe2 backend (madistill/envs/batched): bit for bit mpe2's parallel_env, step by step, over
seeds, policies that force collisions and early ends, both action types, every modelled argument; the
vector env's contract (auto-reset, final observations, episode seeds and records); backend selection; a
saved policy evaluates to the same numbers under both backends."""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import tiny
from mpe2._mpe_utils.core import Landmark

from madistill.envs import EnvSpec, MultiAgentVecEnv
from madistill.envs.batched import PORTS, choose_backend
from madistill.envs.episodes import EpisodeRecord
from madistill.errors import MadistillError

# (mpe2 module, constructor arguments): every port, and each argument it models away from its default
CASES = [
    ("mpe2.simple_spread_v3", {}),
    ("mpe2.simple_spread_v3", {"N": 4, "local_ratio": 0.2, "max_cycles": 9}),
    ("mpe2.simple_spread_v3", {"N": 2, "curriculum": True, "max_cycles": 40}),
    ("mpe2.simple_spread_v3", {"terminate_on_success": True, "max_cycles": 60}),
    ("mpe2.simple_speaker_listener_v4", {}),
    ("mpe2.simple_speaker_listener_v4", {"max_cycles": 7, "dynamic_rescaling": False, "benchmark_data": True}),
    ("mpe2.simple_reference_v3", {}),
    ("mpe2.simple_reference_v3", {"local_ratio": 0.9, "max_cycles": 11}),
    ("mpe2.simple_adversary_v3", {}),
    ("mpe2.simple_adversary_v3", {"N": 3, "max_cycles": 9}),
    ("mpe2.simple_world_comm_v3", {}),
    ("mpe2.simple_world_comm_v3", {"num_good": 3, "num_adversaries": 2, "num_obstacles": 2, "num_food": 3,
                                   "num_forests": 1, "max_cycles": 13}),
]
COPIES = 4
STEPS = 70


# ------------------------------------------------------------------ action policies (they see mpe2's world)
def _toward(world: Any, agent: Any, target: np.ndarray, continuous: bool, rng: np.random.Generator) -> Any:
    """The action that moves ``agent`` toward ``target``, braking for its velocity so it settles there (plus
    a random word where it speaks)."""
    d = target - agent.state.p_pos - 0.4 * agent.state.p_vel
    if continuous:
        move = np.zeros(5, dtype=np.float32)
        move[[2 if d[0] > 0 else 1, 4 if d[1] > 0 else 3]] = np.minimum(np.abs(d) * 3, 1)
        words = rng.uniform(0, 1, 0 if agent.silent else world.dim_c).astype(np.float32)
        return np.concatenate([move, words])
    axis = int(np.argmax(np.abs(d)))
    move = 0 if np.abs(d).max() < 0.03 else (2 if d[0] > 0 else 1) if axis == 0 else (4 if d[1] > 0 else 3)
    return move if agent.silent else move + 5 * int(rng.integers(world.dim_c))


def random_policy(env: Any, rng: np.random.Generator, continuous: bool) -> dict[str, Any]:
    """Uniform actions; Box actions reach past [0, 1] so mpe2's clipping is compared too."""
    if continuous:
        return {a: rng.uniform(-0.3, 1.3, env.action_space(a).shape).astype(np.float32) for a in env.agents}
    return {a: int(rng.integers(env.action_space(a).n)) for a in env.agents}


def chase_policy(env: Any, rng: np.random.Generator, continuous: bool) -> dict[str, Any]:
    """Every agent runs at agent 0 (agent 0 at agent 1): agents pile up and collide."""
    world = env.unwrapped.world
    agents = world.agents
    out = {}
    for i, agent in enumerate(agents):
        if not agent.movable:
            out[agent.name] = random_policy(env, rng, continuous)[agent.name]
            continue
        out[agent.name] = _toward(world, agent, agents[1 if i == 0 else 0].state.p_pos, continuous, rng)
    return out


def seek_policy(env: Any, rng: np.random.Generator, continuous: bool) -> dict[str, Any]:
    """Every mover heads for a landmark: the scenario's goal where it has one, else (spread) agent i for
    landmark i, so spread's terminate_on_success ends episodes early."""
    world = env.unwrapped.world
    out = {}
    for i, agent in enumerate(world.agents):
        if not agent.movable:
            out[agent.name] = random_policy(env, rng, continuous)[agent.name]
            continue
        goal = getattr(world.agents[0], "_goal_b", None) or getattr(agent, "_goal_a", None)
        if not isinstance(goal, Landmark):
            goal = world.landmarks[i % len(world.landmarks)]
        out[agent.name] = _toward(world, agent, goal.state.p_pos, continuous, rng)
    return out


POLICIES = {"random": random_policy, "chase": chase_policy, "seek": seek_policy}


# ------------------------------------------------------------------ the reference: mpe2's own parallel_env
class Reference:
    """``COPIES`` mpe2 parallel envs with the vector env's episode seeds (copy i plays seeds seed + i + k * n)."""

    def __init__(self, module: str, kwargs: dict[str, Any], seed: int):
        factory = importlib.import_module(module).parallel_env
        self.envs = [factory(**kwargs) for _ in range(COPIES)]
        self.seed = seed
        self.episode = [0] * COPIES
        self.obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)]
        self.length = [0] * COPIES
        self.returns = [dict.fromkeys(self.envs[0].possible_agents, 0.0) for _ in range(COPIES)]
        self.collisions = 0

    def step(self, actions: list[dict[str, Any]]) -> tuple[list[Any], list[EpisodeRecord]]:
        """Step every copy; (per copy: obs, rewards, terminations, truncations, final obs or None), finished episodes."""
        out, finished = [], []
        for i, env in enumerate(self.envs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obs, rew, term, trunc, _ = env.step(actions[i])
            world = env.unwrapped.world
            movers = [a for a in world.agents if a.collide]
            self.collisions += sum(
                np.sqrt(np.sum(np.square(a.state.p_pos - b.state.p_pos))) < a.size + b.size
                for k, a in enumerate(movers) for b in movers[k + 1:])
            self.length[i] += 1
            for a, r in rew.items():
                self.returns[i][a] += float(np.float32(r))
            final = None
            if not env.agents:
                final = obs
                finished.append(EpisodeRecord(self.seed + i + self.episode[i] * COPIES, self.length[i],
                                              dict(self.returns[i])))
                self.episode[i] += 1
                obs, _ = env.reset(seed=self.seed + i + self.episode[i] * COPIES)
                self.length[i] = 0
                self.returns[i] = dict.fromkeys(env.possible_agents, 0.0)
            self.obs[i] = obs
            out.append((obs, rew, term, trunc, final))
        return out, finished


def _slot_value(venv: MultiAgentVecEnv, arrays: dict[str, np.ndarray], i: int, agent: str) -> np.ndarray:
    for g in venv.groups:
        if agent in g.agents:
            return arrays[g.name][i, g.agents.index(agent)]
    raise KeyError(agent)


def _to_groups(venv: MultiAgentVecEnv, actions: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {g.name: np.array([[actions[i][a] for a in g.agents] for i in range(COPIES)]) for g in venv.groups}


def _assert_same(venv: MultiAgentVecEnv, ref: Reference, policy: Callable[..., dict[str, Any]], continuous: bool,
                 seed: int) -> tuple[int, int, int]:
    """Step both for STEPS steps; everything bit for bit. Returns (episodes, terminated episodes, collisions)."""
    rng = np.random.default_rng(seed)
    obs, active = venv.reset(seed)
    agents = ref.envs[0].possible_agents
    for i in range(COPIES):
        for a in agents:
            assert np.array_equal(_slot_value(venv, obs, i, a), ref.obs[i][a]), ("reset", i, a)
    episodes = terminated = 0
    for t in range(STEPS):
        actions = [policy(env, rng, continuous) for env in ref.envs]
        res = venv.step(_to_groups(venv, actions))
        expected, finished = ref.step(actions)
        assert res.episodes == finished, t
        assert np.array_equal(venv.episode_seeds, [ref.seed + i + ref.episode[i] * COPIES for i in range(COPIES)])
        for i, (o, r, te, tr, final) in enumerate(expected):
            for a in agents:
                where = (t, i, a)
                assert np.array_equal(_slot_value(venv, res.obs, i, a), o[a]), where
                assert _slot_value(venv, res.rewards, i, a) == np.float32(r[a]), where
                assert bool(_slot_value(venv, res.terminated, i, a)) == te[a], where
                assert bool(_slot_value(venv, res.truncated, i, a)) == (tr[a] and not te[a]), where
                assert _slot_value(venv, res.active, i, a)
                want_final = final[a] if final is not None else np.zeros_like(o[a])
                assert np.array_equal(_slot_value(venv, res.final_obs, i, a), want_final), where
            terminated += final is not None and all(te.values())
        episodes += len(finished)
    return episodes, terminated, ref.collisions


@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{m.split('.')[-1]}-{k}" for m, k in CASES])
def test_batched_backend_matches_mpe2_bit_for_bit(case, policy, continuous):
    module, kwargs = CASES[case]
    kwargs = {**kwargs, "continuous_actions": continuous}
    seed = 1000 * case + 100 * sorted(POLICIES).index(policy) + 10 * continuous
    spec = EnvSpec(f"{module}.parallel_env", kwargs)
    with MultiAgentVecEnv(spec, COPIES, backend="batched") as venv:
        assert venv.backend == "batched"
        episodes, terminated, collisions = _assert_same(venv, Reference(module, kwargs, seed), POLICIES[policy],
                                                        continuous, seed)
    assert episodes >= COPIES  # every copy auto-reset at least once
    if policy == "chase" and ("spread" in module or "world_comm" in module):
        assert collisions > 0  # the contact forces and collision penalties were exercised
    if policy == "seek" and kwargs.get("terminate_on_success"):
        assert terminated > 0  # episodes ended by termination, not only by the time limit


@pytest.mark.parametrize("module", sorted(PORTS))
def test_workers_and_copy_layout_do_not_change_the_batched_numbers(module):
    """Copies split over worker processes step to the same numbers as in one process, and as PettingZoo."""
    spec = EnvSpec(f"{module}.parallel_env", {"max_cycles": 6})
    runs = []
    for backend, workers in (("pettingzoo", 0), ("batched", 0), ("batched", 2)):
        rng = np.random.default_rng(5)
        with MultiAgentVecEnv(spec, 5, num_workers=workers, backend=backend) as venv:
            steps = [venv.reset(7)]
            for _ in range(15):
                res = venv.step({g.name: rng.integers(0, g.action_space.n, (5, g.n_agents)) for g in venv.groups})
                steps.append((res.obs, res.rewards, res.final_obs, res.truncated, res.episodes, venv.episode_seeds))
        runs.append(steps)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            for x, y in zip(a, b):
                if isinstance(x, dict):
                    assert all(np.array_equal(x[g], y[g]) for g in x)
                else:
                    assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y


# ------------------------------------------------------------------ selection
def test_auto_picks_the_port_where_one_models_the_env_and_pettingzoo_otherwise():
    spread = EnvSpec("mpe2.simple_spread_v3.parallel_env", {"N": 3})
    assert choose_backend(spread, "auto") == "batched"
    assert choose_backend(EnvSpec("mpe2.simple_spread_v3", {}), "auto") == "batched"
    assert choose_backend(EnvSpec("mpe2.simple_speaker_listener_v4.env", {}), "auto") == "batched"
    assert choose_backend(spread, "pettingzoo") == "pettingzoo"
    assert choose_backend(spread, "auto", render_mode="rgb_array") == "pettingzoo"  # the port does not render
    assert choose_backend(EnvSpec("mpe2.simple_spread_v3", {"num_agent_neighbors": 1}), "auto") == "pettingzoo"
    assert choose_backend(EnvSpec("mpe2.simple_spread_v3", {"num_agent_neighbors": None}), "auto") == "batched"
    assert choose_backend(EnvSpec("mpe2.simple_spread_v3.raw_env", {}), "auto") == "pettingzoo"  # no clipping
    assert choose_backend(EnvSpec("mpe2.simple_tag_v3.parallel_env", {}), "auto") == "pettingzoo"
    assert choose_backend(EnvSpec("envs.relay.parallel_env", {}), "auto") == "pettingzoo"


@pytest.mark.parametrize(("spec", "backend", "needle"), [
    (EnvSpec("envs.relay.parallel_env", {}, name="relay"), "batched", "no batched port"),
    (EnvSpec("mpe2.simple_spread_v3", {"num_landmark_neighbors": 2}), "batched", "num_landmark_neighbors"),
])
def test_a_backend_that_cannot_be_honoured_is_a_one_line_error(spec, backend, needle):
    with pytest.raises(MadistillError) as e:
        MultiAgentVecEnv(spec, 2, backend=backend)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    if backend == "batched":
        assert all(m.split(".")[-1] in msg for m in PORTS) or "does not model" in msg
        assert "env.backend=pettingzoo" in msg


@pytest.mark.parametrize(("env", "backend", "workers"), [
    ("simple_spread_v3", "auto", 0), ("simple_spread_v3", "pettingzoo", 2), ("relay", "auto", 2)])
def test_the_default_worker_count_follows_the_backend(env, backend, workers):
    """env.num_workers unset: the batched port steps in-process, PettingZoo copies over two worker processes;
    a number set by the user is kept for either backend."""
    from madistill.cli import compose_config
    from madistill.runtime import make_vec_env

    cfg = compose_config([f"env={env}", f"env.backend={backend}", "env.num_envs=4"])
    assert cfg.env.num_workers is None
    with make_vec_env(cfg.env) as venv:
        assert venv.num_workers == workers and len(venv._procs) == workers
    with make_vec_env(cfg.env, num_workers=1) as venv:
        assert venv.num_workers == 1 and len(venv._procs) == 1


def test_cli_refuses_batched_for_an_env_without_a_port(cli, tmp_path):
    rc, _, err = cli("train", "env=relay", "env.backend=batched", f"hydra.run.dir={tmp_path}", *tiny())
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("madistill train: error: env.backend=batched") and "simple_spread_v3" in lines[0]
    assert not (tmp_path / "policies").exists()


def test_a_saved_policy_evaluates_to_the_same_numbers_under_both_backends(cli, tmp_path):
    train = tmp_path / "train"
    rc, _, err = cli("train", "env=simple_spread_v3", f"hydra.run.dir={train}",
                     *tiny("teacher.total_agent_steps=600", "env.backend=pettingzoo"))
    assert rc == 0, err
    reports = {}
    for backend in ("pettingzoo", "batched"):
        for mode in ("greedy", "sampled"):
            out = tmp_path / f"{backend}-{mode}"
            extra = ["eval.deterministic=false", "eval.episode_streams=true"] if mode == "sampled" else []
            rc, _, err = cli("evaluate", f"eval.policy={train}", f"hydra.run.dir={out}", "logger=quiet",
                             "eval.episodes=6", "eval.n_boot=200", "env.num_envs=4", "env.num_workers=0",
                             f"env.backend={backend}", *extra)
            assert rc == 0, err
            reports[backend, mode] = [json.loads((out / "reports" / f"eval_{n}.json").read_text())
                                      for n in ("teacher", "random")]
    for mode in ("greedy", "sampled"):
        a, b = reports["pettingzoo", mode], reports["batched", mode]
        for x, y in zip(a, b):
            assert x["episodes"] == y["episodes"] and x["summary"] == y["summary"]
    # the numbers are real episodes: spread's returns are negative and differ between episodes
    returns = [e["team_return"] for e in reports["batched", "greedy"][0]["episodes"]]
    assert max(returns) < 0 and len(set(returns)) > 1


# ------------------------------------------------------------------ seeded reset draws for many seeds at once
def test_batched_seeding_reproduces_numpys_generator():
    from madistill.envs.batched.seeding import bounded, pcg64_outputs, uniform

    seeds = [0, 1, 7, 12345, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 7, 2**63 - 1, 2**63, 2**64 - 1]
    seeds += np.random.default_rng(0).integers(0, 2**62, 200).tolist()
    out = pcg64_outputs(np.array(seeds, dtype=np.uint64), 11)
    for seed, o in zip(seeds, out):
        bits = np.random.PCG64(np.random.SeedSequence(seed))
        assert np.array_equal(o, [bits.random_raw() for _ in range(11)]), seed
        g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
        first = [int(g.integers(3)), int(g.integers(3))]  # the two 32-bit halves of output 0
        halves = np.array([[o[0] & 0xFFFFFFFF, o[0] >> 32]], dtype=np.uint64)
        values, rejected = bounded(halves, 3)
        assert values[0].tolist() == first and not rejected.any()
        assert np.array_equal(uniform(o[1:], -1, 1), g.uniform(-1, 1, 10)), seed
    # Lemire's method rejects a product whose low word is below (2**32 - n) % n: numpy would draw again
    assert bounded(np.array([0, 1], dtype=np.uint64), 3)[1].tolist() == [True, False]


@pytest.mark.parametrize("module", ["mpe2.simple_adversary_v3", "mpe2.simple_reference_v3", "mpe2.simple_speaker_listener_v4"])
def test_copies_whose_draws_are_left_to_numpy_start_the_same_episodes(module, monkeypatch):
    """Copies whose bounded goal draw is rejected take numpy's own generator: the same starts as mpe2."""
    import madistill.envs.batched.scenario as scenario

    spec = EnvSpec(f"{module}.parallel_env", {})
    with MultiAgentVecEnv(spec, 6, backend="batched") as venv:
        fast = venv.reset(40)[0]
    monkeypatch.setattr(scenario, "pcg64_outputs", lambda seeds, n: np.zeros((len(seeds), n), dtype=np.uint64))
    monkeypatch.setattr(scenario, "bounded", lambda words, n: (np.zeros(words.shape, dtype=np.int64),
                                                               np.ones(words.shape, dtype=bool)))
    with MultiAgentVecEnv(spec, 6, backend="batched") as venv:
        slow = venv.reset(40)[0]
    with MultiAgentVecEnv(spec, 6, backend="pettingzoo") as venv:
        ref = venv.reset(40)[0]
    for g in ref:
        assert np.array_equal(slow[g], ref[g]) and np.array_equal(fast[g], ref[g])


def test_training_with_either_backend_gives_the_same_teachers(cli, tmp_path):
    """Same env numbers, so the same PPO updates: the saved weights are equal byte for byte."""
    weights = {}
    for backend in ("pettingzoo", "batched"):
        out = tmp_path / backend
        rc, _, err = cli("train", "env=simple_speaker_listener_v4", f"hydra.run.dir={out}",
                         *tiny("teacher.total_agent_steps=600", f"env.backend={backend}"))
        assert rc == 0, err
        weights[backend] = {p.name: p.read_bytes() for p in (out / "policies" / "teacher").glob("*.safetensors")}
    assert sorted(weights["batched"]) == ["listener.safetensors", "speaker.safetensors"]
    assert weights["batched"] == weights["pettingzoo"]
