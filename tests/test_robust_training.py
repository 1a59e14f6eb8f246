"""Robust training against targeted attacks: the inner adversary of robust distillation (``distill.adv_objective``)
and of robust fine-tuning (``finetune.attack_objective``) is the suite's targeted PGD when asked, one helper for
both (``methods.training_attack``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import test_distill
import torch
from gymnasium import spaces

from madistill.attacks.budget import Budget
from madistill.attacks.methods import TRAINING_ATTACKS, training_attack
from madistill.distill.loss import DistillLoss
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.finetune import collection_attack
from madistill.policies.base import Policy
from madistill.policies.store import read_manifest

teacher_run = test_distill.teacher_run  # the tiny speaker-listener teacher fixture, trained once for this module

GROUP = AgentGroup("g", ("a_0",), spaces.Box(-np.inf, np.inf, (2,), np.float32), spaces.Discrete(3))


class Tied(Policy):
    """Logits ``(0.1 + 3 x0, x1, -3)``: at x = 0 the greedy action 0 (p 0.52) barely beats action 1 (p 0.47).

    Inside the l_inf ball of radius 1 the KL from the clean distribution is about as large at (1, -1), where
    action 0 becomes near certain (KL 1.28), as at (-1, 1), where action 1 does (KL 1.34): PGD on the KL climbs
    to whichever its random start is nearer, so on about half of the observations it *raises* the probability of
    the clean action. Forcing the lowest-ranked reachable action (2 is out of reach, 1 is not) lowers it to 0.02.
    """

    group = GROUP

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.stack([0.1 + 3 * obs[:, 0], obs[:, 1], torch.full_like(obs[:, 0], -3.0)], -1)

    def log_std(self) -> torch.Tensor | None:
        return None


def _clean_action_probability(attack, policy: Policy, x: torch.Tensor, budget: Budget) -> float:
    """Mean probability of the clean greedy action after ``attack``."""
    x_adv = attack(policy, x, budget, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float(policy(x_adv).softmax(-1)[:, 0].mean())


def _inner_adversaries(name: str) -> dict[str, object]:
    """The inner adversary of robust distillation and of robust fine-tuning for one setting value."""
    loss = DistillLoss(adv_weight=1.0, adv_steps=3, adv_objective=name)
    settings = SimpleNamespace(attack_fraction=0.5, eps=1.0, attack_objective=name, steps=3)
    (transform,) = collection_attack([GROUP], {"g": Budget.build(1.0, 2)}, settings, SimpleNamespace(target_candidates=4))
    return {"distill": loss.training_attacks()[0], "finetune": transform.attack}


def test_the_targeted_inner_adversary_lowers_the_clean_action_where_the_kl_pgd_does_not():
    """Same budget and PGD steps (3, one restart, as in training): on ``Tied`` the KL PGD leaves the clean action
    about as likely as it was (it raises it on half the observations), the targeted one makes it unlikely."""
    x, budget = torch.zeros(512, 2), Budget.build(1.0, 2)
    with torch.no_grad():
        clean = float(Tied()(x).softmax(-1)[0, 0])
    assert clean == pytest.approx(0.52, abs=0.01)
    for where in ("distill", "finetune"):
        kl = _clean_action_probability(_inner_adversaries("kl")[where], Tied(), x, budget)
        targeted = _clean_action_probability(_inner_adversaries("targeted_lowest")[where], Tied(), x, budget)
        assert 0.35 < kl < 0.7, where  # about half the rows at 0.98, half at 0.02
        assert targeted < 0.03, where
    assert _inner_adversaries("targeted_random")["distill"].target == "random"


def test_all_trains_per_sample_against_the_worst_of_kl_ce_and_targeted_and_collects_under_the_targeted():
    loss = DistillLoss(adv_weight=1.0, adv_objective="all", adv_candidates=2)
    assert [(a.method, a.objective, a.target) for a in loss.training_attacks()] == [
        ("pgd", "kl", "random"), ("pgd", "ce", "random"), ("targeted", "target", "lowest")]
    assert all(a.restarts == 1 and a.steps == loss.adv_steps for a in loss.training_attacks())
    assert loss.training_attacks()[2].candidates == 2
    assert loss.collection_objective() == "targeted_lowest"
    assert DistillLoss(adv_objective="both").collection_objective() == "ce"
    # the combined harm is per sample the largest: every row at least as far from the teacher as the KL PGD alone
    data = SimpleNamespace(obs=torch.zeros(256, 2), teacher_head=Tied()(torch.zeros(256, 2)).detach(),
                           target=torch.full((256,), -1))
    from madistill.common.divergences import divergence

    def harm(objective: str) -> torch.Tensor:
        x_adv = DistillLoss(adv_weight=1.0, adv_objective=objective)._perturbed(
            Tied(), data, Budget.build(1.0, 2), torch.Generator().manual_seed(0), {"discrete": True})
        with torch.no_grad():
            return divergence("kl", data.teacher_head, Tied()(x_adv), discrete=True)

    assert bool((harm("all") >= harm("kl") - 1e-5).all())


def test_training_attack_names_are_checked_in_one_line():
    assert set(TRAINING_ATTACKS) == {"kl", "ce", "targeted_lowest", "targeted_random"}
    with pytest.raises(MadistillError, match="unknown training attack 'pgd_strong': use one of"):
        training_attack("pgd_strong", 3)


@pytest.mark.parametrize("stage, override, line", [
    ("distill", "distill.adv_objective=targeted_best",
     "distill.adv_objective cannot be 'targeted_best': use distill.adv_objective=<one of kl, ce, both, targeted_lowest, "
     "targeted_random, all>"),
    ("finetune", "finetune.attack_objective=lookahead",
     "finetune.attack_objective cannot be 'lookahead': use finetune.attack_objective=<one of ce, kl, targeted_lowest, "
     "targeted_random, targeted_lookahead, director>"),
    ("distill", "distill.adv_collect_targets=true",
     "distill.adv_collect_targets must be false unless distill.adv_collect > 0 and "
     "distill.adv_collect_objective=targeted_lookahead (the targets are the lookahead's), got True"),
])
def test_inner_adversary_settings_are_refused_in_one_line_listing_the_choices(cli, tmp_path, stage, override, line):
    run = tmp_path / "run"
    rc, out, err = cli(stage, "env=relay", override, f"hydra.run.dir={run}")
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and out == "" and lines == [f"madistill {stage}: error: {line}"]
    assert not run.exists()


def test_robust_distillation_against_the_targeted_adversary_runs_end_to_end(cli, make_cfg, teacher_run, tmp_path,
                                                                            monkeypatch):
    """``distill=robust distill.adv_objective=targeted_lowest``: every update's adversarial term is crafted by the
    targeted PGD (``attack.target_candidates`` candidates) and is non-zero; the CLI saves the student."""
    from madistill.attacks.methods import Attack

    cfg = make_cfg(f"distill.teacher={teacher_run}", "distill=robust", "distill.adv_objective=targeted_lowest",
                   "distill.adv_ramp=0.5", "attack.target_candidates=2")
    used: list[tuple[str, int]] = []
    targeted = Attack._targeted

    def spy(self, policy, x, budget, generator):
        used.append((policy.group.name, self.candidates))
        return targeted(self, policy, x, budget, generator)

    monkeypatch.setattr(Attack, "_targeted", spy)
    trainer = test_distill.trained_distiller(cfg, teacher_run)
    # every update of both groups once eps > 0 (the first update's eps is 0: no attack there)
    assert sorted(set(used)) == [("listener", 2), ("speaker", 2)]
    assert len(used) == 2 * (trainer.total_updates - 1)
    for row in trainer.history:
        for g in ("speaker", "listener"):
            assert row[f"{g}/loss_adversarial"] > 0 and row[f"{g}/loss_smoothness"] > 0

    from conftest import tiny

    run = tmp_path / "distill"
    rc, out, err = cli("distill", *tiny(f"distill.teacher={teacher_run}", "distill=robust",
                                        "distill.adv_objective=all"), f"hydra.run.dir={run}")
    assert rc == 0, err
    assert read_manifest(run / "policies" / "student")["config"]["distill"]["adv_objective"] == "all"


def test_lookahead_targets_are_one_more_candidate_of_the_adversarial_term():
    """``distill.adv_collect_targets``: a sample whose collection recorded a lookahead target gets the worse (for the
    distillation target) of the training PGD's point and that target forced on the student now; a sample without
    one keeps the PGD's point. On ``Tied`` the KL PGD climbs to either corner, the forced action 1 to the slightly
    more harmful one."""
    from madistill.common.divergences import divergence

    x = torch.zeros(256, 2)
    head = Tied()(x).detach()
    target = torch.full((256,), -1)
    target[:128] = 1
    budget, kw = Budget.build(1.0, 2), {"discrete": True, "teacher_log_std": None, "student_log_std": None}
    loss = DistillLoss(adv_weight=1.0)

    def perturbed(t: torch.Tensor) -> torch.Tensor:
        batch = SimpleNamespace(obs=x, teacher_head=head, target=t)
        return loss._perturbed(Tied(), batch, budget, torch.Generator().manual_seed(0), kw)

    def harm(x_adv: torch.Tensor) -> torch.Tensor:
        return divergence("kl", head[: len(x_adv)], Tied()(x_adv), **kw)

    plain, with_targets = perturbed(torch.full((256,), -1)), perturbed(target)
    assert torch.equal(with_targets[128:], plain[128:])  # no target: the PGD point, drawn from the same stream
    assert (harm(with_targets[:128]) >= harm(plain[:128])).all()
    assert (harm(with_targets[:128]) > harm(plain[:128]) + 0.03).float().mean() > 0.25  # the far corner, often
    assert (Tied()(with_targets[:128]).argmax(-1) == 1).all()  # every targeted sample now acts as forced
    assert float(with_targets.abs().max()) <= 1.0 + 1e-6
