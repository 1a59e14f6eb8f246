"""Paired runs, deviation, influence and cascade structure on relay envs with a known dependency graph."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from cascade_helpers import copy_team, mlp_team, relay_spec, venv_maker
from omegaconf import OmegaConf

from madistill.cascade.faults import FaultEnv, make_fault
from madistill.cascade.measures import Cascade, cascade, deviation_summary, influence, precision_recall
from madistill.cascade.paired import check_reproducible, paired_rollouts
from madistill.config import FaultConfig
from madistill.envs.factory import make_env
from madistill.envs.features import feature_layouts
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError

EPISODES = 12


def setup(spec):
    make = venv_maker(spec)
    with make(1, 1) as venv:
        env = FaultEnv(venv.groups, feature_layouts(venv.groups, {}, venv.feature_names))
        return make, copy_team(venv), env, list(venv.possible_agents)


def impulse(env: FaultEnv, victim: str, onset: int, name: str = "random", **kw: object):
    fc = OmegaConf.merge(OmegaConf.structured(FaultConfig), {"name": name, "victims": [victim], "onset": onset, **kw})
    return make_fault(fc, env)


def test_vector_env_seed_period_pairs_copies():
    with MultiAgentVecEnv(relay_spec(n_agents=2, max_cycles=3), 4, seed_period=2) as venv:
        venv.reset(5)
        assert venv.episode_seeds.tolist() == [5, 6, 5, 6]
        for _ in range(3):
            venv.step({"agent": np.zeros((4, 2), dtype=np.int64)})
        assert venv.episode_seeds.tolist() == [7, 8, 7, 8]
    with pytest.raises(ValueError, match="seed_period must divide"):
        MultiAgentVecEnv(relay_spec(n_agents=2), 4, seed_period=3)


def test_paired_runs_are_identical_before_the_onset_and_clean_vs_clean_is_null():
    make, team, env, agents = setup(relay_spec(n_agents=4, switch_prob=0.3))
    run = paired_rollouts(make, team, [None, impulse(env, "agent_0", 4, "stuck", duration=None)], EPISODES, 50)
    assert np.nansum(run.tv[0]) == 0 and np.nansum(run.kl[0]) == 0 and np.nansum(run.disagree[0]) == 0
    assert np.array_equal(run.returns[0], run.returns[1])
    assert (run.onsets[1] == 4).all()
    before = run.tv[1][:, :5]  # the stuck action acts from step 5 (at 4 it is the chosen one)
    assert np.nansum(before) == 0 and np.nansum(run.disagree[1][:, :5]) == 0
    assert np.nansum(run.tv[1][:, 5:]) > 0
    clean = influence(paired_rollouts(make, team, [None] * 4, EPISODES, 50), agents, 4, n_boot=100)
    assert all(k is None for row in clean.first_lag().values() for k in row.values())
    assert np.nanmax(clean.effect) == 0


@pytest.mark.parametrize("kwargs", [
    {"n_agents": 4, "topology": "chain"},
    {"n_agents": 4, "topology": "star"},
    {"n_agents": 5, "topology": "edges", "edges": [[0, 1], [0, 2], [2, 3], [3, 1]]},
])
def test_first_lag_recovers_the_relay_influence_lags(kwargs):
    spec = relay_spec(**kwargs)
    make, team, env, agents = setup(spec)
    sources = [a for a in agents for _ in (2, 5)]
    run = paired_rollouts(make, team, [impulse(env, a, o) for a in agents for o in (2, 5)], EPISODES, 100)
    inf = influence(run, sources, 4, n_boot=200)
    truth = make_env(spec).unwrapped.influence_lags()
    first = inf.first_lag()
    for s in agents:
        for d in agents:
            if s != d:
                assert first[s][d] == truth.get((s, d)), (s, d)
    assert precision_recall(first, truth) == {"precision": 1.0, "recall": 1.0, "lag_exact": 1.0}
    assert sorted(map(tuple, inf.edges())) == sorted((s, d, 1) for (s, d), k in truth.items() if k == 1)
    unreachable = [(agents.index(s), agents.index(d)) for s in agents for d in agents if s != d and (s, d) not in truth]
    assert all(np.nanmax(inf.effect[i, j]) == 0 for i, j in unreachable)  # exactly 0, not merely insignificant


def test_an_impulse_on_an_agent_without_out_edges_changes_nobody():
    make, team, env, agents = setup(relay_spec(n_agents=4, topology="chain"))
    run = paired_rollouts(make, team, [impulse(env, "agent_3", 3, "dead")], EPISODES, 7)
    others = [agents.index(a) for a in agents if a != "agent_3"]
    assert np.nansum(run.tv[0][..., others]) == 0 and np.nansum(run.disagree[0][..., others]) == 0
    c = cascade(run, 0, ["agent_3"], 0.1)
    assert (c.sizes == 0).all()


def test_cascade_structure_on_a_chain_follows_the_hops():
    make, team, env, agents = setup(relay_spec(n_agents=4, topology="chain"))
    fc = OmegaConf.merge(OmegaConf.structured(FaultConfig),
                         {"name": "constant", "victims": ["agent_0"], "onset": 3, "duration": None, "action": [1]})
    run = paired_rollouts(make, team, [make_fault(fc, env)], EPISODES, 11)
    edges = [["agent_0", "agent_1", 1], ["agent_1", "agent_2", 1], ["agent_2", "agent_3", 1]]
    c = cascade(run, 0, ["agent_0"], 0.1, edges)
    assert c.depth == {"agent_1": 1, "agent_2": 2, "agent_3": 3}
    hit = c.failed.all(1)  # episodes where the target is not 1: every downstream agent fails, one hop a step
    assert hit.sum() >= 3
    assert (c.delays[hit] == [1, 2, 3]).all()
    assert all(c.order(e) == ["agent_1", "agent_2", "agent_3"] for e in np.flatnonzero(hit))
    s = c.summary(n_boot=100)
    assert s["size_histogram"][3] == hit.sum() and s["agents"]["agent_2"]["median_delay"] == 2.0
    dev = deviation_summary(run, 0, ["agent_0"])
    assert dev["agents"]["agent_1"]["tv"][3] == 0 and dev["agents"]["agent_1"]["tv"][4] > 0


def test_a_paired_run_in_rounds_gives_the_numbers_of_one_run():
    # sampled actions, a random env, drawn onsets, an intermittent fault and an independent clean twin: every draw
    # comes from its episode's own streams, so 11 episodes in rounds of 4 (3 measured in the last) change nothing
    make, team, env, agents = setup(relay_spec(n_agents=4, switch_prob=0.3))
    faults = lambda: [impulse(env, "agent_0", 2, onset_max=6), None,  # noqa: E731 - fresh faults for each run
                      impulse(env, "agent_1", 1, "dead", duration=None, rate=0.5)]
    once = paired_rollouts(make, team, faults(), 11, 40, independent=True)
    rounds = paired_rollouts(make, team, faults(), 11, 40, independent=True, max_copies=4 * 5)
    assert once.seeds.tolist() == rounds.seeds.tolist() == list(range(40, 51))
    assert len(np.unique(once.onsets[0])) > 1 and np.nanmax(once.tv) > 0
    for name in ("onsets", "tv", "kl", "disagree", "reward_delta", "returns", "lengths"):
        assert np.array_equal(getattr(once, name), getattr(rounds, name), equal_nan=True), name
    shared = impulse(env, "agent_0", 2)
    shared.shared_stream = True  # as fault=attack's random starts: the copies' common stream
    with pytest.raises(MadistillError, match=r"2 blocks x 11 episodes = 22 env copies exceed cascade.max_copies=20, "
                                             r"and fault 'random' draws from a stream all copies share.*play at most 10 "
                                             "episodes or raise cascade.max_copies"):
        paired_rollouts(make, team, [shared], 11, 40, max_copies=20)


def test_a_non_reproducible_env_is_refused_in_one_line():
    spec = relay_spec(n_agents=3)
    make, team, _, _ = setup(spec)
    check_reproducible(make, team, 3, 0, "relay")  # the relay env is reproducible
    # twins whose logits differ by rounding alone (as a matrix kernel rounds batch rows by position) are the same
    with make(1, 1) as venv:
        rounded = mlp_team(venv, [16])
    for group in rounded.groups:
        policy, forward = rounded[group.name], rounded[group.name].forward
        def nudged(x: torch.Tensor, f=forward) -> torch.Tensor:  # logit k of row i moved by 1e-6 * i * k
            y = f(x)
            return y + 1e-6 * torch.arange(len(x), dtype=y.dtype)[:, None] * torch.arange(y.shape[-1], dtype=y.dtype)

        policy.forward = nudged
    run = check_reproducible(make, rounded, 1, 0, "relay")
    assert 0 < np.nanmax(run.tv) <= 1e-5
    bad = type(spec)("cascade_helpers.UnseededRelay", spec.kwargs, name="unseeded")
    # the unseeded twins draw their target from 3 symbols and agree by chance with probability 1/3 per episode:
    # 24 episodes leave (1/3)^24 for a false pass
    with pytest.raises(MadistillError) as err:
        check_reproducible(venv_maker(bad), team, 24, 0, "unseeded")
    assert "not reproducible from its seed" in str(err.value) and "\n" not in str(err.value)


def test_box_twins_whose_means_differ_by_rounding_alone_are_reproducible():
    """With Box actions the rounding of a batch row moves the sampled action itself, so the twins' rewards differ
    in their last bits: still the same episode."""
    from madistill.envs.factory import EnvSpec

    spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 10, "continuous_actions": True},
                   name="sl")
    make = venv_maker(spec)
    with make(1, 1) as venv:
        team = mlp_team(venv, [16])
    for group in team.groups:
        policy, forward = team[group.name], team[group.name].forward
        def nudged(x: torch.Tensor, f=forward) -> torch.Tensor:  # the mean of row i moved by 1e-7 * i
            y = f(x)
            return y + 1e-7 * torch.arange(len(x), dtype=y.dtype)[:, None]

        policy.forward = nudged
    run = check_reproducible(make, team, 3, 0, "sl")
    assert 0 < np.nanmax(np.abs(run.reward_delta)) < 1e-5
    with pytest.raises(MadistillError, match="not reproducible from its seed"), \
            mock.patch("madistill.cascade.paired.ROUNDING_REWARD", 0.0):
        check_reproducible(make, team, 3, 0, "sl")


def test_speaker_listener_the_speaker_influences_the_listener_and_never_the_reverse():
    """The speaker's observation (its goal) never depends on the listener: that effect is exactly 0 at every lag;
    the listener hears the speaker's message of the step before: lag 1 (random-initialised MLPs, sampled actions)."""
    from madistill.envs.factory import EnvSpec

    spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 10}, name="sl")
    make = venv_maker(spec)
    with make(1, 1) as venv:
        team = mlp_team(venv, [16])
        env = FaultEnv(venv.groups, feature_layouts(venv.groups, {}, venv.feature_names))
        agents = list(venv.possible_agents)
    faults = [impulse(env, a, o) for a in agents for o in (2, 5)]
    inf = influence(paired_rollouts(make, team, faults, 8, 3), [a for a in agents for _ in (2, 5)], 3, n_boot=100)
    assert inf.first_lag() == {"speaker_0": {"listener_0": 1}, "listener_0": {"speaker_0": None}}
    s, li = agents.index("speaker_0"), agents.index("listener_0")
    assert np.nanmax(inf.effect[li, s]) == 0 and inf.samples[li, s].min() > 0


def test_a_return_loss_threshold_counts_failures_by_reward_lost_since_the_onset():
    """A dead agent_3 (no out-edges) changes no one's actions, but the shared relay reward drops: by deviation
    nobody fails, by a return loss of 0.5 the others fail once half a step's reward is lost."""
    make, team, env, agents = setup(relay_spec(n_agents=4, topology="chain"))
    fc = OmegaConf.merge(OmegaConf.structured(FaultConfig),
                         {"name": "constant", "victims": ["agent_3"], "onset": 2, "duration": None, "action": [1]})
    run = paired_rollouts(make, team, [make_fault(fc, env)], EPISODES, 11)
    assert (cascade(run, 0, ["agent_3"], 0.1).sizes == 0).all()
    by_return = cascade(run, 0, ["agent_3"], 0.1, return_loss=0.5)
    lost = -np.nansum(run.reward_delta[0][:, :, 0], axis=1)  # the shared reward: every agent loses the same
    assert (by_return.sizes == np.where(lost >= 0.5, 3, 0)).all() and by_return.sizes.any()
    first = by_return.delays[by_return.failed[:, 0], 0]
    assert (first >= 0).all()


def test_box_actions_faults_and_exact_gaussian_tv():
    """Continuous spread: a constant Box action is executed as given, random ones stay in the box, and the paired
    TV of Gaussian policies is 2 Phi(d / 2) - 1 (0 before the onset, in (0, 1) after)."""
    import torch

    from madistill.envs.factory import EnvSpec
    from madistill.rollout import Rollout

    spec = EnvSpec("mpe2.simple_spread_v3.parallel_env", {"N": 2, "max_cycles": 8, "continuous_actions": True},
                   name="spread")
    make = venv_maker(spec)
    with make(2, 2) as venv:
        team = mlp_team(venv, [8])
        env = FaultEnv(venv.groups, feature_layouts(venv.groups, {}, venv.feature_names))
        box = venv.groups[0].action_space
        const = impulse(env, "agent_0", 2, "constant", duration=None, action=[0.0, 1.0, 0.0, 0.5, 0.0])
        rand = impulse(env, "agent_1", 2, "random", duration=None)
        rows = []
        Rollout(venv, team, [const, rand], seed=1).run(steps=6, on_step=lambda tr: rows.append(tr.actions["agent"].clone()))
    for t, a in enumerate(rows[2:], start=2):
        assert torch.equal(a[:, 0], torch.tensor([[0.0, 1.0, 0.0, 0.5, 0.0]] * 2)), t
        assert ((a[:, 1] >= torch.as_tensor(box.low)) & (a[:, 1] <= torch.as_tensor(box.high))).all()
    with pytest.raises(MadistillError, match="give 1 or 5 values in fault.action"):
        impulse(env, "agent_0", 2, "constant", action=[0.0, 1.0])
    run = paired_rollouts(make, team, [impulse(env, "agent_0", 3, "constant", duration=None, action=[1.0])], 4, 0)
    tv = run.tv[0][..., 1]  # agent_1 sees agent_0 move differently
    assert np.nansum(tv[:, :4]) == 0 and 0 < np.nanmax(tv[:, 4:]) < 1


def test_noise_floor_is_the_quantile_of_independently_sampling_clean_twins_and_raises_the_threshold():
    from madistill.cascade.monitor import study
    from madistill.cascade.paired import noise_floor
    from madistill.config import CascadeConfig

    make, team, env, agents = setup(relay_spec(n_agents=4, switch_prob=0.3))
    stuck = impulse(env, "agent_1", 4, "stuck", duration=None)
    shared = paired_rollouts(make, team, [None], EPISODES, 70)
    assert np.nansum(shared.tv[0]) == 0  # same streams: sampling alone changes nothing
    run = paired_rollouts(make, team, [stuck, None], EPISODES, 70, independent=True)
    peaks = np.nan_to_num(run.tv[1], nan=0.0).max(axis=1)  # [E, A]: per episode and agent, the largest TV
    assert peaks.max() > 0.1  # a source sampling another symbol changes what its downstream agents see
    assert peaks[:, 0].max() == 0  # the chain's source sees only its target: no twin can change its distribution
    assert noise_floor(run, 1, 0.9) == pytest.approx(np.quantile(peaks, 0.9))
    # a fault block keeps the clean block's streams: identical before the stuck action acts
    assert np.nansum(run.tv[0][:, :5]) == 0
    cc = OmegaConf.merge(OmegaConf.structured(CascadeConfig), {"episodes": EPISODES, "seed": 70, "n_boot": 50,
                                                               "replay_episodes": 2, "threshold": 0.01,
                                                               "noise_quantile": 0.9})
    fc = OmegaConf.merge(OmegaConf.structured(FaultConfig), {"name": "dead", "victims": ["agent_1"], "onset": 3})
    impulse_fc = OmegaConf.merge(OmegaConf.structured(FaultConfig), {"name": "random"})
    sampled = study(make, team, env, cc, fc, impulse_fc, "relay")
    assert sampled.noise_floor == pytest.approx(np.quantile(peaks, 0.9)) and sampled.threshold == sampled.noise_floor
    assert sampled.to_dict(50, 0.95)["noise_floor"] == sampled.noise_floor
    greedy = study(make, team, env, OmegaConf.merge(cc, {"deterministic": True}), fc, impulse_fc, "relay")
    assert greedy.noise_floor == 0.0 and greedy.threshold == 0.01
    off = study(make, team, env, OmegaConf.merge(cc, {"noise_quantile": None}), fc, impulse_fc, "relay")
    assert off.noise_floor == 0.0 and off.threshold == 0.01


def test_the_others_return_delta_is_also_kept_per_team():
    """Two episodes, three non-faulted agents: a_1 (red) loses 2, b_0 and b_1 (blue) gain 1 and 3. Across the
    sides the mean delta is +2/3; per team it is -2 for red and +2 for blue."""
    delta = np.array([[-2.0, 1.0, 3.0], [-2.0, 1.0, 3.0]])
    c = Cascade(["a_1", "b_0", "b_1"], ["a_0"], 0.1, np.full((2, 3), np.nan), delta, {}, np.zeros((2, 3)))
    teams = {"red": ("a_0", "a_1"), "blue": ("b_0", "b_1")}
    s = c.summary(n_boot=50, teams=teams)
    assert s["others_return_delta"] == pytest.approx(2 / 3)
    by_team = s["others_return_delta_by_team"]
    assert {t: (v["agents"], v["mean"]) for t, v in by_team.items()} == {"red": (["a_1"], -2.0),
                                                                            "blue": (["b_0", "b_1"], 2.0)}
    assert "others_return_delta_by_team" not in c.summary(n_boot=50, teams={"team": ("a_0", "a_1", "b_0", "b_1")})


def test_the_influence_graph_names_its_policy_and_ends_each_arrow_at_the_box_edge():
    """With two agents the arrow used to end under the destination's name, hiding its direction."""
    from types import SimpleNamespace

    from madistill.cascade.report import graph

    effect = np.zeros((2, 2, 1))
    effect[0, 1, 0] = 0.5
    study = SimpleNamespace(influence=SimpleNamespace(agents=["speaker_0", "listener_0"], effect=effect,
                                                      edges=lambda: [("speaker_0", "listener_0", 1)]))
    fig = graph(study, "teacher")
    ax = fig.axes[0]
    assert ax.get_title() == "teacher: lag-1 influence graph"
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    arrow = ax.texts[-1].arrow_patch.get_window_extent(renderer)  # display coordinates, head included
    left, right = sorted((t.get_bbox_patch().get_window_extent(renderer) for t in ax.texts[:2]), key=lambda b: b.x0)
    assert left.x1 - 1 <= arrow.x0 and arrow.x1 <= right.x0 + 1  # between the boxes, into neither
