"""Distillation data: teacher rollouts, then DAgger rounds in which the student acts, every visited
observation labelled by the teacher (its action-head output and its perturbation saliency)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from madistill.envs.episodes import EpisodeRecord
from madistill.envs.vector import MultiAgentVecEnv
from madistill.explain.saliency import FeatureLayout, perturbation_saliency
from madistill.policies.base import Policy, TeamPolicy
from madistill.rollout import Rollout, Transition
from madistill.transforms import ObsTransform


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

    def __len__(self) -> int:
        return len(self.obs)

    def cat(self, other: GroupData) -> GroupData:
        return GroupData(*(torch.cat([a, b]) for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return self.obs, self.teacher_head, self.saliency, self.round, self.heldout

    def select(self, mask: torch.Tensor) -> GroupData:
        return GroupData(*(f[mask] for f in self.fields()))


@dataclass
class SaliencyLabeller:
    """Labels observations with the teacher's perturbation saliency, with a mean or marginal baseline."""

    layouts: Mapping[str, FeatureLayout]
    baseline: str = "mean"  # mean: the normaliser mean (0 in normalised units); marginal: other observations
    samples: int = 4  # marginal draws per observation
    chunk: int = 4096  # observations per batched forward (bounds memory: chunk * (G + 1) * samples rows) ...
    max_values: int = 2**25  # ... and fewer where their perturbed copies would hold more values (image groups)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @staticmethod
    def from_config(sc: Any, layouts: Mapping[str, FeatureLayout], seed: int) -> SaliencyLabeller:
        """From ``cfg.saliency``, its marginal draws seeded with the run's seed."""
        return SaliencyLabeller(layouts, sc.baseline, sc.baseline_samples, generator=torch.Generator().manual_seed(seed))

    def __call__(self, policy: Policy, group: str, obs: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
        """Saliency ``[M, G]`` of ``policy`` on ``obs``; marginal draws come from ``pool`` (default ``obs``)."""
        return self.heads_and_saliency(policy, group, obs, pool)[1]

    def heads_and_saliency(
        self, policy: Policy, group: str, obs: torch.Tensor, pool: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's heads ``[M, act_dim]`` on ``obs`` and their saliency ``[M, G]``: one clean forward each."""
        layout = self.layouts[group]
        pool = obs if pool is None else pool
        heads, scores = [], []
        copies = (self.samples if self.baseline == "marginal" else 1) * len(layout) * layout.obs_dim
        chunk = max(1, min(self.chunk, self.max_values // copies))
        for start in range(0, len(obs), chunk):
            x = obs[start : start + chunk]
            base = None
            if self.baseline == "marginal":
                idx = torch.randint(len(pool), (self.samples, len(x)), generator=self.generator)
                base = pool[idx.to(pool.device)]
            with torch.no_grad():
                heads.append(policy(x))
            scores.append(perturbation_saliency(policy, x, layout, base, clean=heads[-1]))
        if not heads:
            return obs.new_zeros(0, policy.group.act_dim), obs.new_zeros(0, len(layout))
        return torch.cat(heads), torch.cat(scores)


def collect_round(
    venv: MultiAgentVecEnv,
    acting: TeamPolicy,
    seed: int,
    deterministic: bool,
    agent_steps: int | None = None,
    episodes: int | None = None,
    progress: str | None = None,
    transforms: Sequence[ObsTransform] = (),
) -> tuple[dict[str, torch.Tensor], list[EpisodeRecord]]:
    """Run ``acting`` for at least ``agent_steps`` live agent-steps (or ``episodes`` episodes), its
    observations passed through ``transforms``; returns each group's visited *raw* (untransformed)
    observations ``[M, d]`` (alive agents only) and the finished episodes."""
    visited: dict[str, list[torch.Tensor]] = {g.name: [] for g in venv.groups}

    def record(tr: Transition) -> None:
        for g in venv.groups:
            active = tr.active[g.name].reshape(-1).cpu().numpy()
            visited[g.name].append(torch.as_tensor(tr.raw_obs[g.name].reshape(-1, g.obs_dim)[active]))

    rollout = Rollout(venv, acting, transforms, deterministic=deterministic, seed=seed)
    steps = None
    if agent_steps is not None:
        steps = -(-agent_steps // (venv.num_envs * sum(g.n_agents for g in venv.groups)))
    found = rollout.run(steps=steps, episodes=episodes, on_step=record, progress=progress)
    device = acting.device
    return {g: torch.cat(v).to(device) for g, v in visited.items()}, found


def label(
    teacher: TeamPolicy,
    obs: dict[str, torch.Tensor],
    labeller: SaliencyLabeller,
    round_index: int,
    heldout_fraction: float,
    generator: torch.Generator,
) -> dict[str, GroupData]:
    """Teacher labels for one round's raw observations (stored normalised), with a random held-out share."""
    out = {}
    with torch.no_grad():
        for name, raw in obs.items():
            policy = teacher[name]
            x = teacher.normalizers[name].normalize(raw)
            head, saliency = labeller.heads_and_saliency(policy, name, x)
            held = torch.rand(len(x), generator=generator) < heldout_fraction
            out[name] = GroupData(
                x, head, saliency, torch.full((len(x),), round_index, device=x.device), held.to(x.device)
            )
    return out


def rounds_beta(rounds: int, beta_start: float, beta_decay: float) -> list[float]:
    """Probability that the teacher acts in each round: 1 in round 0, then ``beta_start * beta_decay^(r-1)``."""
    return [1.0] + [float(beta_start * beta_decay ** (r - 1)) for r in range(1, rounds)]


def team_returns(episodes: list[EpisodeRecord]) -> float:
    """Mean team return of ``episodes`` (NaN when none finished)."""
    return float(np.mean([e.team_return for e in episodes])) if episodes else float("nan")
