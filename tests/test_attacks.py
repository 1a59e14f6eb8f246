"""Attacks: budgets and excluded features, objective strength on Discrete and Box policies, the attack
transform (victims, timing), gradient-masking checks on a masking policy, a plain one and degenerate attacks,
and the attack command."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch
from gymnasium import spaces

from madistill.attacks.budget import Budget, excluded_features, group_budgets
from madistill.attacks.checks import DEGENERATE, probe, return_checks
from madistill.attacks.methods import Attack, Objective, variants
from madistill.attacks.transform import AttackTransform, ConstantOffset, victim_sets
from madistill.envs.factory import EnvSpec
from madistill.envs.features import FeatureLayout
from madistill.envs.groups import AgentGroup
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import TeamPolicy
from madistill.policies.mlp import MLPPolicy
from madistill.transforms import StepContext

D = 8
GROUP = AgentGroup("g", ("a_0", "a_1"), spaces.Box(-np.inf, np.inf, (D,), np.float32), spaces.Discrete(5))
BOX_GROUP = AgentGroup("g", ("a_0", "a_1"), spaces.Box(-np.inf, np.inf, (D,), np.float32), spaces.Box(-1, 1, (2,), np.float32))


def _mlp(scale: float = 3.0, seed: int = 0, group: AgentGroup = GROUP) -> MLPPolicy:
    torch.manual_seed(seed)
    p = MLPPolicy(group, {"hidden_sizes": [32, 32], "activation": "tanh"})
    with torch.no_grad():
        for w in p.parameters():
            w.mul_(scale)  # sharper than at init, like a trained policy
    return p


class Quantised(MLPPolicy):
    """Rounds its input to a grid first: gradients are zero almost everywhere (masked), the policy is not robust."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.round(obs * 2) / 2)


def _quantised() -> Quantised:
    q = Quantised(GROUP, {"hidden_sizes": [32, 32], "activation": "tanh"})
    q.load_state_dict(_mlp().state_dict())
    return q


X = torch.randn(256, D, generator=torch.Generator().manual_seed(1)) * 2


@pytest.mark.parametrize("method,objective", [("random", "kl"), ("fgsm", "ce"), ("pgd", "kl"), ("pgd", "ce"), ("spsa", "kl")])
def test_attacks_stay_in_budget_and_leave_excluded_features(method, objective):
    eps = torch.linspace(0.1, 0.8, D)
    budget = Budget.build(eps.tolist(), D, excluded=[0, 5])
    x_adv = Attack(method, objective, steps=5)(_mlp(), X, budget, torch.Generator().manual_seed(0))
    delta = (x_adv - X).abs()
    assert torch.all(delta <= budget.radius + 1e-6)
    assert torch.all(delta[:, [0, 5]] == 0)
    assert delta.max() > 0.5 * 0.8  # it does move (random: uniformly; others: to the boundary)


@pytest.mark.parametrize("name", ["transfer", "critic"])
def test_suite_transfer_and_critic_attacks_stay_in_budget_and_leave_excluded_features(name):
    from madistill.policies.sb3 import SB3Policy

    def team_of(policy):
        return TeamPolicy([GROUP], {"g": policy}, {"g": ObsNormalizer(D, enabled=False)})

    torch.manual_seed(0)
    victim, surrogate = _mlp(seed=0), _mlp(seed=1)
    critic = SB3Policy.from_arch(GROUP, {"hidden_sizes": [32], "activation": "tanh"})
    budget = Budget.build(torch.linspace(0.1, 0.8, D).tolist(), D, excluded=[0, 5])
    suite = variants(Attack(steps=5))
    transform = AttackTransform(suite[name], ["a_0", "a_1"], {"g": budget},
                                surrogate=team_of(surrogate) if name == "transfer" else None, critic=team_of(critic))
    ctx = StepContext(team_of(victim), 0, np.zeros(len(X) // 2), {"g": torch.ones(len(X) // 2, 2, dtype=torch.bool)},
                      torch.Generator().manual_seed(0))
    x_adv = transform({"g": X.reshape(-1, 2, D)}, ctx)["g"].reshape(-1, D)
    delta = (x_adv - X).abs()
    assert torch.all(delta <= budget.radius + 1e-6)
    assert torch.all(delta[:, [0, 5]] == 0)
    assert delta.max() > 0.5 * 0.8
    if name == "transfer":  # crafted on the surrogate: exactly its PGD point, not the victim's
        on_surrogate = suite["pgd"](surrogate, X, budget, torch.Generator().manual_seed(0))
        on_victim = suite["pgd"](victim, X, budget, torch.Generator().manual_seed(0))
        assert torch.equal(x_adv, on_surrogate) and not torch.equal(x_adv, on_victim)
    else:  # it lowers the critic's value
        with torch.no_grad():
            assert float(critic.value(x_adv).mean()) < float(critic.value(X).mean()) - 0.01


def test_critic_attack_lowers_the_value():
    from madistill.policies.sb3 import SB3Policy

    torch.manual_seed(0)
    critic = SB3Policy.from_arch(GROUP, {"hidden_sizes": [32], "activation": "tanh"})
    budget = Budget.build(0.5, D)
    x_adv = Attack("pgd", "value", steps=10)(critic, X, budget, torch.Generator().manual_seed(0), critic=critic)
    with torch.no_grad():
        assert float(critic.value(x_adv).mean()) < float(critic.value(X).mean()) - 0.01
    with pytest.raises(MadistillError, match="attack.critic"):
        Attack("pgd", "value")(_mlp(), X, budget, None, critic=_mlp())


@pytest.mark.parametrize("method,objective", [("pgd", "kl"), ("pgd", "ce"), ("spsa", "kl"), ("targeted", "target")])
def test_search_attacks_are_reproducible_bit_for_bit_and_never_worse_than_the_start(method, objective):
    policy, budget = _mlp(), Budget.build(0.3, D)
    attack = Attack(method, objective, steps=6, spsa_samples=8)
    with torch.no_grad():
        target = policy(X).argsort(-1)[:, 0] if method == "targeted" else None  # the lowest-ranked action

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return attack(policy, X, budget, gen) if target is None else attack.force(policy, X, target, budget, gen)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    goal = Objective(objective, policy, X, None, target=target)
    with torch.no_grad():
        for x_adv in (first, other):
            assert (goal(x_adv) >= goal(X)).all()


def test_pgd_reaches_a_higher_divergence_than_fgsm_and_random():
    policy, budget, gen = _mlp(), Budget.build(0.3, D), torch.Generator().manual_seed(0)
    kl = Objective("kl", policy, X, None)
    reached = {m: float(kl(Attack(m, "ce" if m == "fgsm" else "kl")(policy, X, budget, gen)).mean().detach())
               for m in ("random", "fgsm", "pgd")}
    assert reached["pgd"] > reached["fgsm"] > reached["random"] > 0


def test_fgsm_on_a_linear_gaussian_policy_reaches_the_exact_maximum_of_the_kl():
    """Worked example: mean w.x, one action, sigma 1. The KL (and the cross-entropy of the clean mean, the
    same plus a constant) is (w.delta)^2 / 2, flat at delta = 0; over the l_inf ball of radius eps its maximum
    is (eps ||w||_1)^2 / 2 at delta = +-eps sign(w), and the gradient at any random point r, (w.r) w, has
    exactly that sign: FGSM reaches the maximum on every sample."""
    group = AgentGroup("g", ("a_0",), spaces.Box(-np.inf, np.inf, (3,), np.float32), spaces.Box(-1, 1, (1,), np.float32))
    policy = MLPPolicy(group, {"hidden_sizes": [], "activation": "tanh"})
    w = torch.tensor([[2.0, -1.0, 0.5]])
    with torch.no_grad():
        policy.net[0].weight.copy_(w)
        policy.net[0].bias.zero_()
    x, eps = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), 0.2
    kl = Objective("kl", policy, x, None)
    for objective in ("ce", "kl"):
        reached = kl(Attack("fgsm", objective)(policy, x, Budget.build(eps, 3), torch.Generator().manual_seed(0)))
        torch.testing.assert_close(reached.detach(), torch.full((64,), 0.5 * (eps * 3.5) ** 2))


def test_fgsm_on_a_discrete_policy_steps_along_the_clean_gradient_without_a_random_draw():
    policy, budget, gen = _mlp(), Budget.build(0.3, D), torch.Generator().manual_seed(0)
    state = gen.get_state()
    x_adv = Attack("fgsm", "ce")(policy, X, budget, gen)
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(x_adv, X + 0.3 * Objective("ce", policy, X, None).gradient(X).sign())


def _moved(policy: MLPPolicy, name: str, attack: Attack, eps: float) -> torch.Tensor:
    """KL(pi(x) || pi(x_adv)) per observation of X under ``attack`` (``name``: transfer crafts on another
    policy, critic uses a value head)."""
    from madistill.policies.sb3 import SB3Policy

    torch.manual_seed(2)
    critic = SB3Policy.from_arch(policy.group, {"hidden_sizes": [32], "activation": "tanh"})
    crafted_on = _mlp(seed=1, group=policy.group) if name == "transfer" else policy
    x_adv = attack(crafted_on, X, Budget.build(eps, D), torch.Generator().manual_seed(0), critic=critic)
    with torch.no_grad():
        return Objective("kl", policy, X, None)(x_adv)


def _training_attacks() -> dict[str, Attack]:
    """The attacks robust distillation and fine-tuning train against, by where they come from."""
    from types import SimpleNamespace

    from madistill.distill.loss import DistillLoss
    from madistill.finetune import collection_attack

    out = {f"distill_{i}": a for i, a in enumerate(DistillLoss(adv_objective="both", adv_fgsm=True).training_attacks())}
    for objective in ("ce", "kl"):
        settings = SimpleNamespace(attack_fraction=0.5, eps=1.0, attack_objective=objective, steps=5)
        out[f"finetune_{objective}"] = collection_attack([GROUP], {"g": Budget.build(1.0, D)}, settings)[0].attack
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,attack", [*((n, a) for n, a in variants(Attack(steps=5)).items() if n != "pgd_strong"),
                                         *_training_attacks().items()])
def test_every_attack_moves_a_box_policy_as_it_moves_a_discrete_one(name, attack):
    """At a budget where an attack moves a Discrete policy's action distribution on every observation, by
    at least twice a random perturbation's mean KL, it does so for a Box (Gaussian) policy too."""
    eps = 0.1
    for group in (GROUP, BOX_GROUP):
        policy = _mlp(group=group)
        moved, noise = _moved(policy, name, attack, eps), _moved(policy, "random", variants(Attack())["random"], eps)
        assert bool((noise > 0).all())
        assert bool((moved > 0).all()), (name, group.action_space)
        if name != "random":
            assert float(moved.mean()) > 2 * float(noise.mean()), (name, group.action_space)


def test_budgets_from_config():
    layout = FeatureLayout.build(4, {"goal": [2, 3]})
    assert excluded_features(["goal", "0"], layout) == [0, 2, 3]
    b = group_budgets(0.5, {"g": layout}, {"g": ["goal"]})["g"]
    torch.testing.assert_close(b.radius, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(MadistillError, match="attack.exclude"):
        excluded_features(["nope"], layout)
    with pytest.raises(MadistillError, match="needs 4 values"):
        Budget.build([0.1, 0.2], 4)
    # a per-feature eps from config: the goal at a quarter of eps, feature 1 at twice, feature 0 excluded
    b = group_budgets(0.4, {"g": layout}, {"g": ["0"]}, scale={"g": {"goal": 0.25, "1": 2.0}})["g"]
    torch.testing.assert_close(b.radius, torch.tensor([0.0, 0.8, 0.1, 0.1]))
    with pytest.raises(MadistillError, match="attack.scale names 'nope'"):
        group_budgets(0.4, {"g": layout}, scale={"g": {"nope": 2.0}})
    with pytest.raises(MadistillError, match="attack.scale names groups"):
        group_budgets(0.4, {"g": layout}, scale={"h": {"goal": 2.0}})


def test_transform_attacks_only_live_victims_on_chosen_steps():
    team = TeamPolicy([GROUP], {"g": _mlp()}, {"g": ObsNormalizer(D, enabled=False)})
    obs = {"g": torch.randn(64, 2, D)}
    active = torch.ones(64, 2, dtype=torch.bool)
    active[:8, 0] = False  # a dead victim is never perturbed
    ctx = StepContext(team, 0, np.zeros(64), {"g": active}, torch.Generator().manual_seed(0))
    budget = {"g": Budget.build(0.5, D)}
    out = AttackTransform(Attack("random"), ["a_0"], budget)(obs, ctx)["g"]
    changed = (out != obs["g"]).any(-1)
    assert not changed[:, 1].any() and not changed[:8, 0].any() and changed[8:, 0].all()
    half = AttackTransform(Attack("random"), ["a_0", "a_1"], budget, frequency=0.5)(obs, ctx)["g"]
    share = float((half != obs["g"]).any(-1).all(-1)[8:].float().mean())
    assert 0.3 < share < 0.7
    with pytest.raises(MadistillError, match="not agents"):
        AttackTransform(Attack("random"), ["ghost"], budget)(obs, ctx)
    assert victim_sets(["all", "each", "a_0+a_1"], ["a_0", "a_1"]) == {
        "all": ["a_0", "a_1"], "a_0": ["a_0"], "a_1": ["a_1"], "a_0+a_1": ["a_0", "a_1"]}


def test_constant_offset_is_one_budget_corner_held_over_steps_on_victims_only(monkeypatch):
    team = TeamPolicy([GROUP], {"g": _mlp()}, {"g": ObsNormalizer(D, enabled=False)})
    budget = {"g": Budget.build(torch.linspace(0.1, 0.8, D).tolist(), D, excluded=[3])}
    offset = ConstantOffset(["a_1"], budget, seed=0)
    ctx = StepContext(team, 0, np.zeros(16), {"g": torch.ones(16, 2, dtype=torch.bool)}, torch.Generator())
    deltas = []
    for _ in range(3):
        obs = {"g": torch.randn(16, 2, D)}
        deltas.append(offset(obs, ctx)["g"] - obs["g"])
    assert torch.all(deltas[0][:, 0] == 0)  # a_0 is not a victim
    assert torch.allclose(deltas[0][:, 1].abs(), budget["g"].radius.expand(16, D))  # a corner: every feature at +-eps
    assert torch.all(deltas[0][:, 1, 3] == 0)  # excluded feature
    assert all(torch.allclose(d, deltas[0]) for d in deltas)  # the same offset at every step and in every copy
    other = ConstantOffset(["a_1"], budget, seed=1)(obs, ctx)["g"] - obs["g"]
    assert not torch.allclose(other, deltas[0])  # another candidate, another corner

    # the "offsets" attack: per episode seed, the worst candidate
    from madistill.attacks import robustness
    from madistill.envs.episodes import EpisodeRecord

    def fake_run(venv, team, episodes, seed, transforms=()):
        k = transforms[0].generator.initial_seed() - seed  # candidate index
        return [EpisodeRecord(seed + i, 5, {"a_0": float((i * 7 + k * 3) % 5)}) for i in reversed(range(episodes))]

    monkeypatch.setattr(robustness, "run_episodes", fake_run)
    recs = robustness.worst_offsets(None, team, ["a_1"], budget, 3, 4, 100)
    assert [r.seed for r in recs] == [100, 101, 102, 103]
    assert [r.team_return for r in recs] == [min((i * 7 + k * 3) % 5 for k in range(3)) for i in range(4)]


@pytest.mark.slow
def test_masking_checks_fire_on_a_quantising_policy_and_stay_silent_on_a_plain_mlp():
    budget, pgd = Budget.build(0.5, D), Attack()
    _, plain_flags = probe(_mlp(), X, budget, pgd, torch.Generator().manual_seed(0))
    reached, q_flags = probe(_quantised(), X, budget, pgd, torch.Generator().manual_seed(0))
    assert plain_flags == []
    names = {f.name for f in q_flags}
    assert {"zero_gradients", "gradient_free_stronger"} <= names
    assert reached["fgsm"] == 0.0 and reached["zero_gradient_share"] == 1.0


def test_probe_on_a_box_policy_uses_fgsm_and_raises_no_flag():
    reached, flags = probe(_mlp(group=BOX_GROUP), X, Budget.build(0.3, D), Attack(), torch.Generator().manual_seed(0))
    assert flags == []
    assert reached["pgd"] >= reached["fgsm"] > 0.5 * reached["pgd"]


class Squared(MLPPolicy):
    """Reads its observation squared: at x = 0 every input gradient is zero, a step away they are not."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return super().forward(obs.pow(2))


def test_probe_reports_an_attack_that_leaves_the_actions_unchanged_as_degenerate():
    """FGSM on the cross-entropy of a Discrete policy steps along the clean gradient; where the policy is
    stationary at the observations (not masked: PGD's random starts find gradients) it changes nothing, and
    the probe reports that attack instead of comparing it."""
    policy = Squared(GROUP, {"hidden_sizes": [32], "activation": "tanh"})
    reached, flags = probe(policy, torch.zeros(64, D), Budget.build(0.5, D), Attack(), torch.Generator().manual_seed(0))
    assert reached["fgsm"] == 0.0 and reached["pgd"] > 0 and reached["zero_gradient_share"] == 0.0
    assert [(f.name, f.detail.split()[0]) for f in flags] == [(DEGENERATE, "fgsm")]


def test_return_checks_do_not_rest_a_flag_on_an_attack_that_changed_nothing():
    """FGSM left every episode as it was clean while PGD raised the return: no evidence that PGD is weaker
    than FGSM; the check reports FGSM as degenerate, and the robustness result keeps it apart from flags."""
    from madistill.attacks.robustness import RobustnessResult

    clean = -20 + np.random.default_rng(0).normal(0, 0.3, 50)
    returns = {"fgsm": {0.5: clean.copy()}, "pgd": {0.5: clean + 5}}
    flags = return_checks(returns, clean=clean, random=-40)
    assert [f.name for f in flags] == [DEGENERATE] and "fgsm" in flags[0].detail
    returns["fgsm"][0.5][0] -= 1e-3  # FGSM changed one episode: it is evidence again
    assert [f.name for f in return_checks(returns, clean=clean, random=-40)] == ["pgd_weaker_than_fgsm"]
    res = RobustnessResult(float(clean.mean()), -40.0, {})
    res.add_checks("all", flags)
    assert res.flags == {"all": []} and res.degenerate == {"all": flags}


def test_return_level_checks():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.3, 100)
    sound = {"fgsm": {0.5: -20 + base}, "pgd": {0.1: -12 + base, 0.5: -25 + base, 3.0: -45 + base},
             "pgd_strong": {0.5: -25.2 + base}, "spsa": {0.5: -21 + base}, "transfer": {0.5: -18 + base}}
    clean = -10 + base
    assert return_checks(sound, clean=clean, random=-40, collapse_eps=3.0) == []
    masked = {"fgsm": {0.5: -20 + base}, "pgd": {0.1: -11 + base, 0.5: -12 + base, 3.0: -11 + base},
              "pgd_strong": {0.5: -19 + base}, "spsa": {0.5: -30 + base}, "transfer": {0.5: -16 + base}}
    names = {f.name for f in return_checks(masked, clean=clean, random=-40, collapse_eps=3.0)}
    assert names == {"pgd_weaker_than_fgsm", "pgd_not_converged", "gradient_free_stronger", "transfer_stronger", "no_collapse"}
    noisy = {"fgsm": {0.5: -12 + rng.normal(0, 20, 100)}, "pgd": {0.5: -12 + base}}
    assert return_checks(noisy, clean=clean, random=-40) == []  # noise alone never flags


def _agent_rows(report: str, agents: list[str]) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """The report's per-agent table: (victims, eps) -> (worst attack, per-agent returns as printed)."""
    lines = report.splitlines()
    start = lines.index("| victims | eps | attack | " + " | ".join(agents) + " |") + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        victims, eps, attack, *values = (c.strip() for c in line.strip("|").split("|"))
        rows[victims, eps] = (attack, values)
    return rows


def test_report_and_figure_show_per_agent_returns_under_the_worst_case():
    from madistill.attacks.robustness import RobustnessResult, curves_figure, markdown_report

    # budgets 0.1 and 1; eps 3 is the collapse check's, where PGD alone runs: no worst case there
    res = RobustnessResult(-10.0, -40.0, {"a_0": -4.0, "a_1": -6.0}, budgets=(0.1, 1.0))
    res.episodes = {"all": {"pgd": {0.1: np.array([-20.0, -22.0]), 1.0: np.array([-30.0, -32.0]),
                                    3.0: np.array([-25.0, -25.0])},
                            "fgsm": {0.1: np.array([-15.0, -15.0]), 1.0: np.array([-35.0, -35.0])}}}
    res.agent_returns = {"all": {"pgd": {0.1: {"a_0": -12.347, "a_1": -8.652}, 1.0: {"a_0": -1.0, "a_1": -30.0},
                                         3.0: {"a_0": -5.0, "a_1": -5.0}},
                                 "fgsm": {0.1: {"a_0": -7.0, "a_1": -8.0}, 1.0: {"a_0": -20.004, "a_1": -14.996}}}}
    rows = _agent_rows(markdown_report({"teacher": res}, "env", 2), ["a_0", "a_1"])
    assert rows == {("clean", ""): ("", ["-4.00", "-6.00"]), ("all", "0.1"): ("pgd", ["-12.35", "-8.65"]),
                    ("all", "1"): ("fgsm", ["-20.00", "-15.00"])}
    agents = res.to_dict()["agent_returns"]["all"]
    assert agents["pgd"]["0.1"] == {"a_0": -12.347, "a_1": -8.652} and agents["fgsm"]["1.0"]["a_1"] == -14.996
    fig = curves_figure({"teacher": res}, "all", "env")
    lines = {ln.get_label(): ln for ln in fig.axes[1].lines}  # bottom row: one line per agent
    assert list(lines["a_0"].get_xdata()) == [0.0, 0.1, 1.0]
    assert list(lines["a_0"].get_ydata()) == [-4.0, -12.347, -20.004]
    assert list(lines["a_1"].get_ydata()) == [-6.0, -8.652, -14.996]
    worst = next(ln for ln in fig.axes[0].lines if ln.get_label() == "worst case")
    assert list(worst.get_xdata()) == [0.1, 1.0] and list(worst.get_ydata()) == [-21.0, -35.0]


@pytest.mark.slow
def test_attack_command_reports_curves_worst_case_and_checks(cli, tmp_path):
    from conftest import tiny

    teacher = tmp_path / "t"
    rc, _, err = cli("train", *tiny("teacher.total_agent_steps=1000"), f"hydra.run.dir={teacher}")
    assert rc == 0, err
    run = tmp_path / "a"
    rc, out, err = cli("attack", *tiny(f"attack.policy={teacher}", "attack.episodes=4", "attack.eps=[0.2,1.0]",
                                       "attack.methods=[random,fgsm,pgd,critic,spsa,transfer,offsets]",
                                       "attack.offset_candidates=3",
                                       "attack.victims=[all,speaker_0]", "attack.steps=3", "attack.restarts=1",
                                       "attack.spsa_samples=4", "attack.probe_observations=64",
                                       "+attack.exclude.speaker=[goal_0]", "logger=default", "logger.progress=false"),
                       f"hydra.run.dir={run}")
    assert rc == 0, err
    data = json.loads((run / "reports" / "robustness.json").read_text())
    res = data["results"]["teacher"]
    assert set(res["returns"]) == {"all", "speaker_0"}
    assert set(res["returns"]["all"]) == {"random", "fgsm", "pgd", "critic", "spsa", "offsets", "pgd_strong"}
    assert set(res["returns"]["all"]["pgd"]) == {"0.2", "1.0", "3.0"}  # 3.0: the collapse check
    assert any("transfer" in s for s in res["skipped"])  # no student to transfer from
    worst = res["worst_case"]["all"]["1.0"]  # over the attacks on all and on its subset speaker_0
    assert worst[1] == min(v["1.0"] for s in ("all", "speaker_0") for v in res["returns"][s].values() if "1.0" in v)
    assert res["worst_case_from"]["all"]["1.0"] in ("all", "speaker_0")
    report = (run / "reports" / "robustness.md").read_text()
    assert "Gradient-masking checks" in report
    # the collapse check's budget is no budget of the suite: its column says so and has no worst case
    assert "| attack | eps 0.2 | eps 1 | eps 3 (collapse check, PGD only) |" in report
    assert all(ln.endswith(") |  |") for ln in report.splitlines() if ln.startswith("| **worst case** |"))
    rows = _agent_rows(report, list(res["clean_agents"]))
    assert rows.pop(("clean", "")) == ("", [f"{res['clean_agents'][a]:.2f}" for a in res["clean_agents"]])
    assert set(rows) == {(v, e) for v in ("all", "speaker_0") for e in ("0.2", "1")}  # eps 3: no worst case
    for (v, e), (attack, values) in rows.items():
        key = str(float(e))
        assert attack == res["worst_case"][v][key][0]
        subset = res["worst_case_from"][v][key]
        assert values == [f"{res['agent_returns'][subset][attack.removesuffix(f' on {subset}')][key][a]:.2f}"
                          for a in res["clean_agents"]]
    assert (run / "reports" / "attack_curves_all.png").is_file()
    assert "worst case over the suite" in out
    rc, _, err = cli("attack", *tiny(f"attack.policy={teacher}", "attack.methods=[pgd,deepfool]"), f"hydra.run.dir={tmp_path / 'b'}")
    assert rc == 2 and "attack.methods cannot be 'deepfool'" in err


SL_SPEC = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 5}, name="sl")


def _sl_team(venv: MultiAgentVecEnv) -> TeamPolicy:
    """A small untrained speaker-listener team."""
    groups = venv.groups
    return TeamPolicy(groups, {g.name: MLPPolicy(g, {"hidden_sizes": [8], "activation": "tanh"}) for g in groups},
                      {g.name: ObsNormalizer(g.obs_dim) for g in groups})


LISTENER_EXCLUDED = [0, 3]


def _sl_budgets(team: TeamPolicy) -> dict[str, Budget]:
    """eps 0.5 everywhere but on the listener's excluded features."""
    return {g.name: Budget.build(0.5, g.obs_dim, excluded=LISTENER_EXCLUDED if g.name == "listener" else ())
            for g in team.groups}


def test_learned_adversary_env_rewards_minus_team_reward_and_transform_respects_budget_and_timing(tmp_path):
    from madistill.attacks.learned import AdversaryEnv, LearnedAdversary, train_adversary
    from madistill.evaluate.evaluator import run_episodes

    spec = SL_SPEC
    with MultiAgentVecEnv(spec, 4, num_workers=0) as venv:
        team = _sl_team(venv)
        budgets = _sl_budgets(team)
        env = AdversaryEnv(spec, team, ["listener_0"], budgets)
        obs, _ = env.reset(seed=3)
        assert obs.shape == (11,) and env.action_space.shape == (11,)
        _, r, *_ = env.step(np.zeros(11, np.float32))  # zero action: the team acts on clean observations
        from madistill.envs.factory import make_env
        from madistill.envs.groups import flatten_obs

        twin = make_env(spec)
        raw, _ = twin.reset(seed=3)
        acts = {}
        for agent, o in raw.items():
            g = team.group_of[agent]
            x = team.normalizers[g].normalize(torch.as_tensor(flatten_obs(twin.observation_space(agent), o))[None])
            acts[agent] = int(team[g](x).argmax(-1))
        _, rewards, *_ = twin.step(acts)
        assert r == pytest.approx(-np.mean(list(rewards.values())))
        model = train_adversary(spec, team, ["listener_0"], budgets, steps=256, n_envs=2, ppo_kwargs={"n_steps": 64, "batch_size": 64})

        def spied(frequency: float) -> list[tuple[dict, dict]]:
            """(observations in, observations out) of every step of 16 episodes under the adversary."""
            seen = []

            class Spy(LearnedAdversary):
                def __call__(self, o, ctx):
                    out = super().__call__(o, ctx)
                    seen.append((o, out))
                    return out

            run_episodes(venv, team, 16, 0, transforms=[Spy(model, ["listener_0"], budgets, frequency)])
            return seen

        every, half = spied(1.0), spied(0.5)
    for before, after in every + half:
        assert torch.equal(before["speaker"], after["speaker"])  # not a victim
        assert torch.all((after["listener"] - before["listener"]).abs() <= 0.5 + 1e-6)
        assert torch.equal(before["listener"][..., LISTENER_EXCLUDED], after["listener"][..., LISTENER_EXCLUDED])

    def attacked_share(seen: list[tuple[dict, dict]]) -> float:
        return float(torch.cat([(a["listener"] != b["listener"]).any(-1).flatten() for b, a in seen]).float().mean())

    assert attacked_share(every) > 0.9  # every live step (a finished copy's padding is left alone)
    assert 0.3 < attacked_share(half) / attacked_share(every) < 0.7  # attack.frequency=0.5: about half of them


def test_adversary_env_applies_the_perturbation_at_the_configured_share_of_steps():
    from madistill.attacks.learned import AdversaryEnv

    spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 25}, name="sl")
    with MultiAgentVecEnv(spec, 1, num_workers=0) as venv:
        team = _sl_team(venv)
    budgets = _sl_budgets(team)

    def attacked_share(frequency: float) -> float:
        env = AdversaryEnv(spec, team, ["listener_0"], budgets, frequency)
        listener = env.team["listener"]
        acted_on: list[torch.Tensor] = []
        act = listener.act

        def recording_act(x: torch.Tensor, **kw) -> torch.Tensor:
            acted_on.append(x[0].clone())
            return act(x, **kw)

        listener.act = recording_act  # the observation the listener really acts on
        clean, _ = env.reset(seed=0)  # the adversary observes the victim's clean normalised observation
        perturbed = []
        for _ in range(100):
            obs, _, term, trunc, _ = env.step(np.ones(11, np.float32))
            perturbed.append(not torch.equal(acted_on[-1], torch.as_tensor(clean)))
            clean = env.reset()[0] if term or trunc else obs
        return float(np.mean(perturbed))

    assert attacked_share(1.0) == 1.0
    assert attacked_share(0.0) == 0.0
    assert 0.35 < attacked_share(0.5) < 0.65


def _device_and_tensors(team: TeamPolicy) -> list[tuple[torch.Tensor, torch.device, torch.Tensor]]:
    return [(p, p.device, p.detach().clone()) for p in team.parameters()]


def test_learned_adversary_trains_on_a_copy_and_leaves_the_callers_team_alone(tmp_path, monkeypatch):
    from madistill.attacks.learned import AdversaryEnv, train_adversary

    # SB3's default logger would create an empty SB3-<time> folder in the temporary directory
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    with MultiAgentVecEnv(SL_SPEC, 1, num_workers=0) as venv:
        team = _sl_team(venv)
    budgets = _sl_budgets(team)
    before = _device_and_tensors(team)
    env = AdversaryEnv(SL_SPEC, team, ["listener_0"], budgets)
    assert env.team is not team
    assert not any(p is q for p in env.team.parameters() for q in team.parameters())
    train_adversary(SL_SPEC, team, ["listener_0"], budgets, steps=64, n_envs=1, ppo_kwargs={"n_steps": 32, "batch_size": 32})
    after = list(team.parameters())
    assert len(after) == len(before)
    for p, (q, device, value) in zip(after, before):
        assert p is q and p.device == device and torch.equal(p.detach(), value)
    assert list(tmp_path.glob("SB3-*")) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_learned_adversary_leaves_a_cuda_team_on_cuda():
    from madistill.attacks.learned import train_adversary

    with MultiAgentVecEnv(SL_SPEC, 1, num_workers=0) as venv:
        team = _sl_team(venv).to("cuda")
    budgets = {g.name: Budget.build(0.5, g.obs_dim, device="cuda") for g in team.groups}
    train_adversary(SL_SPEC, team, ["listener_0"], budgets, steps=64, n_envs=1, ppo_kwargs={"n_steps": 32, "batch_size": 32})
    assert all(p.is_cuda for p in team.parameters())


def test_attack_command_runs_the_transfer_attack_between_a_teacher_and_its_student(cli, tmp_path):
    from conftest import tiny

    run = tmp_path / "t"
    rc, _, err = cli("train", *tiny("teacher.total_agent_steps=1000"), f"hydra.run.dir={run}")
    assert rc == 0, err
    rc, _, err = cli("distill", *tiny(f"distill.teacher={run}", "distill.rounds=1", "distill.updates_per_round=5"),
                     f"hydra.run.dir={run}")
    assert rc == 0, err
    out = tmp_path / "a"
    rc, _, err = cli("attack", *tiny(f"attack.policy={run}", "attack.episodes=4", "attack.eps=[1.0]",
                                     "attack.methods=[pgd,transfer]", "attack.victims=[all]", "attack.steps=3",
                                     "attack.restarts=1", "attack.checks=false"), f"hydra.run.dir={out}")
    assert rc == 0, err
    results = json.loads((out / "reports" / "robustness.json").read_text())["results"]
    assert set(results) == {"teacher", "student"}
    for res in results.values():  # each is the other's surrogate
        assert res["skipped"] == []
        returns = res["returns"]["all"]
        assert set(returns) == {"pgd", "transfer"}
        assert returns["transfer"]["1.0"] != pytest.approx(res["clean"], abs=0.1)
        # the same PGD on the same episodes: only the policy it is crafted on differs
        assert returns["transfer"]["1.0"] != pytest.approx(returns["pgd"]["1.0"], abs=0.1)
    # a student attacked with its surrogate and critic given: its teacher is not attacked as well
    student, teacher = run / "policies" / "student", run / "policies" / "teacher"
    alone = tmp_path / "s"
    rc, _, err = cli("attack", *tiny(f"attack.policy={student}", f"attack.critic={teacher}", f"attack.transfer_from={teacher}",
                                     "attack.episodes=4", "attack.eps=[1.0]", "attack.methods=[transfer]", "attack.victims=[all]",
                                     "attack.steps=3", "attack.restarts=1", "attack.checks=false"), f"hydra.run.dir={alone}")
    assert rc == 0, err
    res = json.loads((alone / "reports" / "robustness.json").read_text())["results"]
    assert list(res) == ["student"]
    assert res["student"]["returns"]["all"]["transfer"]["1.0"] == results["student"]["returns"]["all"]["transfer"]["1.0"]


def test_every_suite_attack_changes_the_episodes_of_a_box_team(make_cfg):
    """On speaker-listener with continuous actions, every per-step attack of the suite (FGSM included) changes
    the team's episodes, and the masking checks neither report a degenerate attack nor flag a sound one."""
    from madistill.attacks.robustness import evaluate_robustness, evaluations
    from madistill.envs.features import feature_layouts
    from madistill.evaluate.evaluator import run_episodes

    spec = EnvSpec("mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 10, "continuous_actions": True}, name="sl")
    ac = make_cfg("attack.methods=[random,fgsm,pgd,spsa]", "attack.eps=[0.3]", "attack.victims=[all]", "attack.episodes=4",
                  "attack.steps=3", "attack.restarts=1", "attack.spsa_samples=4", "attack.probe_observations=64",
                  "attack.collapse_eps=0").attack
    with MultiAgentVecEnv(spec, 2, num_workers=0) as venv:
        torch.manual_seed(0)
        team = TeamPolicy(venv.groups, {g.name: MLPPolicy(g, {"hidden_sizes": [16], "activation": "tanh"}) for g in venv.groups},
                          {g.name: ObsNormalizer(g.obs_dim, enabled=False) for g in venv.groups})
        assert not any(g.discrete for g in team.groups)
        steps = []  # the progress bar's steps, which the stages size with evaluations()
        res = evaluate_robustness(venv, team, feature_layouts(venv.groups), ac, random_return=-100.0, seed=0,
                                  progress=type("Bar", (), {"update": lambda self, n: steps.append(n)})())
        clean = np.array([r.team_return for r in run_episodes(venv, team, 4, 0)])
    assert sum(steps) == evaluations(ac, 1) == 5  # 4 attacks at 1 eps, and the stronger PGD of the checks
    for attack, by_eps in res.episodes["all"].items():
        assert not np.array_equal(by_eps[0.3], clean), attack
    assert all(p["fgsm"] > 0.5 * p["pgd"] for p in res.probes.values()), res.probes
    assert not any(res.degenerate.values()) and not any(res.flags.values()), (res.degenerate, res.flags)
