"""The purification defence: denoisers stored as JSON + safetensors, the purified policy and the attack views
(through it, BPDA, EOT, undefended), a purifier that removes a perturbation exactly, and the purify stage."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from gymnasium import spaces

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack, Objective
from madistill.envs.factory import EnvSpec
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import TeamPolicy
from madistill.policies.mlp import MLPPolicy
from madistill.policies.purified import (
    Denoiser,
    Purifier,
    attack_view,
    purified_team,
    train_denoiser,
)
from madistill.policies.store import PURIFIER_MANIFEST, load_purifier, save_purifier

D = 4
GROUP = AgentGroup("g", ("a_0",), spaces.Box(-np.inf, np.inf, (D,), np.float32), spaces.Discrete(3))
ARCH = {"hidden_sizes": [16], "activation": "tanh", "noise": 0.0, "clip": False}


def _denoiser(seed: int = 0, **arch) -> Denoiser:
    """A denoiser with random weights everywhere (the real one zero-initialises its last layer)."""
    torch.manual_seed(seed)
    den = Denoiser(D, {**ARCH, **arch})
    for p in den.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return den


def _policy(seed: int = 1) -> MLPPolicy:
    torch.manual_seed(seed)
    return MLPPolicy(GROUP, {"hidden_sizes": [8], "activation": "tanh"})


def _team(policy: MLPPolicy, normalizer: ObsNormalizer | None = None) -> TeamPolicy:
    return TeamPolicy([GROUP], {"g": policy}, {"g": normalizer or ObsNormalizer(D)})


def test_a_purifier_round_trips_through_json_and_safetensors_without_unpickling(tmp_path, monkeypatch):
    den = _denoiser(noise=0.3, clip=True)
    den.low.fill_(-2.0)
    den.high.fill_(1.5)
    norm = ObsNormalizer(D)
    norm.update(np.random.default_rng(0).normal(size=(50, D)))
    save_purifier(tmp_path / "run" / "purifier", Purifier({"g": den}, {"g": norm}), EnvSpec("x.y", {}, name="e"))
    assert sorted(p.name for p in (tmp_path / "run" / "purifier").iterdir()) == sorted([PURIFIER_MANIFEST, "g.safetensors"])

    def refuse(*args, **kwargs):
        raise AssertionError("loading a purifier must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_purifier(tmp_path / "run")  # a purify run directory: its purifier/ is found
    assert loaded.source == str(tmp_path / "run" / "purifier")
    assert loaded["g"].arch == den.arch and loaded["g"].noise == 0.3
    for k, v in den.state_dict().items():
        assert torch.equal(loaded["g"].state_dict()[k], v)
    assert np.array_equal(loaded.normalizers["g"].mean, norm.mean)
    x = torch.randn(5, D)
    assert torch.equal(loaded["g"](x, torch.Generator().manual_seed(3)), den(x, torch.Generator().manual_seed(3)))


def test_loading_a_directory_without_a_purifier_fails_in_one_line(tmp_path):
    with pytest.raises(MadistillError, match="holds no purifier.json: pass a purifier directory"):
        load_purifier(tmp_path)


def test_the_purified_policy_is_the_policy_applied_to_the_purified_observation():
    den, policy = _denoiser(), _policy()
    team = purified_team(_team(policy), Purifier({"g": den}, {"g": ObsNormalizer(D)}))
    x = torch.randn(7, D)
    assert torch.allclose(team["g"](x), policy(den(x)))
    assert team["g"].acting_parameters == policy.acting_parameters + sum(p.numel() for p in den.parameters())


def test_the_bpda_gradient_is_the_undefended_policys_gradient_at_the_purified_point():
    den, policy = _denoiser(), _policy()
    team = purified_team(_team(policy), Purifier({"g": den}, {"g": ObsNormalizer(D)}))
    bpda = attack_view(team, "bpda")["g"]
    x = torch.randn(6, D)
    assert torch.equal(bpda(x), team["g"](x))  # the same forward pass
    target = torch.tensor([0, 1, 2, 0, 1, 2])  # the targeted attack's objective: log pi(target | x)

    def gradient(policy, at):
        return Objective("target", policy, x, None, target=target).gradient(at)

    want = gradient(policy, den(x).detach())
    assert torch.allclose(gradient(bpda, x), want, atol=1e-6)
    # through the purifier the gradient differs: the denoiser's Jacobian is not the identity
    assert not torch.allclose(gradient(team["g"], x), want, atol=1e-3)


def test_attack_views_undefended_and_eot():
    den, policy = _denoiser(noise=0.5), _policy()
    team = purified_team(_team(policy), Purifier({"g": den}, {"g": ObsNormalizer(D)}), seed=5)
    assert attack_view(team, "ignore")["g"] is policy
    assert attack_view(_team(policy), "bpda") is None  # nothing purified: the attacks craft on the team itself
    eot = attack_view(team, "through", samples=4, seed=9)["g"]
    x = torch.randn(3, D)
    draws = torch.Generator().manual_seed(9)  # the view's stream: one draw of noise for the 4 stacked copies
    noisy = x.repeat(4, 1) + 0.5 * torch.randn((12, D), generator=draws)
    heads = policy(noisy + den.net(noisy)).reshape(4, 3, -1)
    assert torch.allclose(eot(x), heads.mean(0), atol=1e-6)
    deterministic = purified_team(_team(policy), Purifier({"g": _denoiser()}, {"g": ObsNormalizer(D)}))
    with pytest.raises(MadistillError, match="set purify.eot_samples=1, or train a randomised one"):
        attack_view(deterministic, "through", samples=4)


def test_a_purifier_is_refused_in_front_of_a_policy_normalised_differently():
    other = ObsNormalizer(D)
    other.update(np.random.default_rng(0).normal(3.0, 2.0, size=(50, D)))
    with pytest.raises(MadistillError, match="normalised differently from this policy's: train one on this policy's teacher"):
        purified_team(_team(_policy(), other), Purifier({"g": _denoiser()}, {"g": ObsNormalizer(D)}))


def test_purification_removes_a_perturbation_of_features_constant_in_the_clean_data_exactly():
    # Clean data: features 0 and 1 vary, 2 and 3 are constant (a fixed id). A trained denoiser clips every
    # feature to its clean range, so any perturbation of 2 and 3 is removed exactly, and an attack that may
    # only move them does nothing to the purified policy while it moves the undefended one.
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(256, 2, generator=gen), torch.tensor([[0.5, -1.0]]).repeat(256, 1)], 1)
    den = train_denoiser(x, {**ARCH, "clip": True}, eps=1.0, sign_share=0.5, epochs=2, batch_size=64,
                         learning_rate=1e-3, generator=gen)
    delta = torch.zeros(256, D)
    delta[:, 2:] = torch.where(torch.rand(256, 2, generator=gen) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        assert torch.equal(den(x + delta)[:, 2:], x[:, 2:])
    policy = _policy()
    with torch.no_grad():  # make the policy read the constant features strongly
        policy.net[0].weight[:, 2:] *= 20
    team = purified_team(_team(policy), Purifier({"g": den}, {"g": ObsNormalizer(D)}))
    budget = Budget.build(1.0, D, excluded=[0, 1])
    pgd = Attack(steps=10, restarts=2)
    for attacked, moved in ((team["g"], False), (policy, True)):
        x_adv = pgd(attacked, x[:32], budget, torch.Generator().manual_seed(1))
        with torch.no_grad():
            kl = Objective("kl", attacked, x[:32], None)(x_adv)
        assert bool((kl > 1e-3).any()) == moved
        if not moved:
            assert float(kl.abs().max()) == 0.0


@pytest.mark.slow
def test_purify_stage_trains_a_purifier_that_every_stage_puts_in_front_of_the_policies(cli, tmp_path):
    from conftest import tiny

    teacher, run = tmp_path / "t", tmp_path / "p"
    for stage, settings, where in (("train", ["teacher.total_agent_steps=1000"], teacher),
                                   ("purify", [f"purify.teacher={teacher}", "purify.agent_steps=400", "purify.epochs=2",
                                               "purify.hidden_sizes=[16]", "purify.episodes=4"], run)):
        rc, out, err = cli(stage, *tiny(*settings), f"hydra.run.dir={where}")
        assert rc == 0, err
    assert (run / "purifier" / PURIFIER_MANIFEST).is_file() and "purify.purifier=" in out
    report = json.loads((run / "reports" / "purify.json").read_text())
    assert set(report["groups"]) == {"speaker", "listener"}
    assert set(report["clean"]) == {"teacher", "teacher+purifier"}
    for err_at in report["groups"]["speaker"]["linf_error"].values():
        assert err_at["after"] >= 0.0
    runs = {}
    for gradient in ("through", "ignore"):
        runs[gradient] = tmp_path / f"a_{gradient}"
        rc, _, err = cli("attack", *tiny(f"attack.policy={teacher}", "attack.episodes=4", "attack.eps=[1.0]",
                                         "attack.methods=[pgd]", "attack.victims=[all]", "attack.steps=3",
                                         "attack.restarts=1", "attack.checks=false", f"purify.purifier={run}",
                                         f"purify.gradient={gradient}"), f"hydra.run.dir={runs[gradient]}")
        assert rc == 0, err
        meta = json.loads((runs[gradient] / "reports" / "robustness.json").read_text())["meta"]
        assert meta["purifier"] == {"path": str(run), "gradient": gradient, "eot_samples": 1}
    assert "differentiate the undefended policies" in (runs["ignore"] / "reports" / "robustness.md").read_text()
    # evaluate records the purifier: its report, the results' meta, and the command that repeats it
    rc, said, err = cli("evaluate", *tiny(f"eval.policy={teacher}", f"purify.purifier={run}", "eval.episodes=2"),
                        f"hydra.run.dir={tmp_path / 'ev'}")
    assert rc == 0, err
    assert json.loads((tmp_path / "ev" / "reports" / "eval_teacher.json").read_text())["meta"]["purifier"]["path"] == str(run)
    assert f"Purifier {run} in front of every policy" in (tmp_path / "ev" / "reports" / "eval.md").read_text()
    assert f"re-evaluate: madistill evaluate eval.policy={teacher}" in said and f"purify.purifier={run}" in said
    rc, _, err = cli("evaluate", *tiny(f"eval.policy={teacher}", f"purify.purifier={tmp_path}"),
                     f"hydra.run.dir={tmp_path / 'e'}")
    assert rc == 2 and "holds no purifier.json" in err


def test_the_suites_per_step_attacks_craft_on_the_attack_view_and_transfer_on_its_surrogate():
    from madistill.attacks.robustness import suite_transforms
    from madistill.config import AttackConfig

    team = purified_team(_team(_policy()), Purifier({"g": _denoiser()}, {"g": ObsNormalizer(D)}))
    view, surrogate = attack_view(team, "ignore"), _team(_policy(seed=2))
    budgets = {"g": Budget.build(1.0, D)}
    for method, crafted_on in (("pgd", view), ("targeted_lowest", view), ("fgsm", view), ("transfer", surrogate)):
        [transform] = suite_transforms(method, None, team, ["a_0"], budgets, AttackConfig(), 0, surrogate, None,
                                  attacked=view)
        assert transform.surrogate is crafted_on


def test_the_attack_fault_crafts_on_the_view_of_a_purified_team_that_purify_gradient_names():
    from madistill.cascade.faults import AttackFault, Scope
    from madistill.config import AttackConfig
    from madistill.transforms import StepContext

    policy = _policy()
    team = purified_team(_team(policy), Purifier({"g": _denoiser()}, {"g": ObsNormalizer(D)}))
    x, mask = torch.randn(5, D), torch.ones(5, dtype=torch.bool)
    budgets = {"g": Budget.build(0.5, D)}

    def crafted(crafted_on, on: TeamPolicy) -> torch.Tensor:
        fault = AttackFault(Scope(("a_0",), 0), "fgsm", budgets, AttackConfig(), crafted_on)
        ctx = StepContext(on, 0, np.zeros(5, dtype=np.int64), {"g": torch.ones(5, 1, dtype=torch.bool)},
                          torch.Generator().manual_seed(0))
        return fault.corrupt(GROUP, x, mask, ctx)

    undefended = crafted(None, _team(policy))
    assert torch.equal(crafted(lambda t: attack_view(t, "ignore"), team), undefended)
    assert not torch.equal(crafted(None, team), undefended)  # through the purifier: another perturbation
    assert torch.equal(crafted(lambda t: attack_view(t, "through"), team), crafted(None, team))


def test_the_stages_faults_craft_on_the_purify_gradient_view_where_a_purifier_is_set(make_cfg):
    from madistill.stages.faults import fault_env

    team = purified_team(_team(_policy()), Purifier({"g": _denoiser()}, {"g": ObsNormalizer(D)}))
    plain = fault_env(make_cfg("env=relay"), [GROUP], {}, None, "cpu")
    assert plain.crafted_on is None
    guarded = fault_env(make_cfg("env=relay", "purify.purifier=/p", "purify.gradient=ignore"), [GROUP], {}, None, "cpu")
    assert guarded.crafted_on(team)["g"] is team["g"].inner  # the undefended policy, as purify.gradient=ignore says
