"""Targeted attacks: PGD that forces a chosen action on policies whose answer is known by hand, candidate
targets batched, budgets, Box targets; the monotone worst case over victim subsets; the objective check."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from gymnasium import spaces

from madistill.attacks.budget import Budget
from madistill.attacks.checks import OBJECTIVE_MISSES, return_checks
from madistill.attacks.methods import Attack, targets, variants
from madistill.attacks.robustness import (
    SUITE,
    THREAT_MODELS,
    RobustnessResult,
    markdown_report,
)
from madistill.config import AttackConfig
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.policies.base import Policy

OBS = spaces.Box(-np.inf, np.inf, (2,), np.float32)


class Linear(Policy):
    """Logits (Discrete) or mean (Box) ``W x + c``, with a fixed std of 1 for Box."""

    def __init__(self, group: AgentGroup, w: list[list[float]], c: list[float]):
        super().__init__()
        self.group = group
        self.w, self.c = torch.tensor(w, dtype=torch.float32), torch.tensor(c, dtype=torch.float32)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs @ self.w.T + self.c

    def log_std(self) -> torch.Tensor | None:
        return None if self.group.discrete else torch.zeros(len(self.c))


# z = (0, x0 + x1 - 1, x0 - x1 - 3). Clean at x = 0: action 0; ranked lowest: 2, then 1. Inside an l_inf ball
# of radius e, action 1 wins iff 2e > 1 (x = (e, e)); action 2 wins iff 2e > 3 (x = (e, -e), where z1 = -1).
THREE = Linear(AgentGroup("g", ("a_0",), OBS, spaces.Discrete(3)), [[0, 0], [1, 1], [1, -1]], [0, -1, -3])
X0 = torch.zeros(4, 2)


def _greedy(policy: Policy, x: torch.Tensor) -> list[int]:
    return policy(x).argmax(-1).tolist()


def _pgd(**kw) -> Attack:
    return replace(variants(Attack(steps=20, restarts=2))["targeted_lowest"], **kw)


@pytest.mark.parametrize("eps,forced", [(0.45, 0), (0.55, 1), (1.45, 1), (1.55, 2)])
def test_targeted_pgd_forces_the_lowest_reachable_action_at_the_budget_computed_by_hand(eps, forced):
    x_adv = _pgd(candidates=2)(THREE, X0, Budget.build(eps, 2), torch.Generator().manual_seed(0))
    assert _greedy(THREE, x_adv) == [forced] * 4
    # one candidate only: the lowest-ranked action 2, out of reach below eps 1.5, is not traded for action 1
    alone = _pgd(candidates=1)(THREE, X0, Budget.build(eps, 2), torch.Generator().manual_seed(0))
    assert _greedy(THREE, alone) == [2 if eps > 1.5 else 0] * 4


def test_targets_rank_the_clean_policy_lowest_first_and_random_ones_cover_every_other_action():
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0]])  # clean logits (0, -1, -3) and (0, 3, -3)
    assert targets("lowest", THREE, x, 2).tolist() == [[2, 2], [1, 0]]
    assert targets("lowest", THREE, x, 5).shape == (2, 2)  # never the greedy action: at most n - 1 candidates
    drawn = targets("random", THREE, torch.zeros(3000, 2), 1, torch.Generator().manual_seed(0))
    assert drawn.shape == (1, 3000)
    # never the greedy action 0 (forcing it would attack nothing); the other two equally often
    assert np.allclose(np.bincount(drawn[0].numpy(), minlength=3) / 3000, [0, 1 / 2, 1 / 2], atol=0.03)


def test_batched_candidates_equal_one_target_at_a_time():
    # log-softmax of logits linear in x is concave in x, so PGD reaches the same maximiser from any start; a
    # reached target stops its search where it is reached, which depends on the start
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(3)) * 0.2
    budget, attack = Budget.build(1.0, 2), _pgd()
    cand = targets("lowest", THREE, x, 2).reshape(-1)  # action 2 (out of reach at eps 1), then action 1
    batched = attack.force(THREE, x.repeat(2, 1), cand, budget, torch.Generator().manual_seed(0))
    alone = torch.cat([attack.force(THREE, x, cand[6 * k:6 * (k + 1)], budget, torch.Generator().manual_seed(k + 5))
                       for k in range(2)])
    reached = torch.tensor(_greedy(THREE, batched)) == cand
    assert reached.tolist() == [False] * 6 + [True] * 6
    assert _greedy(THREE, alone) == _greedy(THREE, batched)
    assert torch.allclose(batched[:6], alone[:6], atol=1e-5)  # the unreached target's maximiser, the corner (1, -1)
    assert torch.allclose(batched[:6], x + torch.tensor([1.0, -1.0]), atol=1e-5)


class Bump(Policy):
    """Logits ``(0, 1 - 100 (x0 - 0.5)^2)``: action 1 is greedy only within 0.1 of x0 = 0.5, a narrow window in
    the middle of the l_inf ball of radius 1 around 0, where log pi(1) peaks. Fixed signed steps of 0.25 (2.5 eps
    over 10 steps) from a random start end oscillating between two points 0.25 apart around 0.5, often both
    outside the window; halving the step from the best point settles in it."""

    group = AgentGroup("g", ("a_0",), OBS, spaces.Discrete(2))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros_like(obs[:, 0]), 1 - 100 * (obs[:, 0] - 0.5) ** 2], -1)

    def log_std(self) -> torch.Tensor | None:
        return None


def test_force_reaches_a_target_inside_the_ball_that_fixed_step_end_points_miss():
    x, target = torch.zeros(64, 2), torch.ones(64, dtype=torch.long)
    forced = Attack("targeted", "target").force(Bump(), x, target, Budget.build(1.0, 2), torch.Generator().manual_seed(0))
    assert _greedy(Bump(), forced) == [1] * 64
    assert ((forced[:, 0] - 0.5).abs() < 0.1).all()


def test_force_stops_a_sample_where_its_target_is_reached_and_training_climbs_on():
    x, target = torch.zeros(64, 2), torch.ones(64, dtype=torch.long)
    budget, gen = Budget.build(1.0, 2), torch.Generator()
    stop = Attack("targeted", "target").force(Bump(), x, target, budget, gen.manual_seed(0))
    climb = Attack("targeted", "target", stop_reached=False).force(Bump(), x, target, budget, gen.manual_seed(0))
    assert _greedy(Bump(), climb) == [1] * 64
    # climbing on ends nearer the peak at 0.5 than stopping at the first point inside the window
    assert float((climb[:, 0] - 0.5).abs().mean()) < 0.5 * float((stop[:, 0] - 0.5).abs().mean())


def test_force_returns_the_start_where_no_point_of_the_ball_beats_it_or_its_target_is_reached_there():
    budget, gen, one = Budget.build(0.4, 2), torch.Generator(), torch.ones(1, dtype=torch.long)
    peak = torch.tensor([[0.5, 0.0]])  # log pi(1) of Bump peaks at x0 = 0.5: every other point of the ball is worse
    assert torch.equal(Attack("targeted", "target", stop_reached=False).force(Bump(), peak, one, budget, gen.manual_seed(0)), peak)
    x = torch.tensor([[0.55, 0.3], [2.0, 0.0]])  # action 1 greedy at the start; out of reach (nearest x0: 1.6)
    forced = Attack("targeted", "target").force(Bump(), x, one.repeat(2), budget, gen.manual_seed(0))
    assert torch.equal(forced[0], x[0])
    assert float(forced[1, 0]) == pytest.approx(1.6) and _greedy(Bump(), forced) == [1, 0]


@pytest.mark.parametrize("name", ["targeted_random", "targeted_lowest"])
@pytest.mark.parametrize("discrete", [True, False])
def test_targeted_attacks_stay_in_budget_and_leave_excluded_features(name, discrete):
    d = 6
    group = AgentGroup("g", ("a_0",), spaces.Box(-np.inf, np.inf, (d,), np.float32),
                       spaces.Discrete(4) if discrete else spaces.Box(-1, 1, (2,), np.float32))
    w = torch.randn(4 if discrete else 2, d, generator=torch.Generator().manual_seed(1)).tolist()
    policy = Linear(group, w, [0.0] * len(w))
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(2))
    eps = torch.linspace(0.1, 0.6, d)
    budget = Budget.build(eps.tolist(), d, excluded=[4])
    x_adv = replace(variants(Attack(steps=5))[name], candidates=3)(policy, x, budget, torch.Generator().manual_seed(0))
    assert ((x_adv - x).abs() <= budget.radius + 1e-6).all()
    assert torch.equal(x_adv[:, 4], x[:, 4])
    assert (x_adv - x).abs().amax() > 0.5 * eps.max()  # it did move


def test_box_targets_are_the_far_corner_and_pgd_moves_the_mean_towards_it():
    group = AgentGroup("g", ("a_0",), OBS, spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 2.0], np.float32)))
    policy = Linear(group, [[1.0, 2.0], [0.5, 0.0]], [0.0, 1.0])  # means (x0 + 2 x1, 0.5 x0 + 1)
    x = torch.tensor([[0.1, 0.0], [-0.1, 0.0]])
    assert targets("lowest", policy, x).tolist() == [[[-1.0, 0.0], [1.0, 2.0]]]
    drawn = targets("random", policy, torch.zeros(500, 2), 1, torch.Generator().manual_seed(0))[0]
    assert (drawn[:, 0] >= -1).all() and (drawn[:, 0] <= 1).all() and (drawn[:, 1] >= 0).all() and (drawn[:, 1] <= 2).all()
    # each mean moves by eps times its row's l1 norm towards its corner where the budget allows no overshoot:
    # component 1 cannot reach its corner (moves 0.5 * 0.2), component 0 overshoots -1 / 1 unless stopped there
    x_adv = variants(Attack(steps=20))["targeted_lowest"](policy, x, Budget.build(0.2, 2), torch.Generator().manual_seed(0))
    mean = policy(x_adv)
    assert torch.allclose(mean[:, 1], torch.tensor([1.05 - 0.1, 0.95 + 0.1]), atol=1e-4)
    assert torch.allclose(mean[:, 0], torch.tensor([-0.5, 0.5]), atol=1e-4)  # 0.1 -/+ 0.6
    unbounded = AgentGroup("g", ("a_0",), OBS, spaces.Box(-np.inf, np.inf, (2,), np.float32))
    with pytest.raises(MadistillError, match="bounded action box"):
        targets("lowest", Linear(unbounded, [[1, 0], [0, 1]], [0, 0]), x)


def test_targeted_settings_are_checked():
    with pytest.raises(MadistillError, match="'pgd' with objective 'target': the target objective needs the targeted method"):
        Attack("pgd", "target")
    with pytest.raises(MadistillError, match="unknown attack target choice"):
        Attack("targeted", "target", target="best")


def test_the_default_suite_has_the_targeted_attacks_and_quick_stays_quick(make_cfg):
    assert {"targeted_random", "targeted_lowest", "targeted_lookahead"} <= set(SUITE)
    suite = ["random", "fgsm", "pgd", "critic", "spsa", "transfer", "targeted_lowest", "targeted_lookahead"]
    assert [str(m) for m in AttackConfig().methods] == suite
    assert [str(m) for m in make_cfg().attack.methods] == suite
    assert [str(m) for m in make_cfg("attack=quick").attack.methods] == ["random", "fgsm", "pgd"]
    assert set(suite) < {str(m) for m in make_cfg("attack=thorough").attack.methods}
    assert set(THREAT_MODELS) == {*SUITE, "pgd_strong"}  # the report names every attack's threat model


class Counted(Linear):
    """Linear, counting its forward calls and the rows of each."""

    def __init__(self, *args):
        super().__init__(*args)
        self.rows: list[int] = []

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(obs))
        return super().forward(obs)


def test_targeted_pgd_runs_all_candidates_in_one_forward_and_backward_pass_per_step():
    policy = Counted(THREE.group, THREE.w.tolist(), THREE.c.tolist())
    rows = {}
    for k in (1, 2):
        policy.rows = []
        _pgd(candidates=k)(policy, torch.zeros(5, 2), Budget.build(1.0, 2), torch.Generator().manual_seed(0))
        rows[k] = list(policy.rows)
    # the targets from the clean batch, then PGD (clean head, start value, 2 restarts x (20 steps + value)) on all
    # K x B rows at once, then (with a choice to make) which target became greedy
    pgd = 1 + 1 + 2 * (20 + 1)
    assert rows[1] == [5] + [5] * pgd
    assert len(rows[2]) == 1 + pgd + 1 and rows[2][:3] == [5, 10, 10] and rows[2][-1] == 10
    # the reachable action 1 drops out of the search once greedy; the unreachable action 2 runs every step
    searched = rows[2][3:-1]
    assert searched == sorted(searched, reverse=True) and searched[-1] == 5 and 5 < sum(searched) / len(searched) < 6


def _result(cells: dict[str, dict[str, float]], members: dict[str, tuple[str, ...]]) -> RobustnessResult:
    res = RobustnessResult(-10.0, -40.0, {"s": -10.0, "l": -10.0}, victim_members=members)
    res.episodes = {v: {a: {1.0: np.full(3, r)} for a, r in row.items()} for v, row in cells.items()}
    res.agent_returns = {v: {a: {1.0: {"s": r, "l": r}} for a, r in row.items()} for v, row in cells.items()}
    return res


def test_the_worst_case_of_a_victim_set_is_never_above_that_of_its_evaluated_subsets():
    members = {"all": ("s", "l"), "l": ("l",), "s": ("s",), "s+x": ("s", "x")}
    res = _result({"all": {"pgd": -35.0, "fgsm": -30.0}, "l": {"pgd": -44.0, "targeted_lowest": -90.0},
                   "s": {"pgd": -20.0}, "s+x": {"pgd": -95.0}}, members)
    assert res.worst_from("all", 1.0) == ("l", "targeted_lowest", -90.0)
    assert res.worst("all", 1.0) == ("targeted_lowest on l", -90.0)
    assert res.worst("l", 1.0) == ("targeted_lowest", -90.0)
    assert res.worst("s", 1.0) == ("pgd", -20.0)  # "all" and "s+x" are supersets of s, not subsets
    assert res.worst_agents("all", 1.0) == ("targeted_lowest on l", {"s": -90.0, "l": -90.0})
    d = json.loads(json.dumps(res.to_dict()))
    assert d["worst_case"]["all"]["1.0"] == ["targeted_lowest on l", -90.0]
    assert d["worst_case_from"]["all"]["1.0"] == "l" and d["worst_case_from"]["s"]["1.0"] == "s"
    assert "| **worst case** | -90.00 [-90.00, -90.00] (targeted_lowest on l) |" in markdown_report({"teacher": res}, "env", 3)


def test_a_worst_case_lookup_averages_only_the_cells_it_compares(monkeypatch):
    """worst_from at one eps reads the attacks on the set and its subsets at that eps, not every cell (a report
    looks up every set and eps in turn)."""
    members = {"all": ("s", "l"), "l": ("l",), "s": ("s",)}
    row = {a: -30.0 for a in ("random", "fgsm", "pgd", "critic")}
    res = _result({v: row for v in members}, members)
    for v in members:  # more budgets, which the lookup at 1.0 must not read
        for a in row:
            res.episodes[v][a].update({e: np.full(3, -1.0) for e in (0.1, 0.2, 0.3)})
    calls = []
    nanmean = np.nanmean
    monkeypatch.setattr(np, "nanmean", lambda x, *a, **k: calls.append(len(x)) or nanmean(x, *a, **k))
    assert res.worst_from("l", 1.0) == ("l", "random", -30.0)
    assert len(calls) == 4  # the 4 attacks on l at eps 1.0
    calls.clear()
    res.worst_agents("all", 1.0)
    assert len(calls) == 3 * 4  # all and its subsets l and s, once


def test_the_monotone_worst_case_holds_per_team():
    teams = {"good": ("g0", "g1"), "bad": ("b0",)}
    res = RobustnessResult(0.0, 0.0, {}, teams=teams, team_clean={"good": 2.0, "bad": -2.0},
                           team_random={"good": 0.0, "bad": 0.0},
                           victim_members={"team:good": ("g0", "g1"), "g0": ("g0",)})
    res.episodes = {v: {"pgd": {0.5: np.zeros(2)}} for v in ("team:good", "g0")}
    res.team_episodes = {"good": {"team:good": {"pgd": {0.5: np.array([1.0, 1.0])}}, "g0": {"pgd": {0.5: np.array([-1.0, -1.0])}}},
                         "bad": {"team:good": {"pgd": {0.5: np.array([-3.0, -3.0])}}, "g0": {"pgd": {0.5: np.array([-1.0, -1.0])}}}}
    assert res.worst("team:good", 0.5, "good") == ("pgd on g0", -1.0)
    assert res.worst("team:good", 0.5, "bad") == ("pgd", -3.0)
    assert json.loads(json.dumps(res.to_dict()))["teams"]["good"]["worst_case_from"]["team:good"]["0.5"] == "g0"


CLEAN = np.full(100, -10.0)
NOISE = np.random.default_rng(0).normal(0, 1, 100)


@pytest.mark.parametrize("shift,fires", [(-20.0, True), (0.0, False), (5.0, False), (-1.0, False)])
def test_objective_check_fires_only_when_a_targeted_attack_is_materially_stronger(shift, fires):
    # clean -10, random -40: material means a mean gap over 0.1 * 30 = 3 with a CI excluding zero
    returns = {"pgd": {1.0: -30.0 + NOISE}, "fgsm": {1.0: -25.0 + NOISE},
               "targeted_random": {1.0: -28.0 + NOISE[::-1]}, "targeted_lowest": {1.0: -30.0 + shift + NOISE[::-1]}}
    flags = return_checks(returns, CLEAN, -40.0)
    assert [f.name for f in flags] == ([OBJECTIVE_MISSES] if fires else [])
    if fires:
        assert flags[0].detail.startswith("eps 1: targeted_lowest return -49.92 < pgd -29.92")


@pytest.mark.parametrize("objective_tolerance,fires", [(0.1, True), (0.2, False)])
def test_objective_check_takes_its_own_tolerance(objective_tolerance, fires):
    # a targeted attack 5 points below PGD: over 0.1 x 30 = 3, under 0.2 x 30 = 6; the masking tolerance of 0.5
    # (15 points) does not silence it
    returns = {"pgd": {1.0: -30.0 + NOISE}, "targeted_lowest": {1.0: -35.0 + NOISE}}
    flags = return_checks(returns, CLEAN, -40.0, tolerance=0.5, objective_tolerance=objective_tolerance)
    assert [f.name for f in flags] == ([OBJECTIVE_MISSES] if fires else [])


def test_objective_tolerance_is_checked(make_cfg):
    assert make_cfg().attack.objective_tolerance == 0.1
    with pytest.raises(MadistillError, match="attack.objective_tolerance must be at least 0"):
        make_cfg("attack.objective_tolerance=-0.1")


def test_the_objective_flag_is_kept_apart_from_the_masking_flags():
    res = _result({"all": {"pgd": -30.0, "targeted_lowest": -60.0}}, {"all": ("s", "l")})
    res.add_checks("all", return_checks(res.episodes["all"], CLEAN, -40.0))
    assert res.flags["all"] == [] and [f.name for f in res.objective["all"]] == [OBJECTIVE_MISSES]
    report = markdown_report({"teacher": res}, "env", 3)
    assert "Gradient-masking checks: none fired" in report
    assert f"- **{OBJECTIVE_MISSES}** (all): eps 1: targeted_lowest return -60.00 < pgd -30.00" in report
    d = res.to_dict()
    assert d["objective_checks"]["all"][0]["name"] == OBJECTIVE_MISSES and d["flags"]["all"] == []
    assert set(d["threat_models"]) == {"pgd", "targeted_lowest"}
