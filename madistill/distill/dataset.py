"""Distillation data: teacher rollouts, then DAgger rounds in which the student acts, every visited
observation labelled by the teacher (its action-head output and its perturbation saliency)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from madistill.explain.saliency import SaliencyLabeller
from madistill.policies.base import Policy, TeamPolicy


class MixedPolicy(Policy):
    """DAgger's behaviour policy: per agent and step, the teacher acts with probability ``beta``, else the
    student (Ross et al. 2011). Draws come from its own seeded generator."""

    def __init__(self, teacher: Policy, student: Policy, beta: float, generator: torch.Generator):
        super().__init__()
        self.group = student.group
        self.teacher, self.student, self.beta, self.generator = teacher, student, beta, generator

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        student = self.student(obs)
        if self.beta <= 0:
            return student
        use_teacher = torch.rand(obs.shape[0], 1, generator=self.generator, device=obs.device) < self.beta
        return torch.where(use_teacher, self.teacher(obs), student)

    def log_std(self) -> torch.Tensor | None:
        return self.student.log_std()


def mixed_team(teacher: TeamPolicy, student: TeamPolicy, beta: float, seed: int) -> TeamPolicy:
    """The team that acts in a DAgger round (``beta = 1``: the teacher alone, ``0``: the student alone)."""
    if beta >= 1:
        return teacher
    gen = torch.Generator(device=teacher.device).manual_seed(seed)
    policies = {g.name: MixedPolicy(teacher[g.name], student[g.name], beta, gen) for g in teacher.groups}
    return TeamPolicy(teacher.groups, policies, teacher.normalizers)


@dataclass
class GroupData:
    """One group's labelled observations (agents of the group pooled; dead agents never recorded)."""

    obs: torch.Tensor  # [M, d] normalised observations
    teacher_head: torch.Tensor  # [M, n] teacher logits (Discrete) or mean (Box)
    saliency: torch.Tensor  # [M, G] teacher perturbation saliency per feature group, in [0, 1]
    round: torch.Tensor  # [M] DAgger round that visited the observation
    heldout: torch.Tensor  # [M] bool: kept out of training, used for agreement and saliency metrics
    # [M] the action the collection's lookahead forced on the observation's agent (distill.adv_collect_targets),
    # -1 where none: the adversarial term forces it on the student again
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.obs)

    def cat(self, other: GroupData) -> GroupData:
        return GroupData(*(torch.cat([a, b]) for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return self.obs, self.teacher_head, self.saliency, self.round, self.heldout, self.target

    def select(self, mask: torch.Tensor) -> GroupData:
        return GroupData(*(f[mask] for f in self.fields()))


def label(
    teacher: TeamPolicy,
    obs: dict[str, torch.Tensor],
    labeller: SaliencyLabeller,
    round_index: int,
    heldout_fraction: float,
    generator: torch.Generator,
    targets: dict[str, torch.Tensor] | None = None,
) -> dict[str, GroupData]:
    """Teacher labels for one round's raw observations (stored normalised), with a random held-out share, and
    the collection's forced ``targets`` per observation where it recorded them (-1 elsewhere)."""
    out = {}
    with torch.no_grad():
        for name, raw in obs.items():
            policy = teacher[name]
            x = teacher.normalizers[name].normalize(raw)
            head, saliency = labeller.heads_and_saliency(policy, name, x)
            held = torch.rand(len(x), generator=generator) < heldout_fraction
            none = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
            target = targets[name].to(x.device) if targets and name in targets else none
            out[name] = GroupData(
                x, head, saliency, torch.full((len(x),), round_index, device=x.device), held.to(x.device), target
            )
    return out


def rounds_beta(rounds: int, beta_start: float, beta_decay: float) -> list[float]:
    """Probability that the teacher acts in each round: 1 in round 0, then ``beta_start * beta_decay^(r-1)``."""
    return [1.0] + [float(beta_start * beta_decay ** (r - 1)) for r in range(1, rounds)]
