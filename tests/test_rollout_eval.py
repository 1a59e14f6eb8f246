"""Rollout and evaluation: seeds, determinism, the random reference, greedy vs sampled actions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from madistill.attacks.transform import AttackTransform
from madistill.cascade.faults import AttackFault
from madistill.envs import EnvSpec, MultiAgentVecEnv
from madistill.evaluate.evaluator import episode_copies, run_episodes, uniform_team
from madistill.normalize import ObsNormalizer
from madistill.policies import SB3Policy, TeamPolicy
from madistill.rollout import Rollout
from madistill.transforms import ObsTransform

SPREAD = EnvSpec(
    "mpe2.simple_spread_v3.parallel_env", {"N": 3, "max_cycles": 25, "continuous_actions": False}
)
SPEAKER = EnvSpec(
    "mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 25, "continuous_actions": False}
)


def _sb3_team(venv: MultiAgentVecEnv, seed: int = 0) -> TeamPolicy:
    torch.manual_seed(seed)
    policies = {
        g.name: SB3Policy.from_arch(g, {"hidden_sizes": [16], "activation": "tanh"}) for g in venv.groups
    }
    with torch.no_grad():  # SB3 initialises the action head near zero: make the policy opinionated
        for p in policies.values():
            p.sb3.action_net.weight.mul_(100.0)
    return TeamPolicy(
        venv.groups, policies, {g.name: ObsNormalizer(g.obs_dim, enabled=False) for g in venv.groups}
    )


@pytest.fixture(scope="module")
def spread():
    with MultiAgentVecEnv(SPREAD, 2) as venv:
        yield venv


def _returns(records) -> list[float]:
    return [r.team_return for r in records]


@pytest.mark.parametrize("episodes, num_envs", [(5, 2), (3, 4), (1, 1)])
def test_run_episodes_returns_exactly_the_requested_seeds_in_order(episodes, num_envs):
    with MultiAgentVecEnv(SPEAKER, num_envs) as venv:
        recs = run_episodes(venv, uniform_team(venv), episodes, seed=100, deterministic=False)
    assert [r.seed for r in recs] == list(range(100, 100 + episodes))
    assert all(r.length == 25 for r in recs)
    assert all(set(r.agent_returns) == {"speaker_0", "listener_0"} for r in recs)


@pytest.mark.parametrize("deterministic", [True, False])
def test_same_seed_same_records_different_seed_different_records(spread, deterministic):
    team = _sb3_team(spread)
    a = run_episodes(spread, team, 4, seed=11, deterministic=deterministic)
    b = run_episodes(spread, team, 4, seed=11, deterministic=deterministic)
    assert a == b  # dataclass equality: seeds, lengths and every agent return, exactly
    c = run_episodes(spread, team, 4, seed=12, deterministic=deterministic)
    assert [r.seed for r in c] == [12, 13, 14, 15]
    assert _returns(c) != _returns(a)
    # an overlapping seed (12..14) is the same episode, whichever copy played it
    if deterministic:
        assert {r.seed: r for r in a}[12] == {r.seed: r for r in c}[12]


def test_records_do_not_depend_on_workers():
    """Stochastic evaluation gives the same records in-process and with 2 worker processes."""
    with (
        MultiAgentVecEnv(SPEAKER, 3, num_workers=0) as local,
        MultiAgentVecEnv(SPEAKER, 3, num_workers=2) as workers,
    ):
        team = _sb3_team(local)
        a = run_episodes(local, team, 5, seed=3, deterministic=False)
        b = run_episodes(workers, team, 5, seed=3, deterministic=False)
    assert a == b


@pytest.mark.parametrize("continuous", [False, True])
def test_sampled_evaluation_does_not_depend_on_the_number_of_copies(continuous):
    """Each episode samples from its own stream (seeded by its episode seed): 1, 2 or 5 copies play the same
    episodes; the random team too. Discrete and Box actions."""
    spec = EnvSpec(SPREAD.target, {**SPREAD.kwargs, "max_cycles": 10, "continuous_actions": continuous})
    records = []
    for n in (1, 2, 5):
        with MultiAgentVecEnv(spec, n) as venv:
            team = _sb3_team(venv)
            records.append((run_episodes(venv, team, 5, seed=7, deterministic=False, episode_streams=True),
                            run_episodes(venv, uniform_team(venv), 5, seed=7, deterministic=False, episode_streams=True)))
    def returns(recs):
        return [x for team_recs in recs for r in team_recs for x in (r.seed, r.length, r.team_return)]

    for other in records[1:]:  # Box actions: batched float32 matmuls differ in the last bits across batch sizes
        assert returns(other) == pytest.approx(returns(records[0]), rel=1e-5) if continuous else other == records[0]
    assert records[0][0] != records[0][1]  # the two teams do play differently


def test_uniform_team_on_spread_is_in_the_random_range(spread):
    recs = run_episodes(spread, uniform_team(spread), 20, seed=0, deterministic=False)
    team_returns = np.array(_returns(recs))
    assert -60.0 < team_returns.mean() < -10.0
    assert team_returns.std() > 0.5  # random episodes vary
    # spread's reward is shared: every agent gets the same return up to the collision penalty
    for r in recs:
        assert r.team_return == pytest.approx(np.mean(list(r.agent_returns.values())))


def test_sampled_actions_differ_from_greedy_actions(spread):
    team = _sb3_team(spread)
    greedy = run_episodes(spread, team, 4, seed=0, deterministic=True)
    sampled = run_episodes(spread, team, 4, seed=0, deterministic=False)
    assert [r.seed for r in greedy] == [r.seed for r in sampled]
    assert _returns(greedy) != _returns(sampled)


def test_greedy_rollout_takes_the_argmax_action(spread):
    team = _sb3_team(spread)
    rollout = Rollout(spread, team, deterministic=True, seed=0)
    for _ in range(3):
        tr = rollout.step()
        logits = team["agent"](tr.obs["agent"].reshape(-1, 18))
        assert torch.equal(tr.actions["agent"].reshape(-1), logits.argmax(-1))


def test_rollout_run_steps_counts_and_episode_records(spread):
    team = uniform_team(spread)
    rollout = Rollout(spread, team, seed=0)
    seen = []
    recs = rollout.run(steps=30, on_step=lambda tr: seen.append(tr.result.episodes))
    assert rollout.steps == 30 and len(seen) == 30
    # two copies, 25-step episodes: both finish at step 25 with seeds 0 and 1
    assert sorted(r.seed for r in recs) == [0, 1]
    assert [len(e) for e in seen].index(2) == 24
    with pytest.raises(ValueError):
        rollout.run()


class _SharedDraws(ObsTransform):
    """A transform that says it draws from the rollout's shared stream (and changes nothing)."""

    shared_stream = True

    def __call__(self, obs, ctx):
        return obs


@pytest.mark.parametrize("continuous", [False, True])
def test_batched_runs_play_all_their_episodes_at_once_where_no_draw_depends_on_the_copy_count(continuous, monkeypatch):
    """On the batched backend, greedy runs and runs sampling from per-episode streams play all their episodes at
    once (never on fewer copies than the env has), with the records the PettingZoo backend gives at its copy
    count; a run drawing from the stream the copies share keeps the env's copies, as does PettingZoo."""
    spec = EnvSpec(SPREAD.target, {**SPREAD.kwargs, "max_cycles": 10, "continuous_actions": continuous})
    with MultiAgentVecEnv(spec, 4, backend="pettingzoo") as pz, MultiAgentVecEnv(spec, 4, backend="batched") as bt:
        assert episode_copies(bt, 9, own_streams=True) == 9
        assert episode_copies(bt, 2, own_streams=True) == 4
        assert episode_copies(bt, 9, own_streams=False) == 4  # sampled actions from the stream the copies share
        assert episode_copies(bt, 9, own_streams=True, transforms=[_SharedDraws()]) == 4
        assert episode_copies(pz, 9, own_streams=True) == 4
        assert AttackTransform.shared_stream and AttackFault.shared_stream
        team = _sb3_team(pz)
        widened = []
        with_copies = bt.with_copies
        monkeypatch.setattr(bt, "with_copies", lambda n: widened.append(n) or with_copies(n))
        for deterministic, streams in ((True, False), (False, True)):
            batched = run_episodes(bt, team, 9, 5, deterministic, episode_streams=streams)
            assert batched == run_episodes(pz, team, 9, 5, deterministic, episode_streams=streams)
        assert widened == [9, 9]
        run_episodes(bt, team, 9, 5, deterministic=False)
        assert widened == [9, 9]


@pytest.mark.parametrize("copies", [1, 37])
@pytest.mark.parametrize("kind", ["categorical", "normal", "uniform"])
def test_per_copy_streams_draw_what_torch_draws_for_each_copy_alone(kind, copies):
    """``sample`` with one generator per copy fills the whole batch's noise in place, then does the arithmetic once:
    each copy's actions are still exactly torch's own draws for its own distribution from its stream alone
    (``torch.multinomial``, ``randn``, ``rand``), over several steps of the same streams, and one generator gives
    what it gives the whole batch."""
    from torch.distributions import Categorical, Independent, Normal, Uniform

    from madistill.policies.base import sample

    agents = 3
    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(copies * agents, 5, generator=g)
    mean, std = torch.randn(copies * agents, 2, generator=g), torch.rand(copies * agents, 2, generator=g) + 0.1
    low, high = -torch.ones(copies * agents, 2), torch.full((copies * agents, 2), 3.0)
    dist = {"categorical": Categorical(logits=logits), "normal": Normal(mean, std),
            "uniform": Independent(Uniform(low, high), 1)}[kind]

    def alone(rows: slice, stream: torch.Generator, copy: bool) -> torch.Tensor:
        """torch's draw for ``rows``: a copy's own Categorical of its rows, or the batch's distribution."""
        if kind == "categorical":
            probs = Categorical(logits=dist.logits[rows]).probs if copy else dist.probs[rows]
            return torch.multinomial(probs, 1, generator=stream)[:, 0]
        if kind == "normal":
            return mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=stream)
        return low[rows] + (high[rows] - low[rows]) * torch.rand(low[rows].shape, generator=stream)

    streams = [torch.Generator().manual_seed(100 + i) for i in range(copies)]
    ours = [torch.Generator().manual_seed(100 + i) for i in range(copies)]
    drawn = torch.stack([sample(dist, ours) for _ in range(4)])
    expected = torch.stack([torch.cat([alone(slice(i * agents, (i + 1) * agents), s, True)
                                       for i, s in enumerate(streams)]) for _ in range(4)])
    assert torch.equal(drawn, expected)
    assert len({tuple(d.flatten().tolist()) for d in drawn}) > 1  # the streams advance from step to step
    whole = torch.Generator().manual_seed(7)
    assert torch.equal(sample(dist, torch.Generator().manual_seed(7)), alone(slice(None), whole, False))


def test_sampling_non_finite_probabilities_is_an_error():
    """NaN logits (a diverged policy) stop sampling, as torch.multinomial did, rather than picking an action."""
    from torch.distributions import Categorical

    from madistill.policies.base import sample

    logits = torch.zeros(6, 4)
    logits[4, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        sample(Categorical(logits=logits, validate_args=False), [torch.Generator() for _ in range(3)])
