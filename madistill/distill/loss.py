"""The distillation loss: divergence(teacher || student) + lambda_igr * selective input-gradient penalty.

With ``lambda_igr = 0`` this is plain policy distillation (the penalty's double backward is skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack, force_targets, training_attack
from madistill.common.divergences import divergence
from madistill.config import AttackConfig, DistillConfig
from madistill.distill.dataset import GroupData
from madistill.distill.digr import igr_penalty, relevance_mask
from madistill.envs.features import FeatureLayout
from madistill.policies.base import Policy

# distill.adv_objective values that train against several attacks: per sample, the worst point of them
COMBINED = {"both": ("kl", "ce"), "all": ("kl", "ce", "targeted_lowest")}


@dataclass(frozen=True)
class DistillLoss:
    """Loss settings (from ``cfg.distill``)."""

    # Defaults are the config's (one source), except lambda_igr: a loss built by hand is plain distillation.
    divergence: str = DistillConfig.divergence
    temperature: float = DistillConfig.temperature
    lambda_igr: float = 0.0
    mask: str = DistillConfig.mask
    topk: int = DistillConfig.topk
    threshold: float = DistillConfig.threshold
    target: str = DistillConfig.target
    adv_weight: float = 0.0  # divergence(teacher(x) || student(x + delta)), delta = PGD on the student
    smooth_weight: float = 0.0  # KL(pi_S(x) || pi_S(x + delta)): the student's own smoothness (SA-PPO style)
    adv_steps: int = DistillConfig.adv_steps  # PGD steps crafting delta during training
    # one of methods.TRAINING_ATTACKS, or several of them (COMBINED): both (kl, ce) | all (kl, ce, targeted_lowest)
    adv_objective: str = DistillConfig.adv_objective
    adv_fgsm: bool = DistillConfig.adv_fgsm  # per sample, also FGSM's point when it hurts more than the PGD's
    adv_candidates: int = AttackConfig.target_candidates  # targeted_lowest: lowest-ranked actions forced at once

    @staticmethod
    def from_config(dc: Any, candidates: int = AttackConfig.target_candidates) -> DistillLoss:
        """The loss of ``cfg.distill``; ``candidates``: ``cfg.attack.target_candidates``, as in the suite."""
        return DistillLoss(
            dc.divergence, dc.temperature, dc.lambda_igr, dc.mask, dc.topk, dc.threshold, dc.target,
            dc.adv_weight, dc.smooth_weight, dc.adv_steps, dc.adv_objective, dc.adv_fgsm, candidates,
        )

    @property
    def adversarial(self) -> bool:
        return self.adv_weight > 0 or self.smooth_weight > 0

    def __call__(
        self,
        student: Policy,
        batch: GroupData,
        layout: FeatureLayout,
        teacher_log_std: torch.Tensor | None = None,
        budget: Budget | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one minibatch: ``divergence``, ``igr`` (lambda > 0), ``adversarial`` and
        ``smoothness`` (with a ``budget`` and their weights > 0), and ``total``."""
        obs = batch.obs.detach().requires_grad_(self.lambda_igr > 0)
        head = student(obs)
        kw = {"discrete": student.group.discrete, "teacher_log_std": teacher_log_std, "student_log_std": student.log_std()}
        div = divergence(self.divergence, batch.teacher_head, head, temperature=self.temperature, **kw).mean()
        terms = {"divergence": div, "total": div}
        if self.lambda_igr > 0:
            relevance = relevance_mask(batch.saliency, layout, self.mask, self.topk, self.threshold)
            actions = teacher_actions(student, batch.teacher_head)
            terms["igr"] = igr_penalty(student, obs, head, actions, relevance, self.target)
            terms["total"] = div + self.lambda_igr * terms["igr"]
        if self.adversarial and budget is not None and float(budget.radius.max()) > 0:
            x_adv = self._perturbed(student, batch, budget, generator, kw)
            head_adv = student(x_adv)
            if self.adv_weight > 0:
                terms["adversarial"] = divergence(self.divergence, batch.teacher_head, head_adv, temperature=self.temperature, **kw).mean()
                terms["total"] = terms["total"] + self.adv_weight * terms["adversarial"]
            if self.smooth_weight > 0:
                own = {**kw, "teacher_log_std": kw["student_log_std"]}  # the student is its own reference here
                terms["smoothness"] = divergence("kl", head.detach(), head_adv, **own).mean()
                terms["total"] = terms["total"] + self.smooth_weight * terms["smoothness"]
        return terms

    def training_attacks(self) -> list[Attack]:
        """The attacks whose per-sample worst point the student trains against: the training attack
        ``adv_objective`` (or each of a ``COMBINED`` one's) and, with ``adv_fgsm``, FGSM."""
        names = COMBINED.get(self.adv_objective, (self.adv_objective,))
        return ([training_attack(n, self.adv_steps, self.adv_candidates) for n in names]
                + ([Attack("fgsm", "ce")] if self.adv_fgsm else []))

    def collection_objective(self) -> str:
        """The training attack an acting team is collected under by default (``distill.adv_collect``):
        ``adv_objective``, for a combined one its greedy-action flip (ce for ``both``, targeted_lowest for
        ``all``), which throws a team off course where a small change of its distribution would not."""
        return {"both": "ce", "all": "targeted_lowest"}.get(self.adv_objective, self.adv_objective)

    def _perturbed(
        self, student: Policy, batch: GroupData, budget: Budget, generator: torch.Generator | None, kw: dict
    ) -> torch.Tensor:
        """The training attack on the student; with a combined ``adv_objective`` (and ``adv_fgsm``), per sample the
        worst (for the distillation target) of its attacks' points (and FGSM's one full step): each finds
        perturbations the others miss, and students trained against PGD alone fall to FGSM. Where the batch
        holds a target the collection's lookahead forced (``batch.target`` >= 0), that target forced on the
        student now (targeted PGD, the training steps) is one more candidate: the harmful action the lookahead
        chose in that state, which the victim-only attacks cannot pick."""
        points = [a(student, batch.obs, budget, generator) for a in self.training_attacks()]
        rows = (batch.target >= 0).nonzero().flatten()
        if len(rows):
            forced = batch.obs.detach().clone()
            forced[rows] = force_targets(student, batch.obs[rows], batch.target[rows], budget, self.adv_steps, generator)
            points.append(forced)
        if len(points) == 1:
            return points[0]
        found = torch.stack(points)
        with torch.no_grad():
            harm = torch.stack([divergence(self.divergence, batch.teacher_head, student(x), temperature=self.temperature, **kw)
                                for x in found])
        if len(rows):  # a sample without a lookahead target has no forced point to choose
            harm[-1, batch.target < 0] = float("-inf")
        return found[harm.argmax(0), torch.arange(found.shape[1], device=found.device)]


def teacher_actions(policy: Policy, teacher_head: torch.Tensor) -> torch.Tensor:
    """The teacher's greedy actions from its stored head (argmax logits / Gaussian mean)."""
    return teacher_head.argmax(-1) if policy.group.discrete else teacher_head
