"""Robust RL fine-tuning of a distilled student (SA-PPO, Zhang et al. 2020).

Distillation can only imitate the teacher. Where robustness needs behaviour the teacher does not have (on
simple_spread_v3 a robust student gives up clean return: README, "Why spread resists"), the student can keep
learning from the env's return instead. Each group's student actor and its teacher's critic become one SB3
actor-critic that the teacher trainer's PPO loop trains (the teacher's normalisers kept fixed, so inputs keep
their units), and before every PPO optimiser step the gradient of SA-PPO's smoothness regulariser is added:

    smooth_weight * KL(pi(x) || pi(x + delta)),  delta = PGD's maximiser of that KL within the budget,

on a minibatch of the rollout's observations, the budget ramped from 0. The result is saved as a student again
(the same MLP, normalisers and teacher link), a drop-in for every stage.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.attacks.transform import AttackTransform
from madistill.common.divergences import divergence
from madistill.common.schedules import linear_ramp
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.policies.base import TeamPolicy
from madistill.policies.mlp import MLPPolicy
from madistill.policies.sb3 import SB3Policy

_ACTOR_PREFIXES = ("mlp_extractor.policy_net.", "action_net.", "log_std")


def actor_pairs(student: MLPPolicy, sb3: ActorCriticPolicy) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Matching parameters (student's, SB3 actor's) of a student MLP and an SB3 actor of its hidden sizes."""
    mine = [m for m in student.net if isinstance(m, nn.Linear)]
    theirs = [m for m in sb3.mlp_extractor.policy_net if isinstance(m, nn.Linear)] + [sb3.action_net]
    if [m.weight.shape for m in mine] != [m.weight.shape for m in theirs]:
        raise MadistillError("the SB3 actor's layers do not match the student's: rebuild it from the student's arch")
    pairs = [(a.weight, b.weight) for a, b in zip(mine, theirs)] + [(a.bias, b.bias) for a, b in zip(mine, theirs)]
    if not student.group.discrete:
        pairs.append((student._log_std, sb3.log_std))
    return pairs


def actor_critic_team(student: TeamPolicy, teacher: TeamPolicy) -> TeamPolicy:
    """Per group an SB3 actor-critic with the student's actor and the teacher's critic, and the teacher's
    normalisers (the student's inputs were normalised with them)."""
    policies = {}
    for g in teacher.groups:
        s, t = student[g.name], teacher[g.name]
        if not isinstance(s, MLPPolicy) or not isinstance(t, SB3Policy):
            raise MadistillError("finetune.policy must be a student (MLP) distilled from an SB3 teacher: pass a distill run")
        if s.encoder is not None:
            raise MadistillError(f"the {g.name!r} student encodes image observations with a CNN, which fine-tuning "
                                 "does not support: use the distilled student as it is")
        if s.arch["activation"] != t.arch["activation"]:
            raise MadistillError(f"the {g.name!r} student uses {s.arch['activation']} and its teacher "
                                 f"{t.arch['activation']}: SB3 gives actor and critic one activation, so fine-tuning "
                                 f"needs a student distilled with student.activation={t.arch['activation']}")
        arch = {**t.arch, "actor_hidden_sizes": list(s.arch["hidden_sizes"])}
        ac = SB3Policy.from_arch(g, arch).to(teacher.device)
        critic = {k: v for k, v in t.sb3.state_dict().items() if not k.startswith(_ACTOR_PREFIXES)}
        missing, unexpected = ac.sb3.load_state_dict(critic, strict=False)
        assert not unexpected and all(k.startswith(_ACTOR_PREFIXES) for k in missing), (missing, unexpected)
        with torch.no_grad():
            for mine, theirs in actor_pairs(s, ac.sb3):
                theirs.copy_(mine)
        policies[g.name] = ac
    return TeamPolicy(teacher.groups, policies, teacher.normalizers)


def student_from_actor(team: TeamPolicy, template: TeamPolicy) -> TeamPolicy:
    """The fine-tuned actors of ``team`` (SB3) as students shaped like ``template``'s, with its normalisers."""
    student = copy.deepcopy(template)
    with torch.no_grad():
        for g in template.groups:
            for mine, theirs in actor_pairs(student[g.name], team[g.name].sb3):
                mine.copy_(theirs)
    return student


class SmoothnessRegulariser:
    """SA-PPO's regulariser on one group's PPO, as a pre-hook of its optimiser's step.

    SB3's ``train()`` has computed and clipped the PPO gradient of a minibatch when the hook runs; it adds the
    gradient of ``weight * KL(pi(x) || pi(x + delta))`` on a minibatch of the same rollout's live observations
    (``delta``: PGD on that KL, one restart), clipped to PPO's ``max_grad_norm`` on its own. The clean
    distribution is the target (detached), so the regulariser pulls the perturbed one toward it.
    """

    def __init__(self, model: PPO, actor: SB3Policy, unit_budget: Budget, settings: Any, generator: torch.Generator):
        self.model, self.actor, self.unit_budget, self.generator = model, actor, unit_budget, generator
        self.weight, self.eps, self.ramp = float(settings.smooth_weight), float(settings.eps), float(settings.ramp)
        if self.weight < 0 or self.eps < 0 or not 0 <= self.ramp <= 1:
            raise MadistillError("finetune.smooth_weight and finetune.eps must be >= 0 and finetune.ramp in [0, 1]")
        self.attack = Attack("pgd", "kl", steps=int(settings.steps), restarts=1)
        self.parameters = [p for n, p in actor.sb3.named_parameters() if n.startswith(_ACTOR_PREFIXES)]
        self.rows = np.random.default_rng(int(generator.initial_seed()))
        model.policy.optimizer.register_step_pre_hook(self)

    def current_eps(self) -> float:
        """The radius now: linear from 0 to ``eps`` over the first ``ramp`` of training."""
        done = 1.0 - float(self.model._current_progress_remaining)
        return linear_ramp(self.eps, done, self.ramp)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        eps = self.current_eps()
        if self.weight == 0 or eps == 0:
            return
        buf = self.model.rollout_buffer
        rows = self.rows.choice(buf.valid_idx, size=min(int(self.model.batch_size), len(buf.valid_idx)), replace=False)
        x = torch.as_tensor(buf.observations[rows, : self.actor.group.obs_dim], device=self.model.device)
        x_adv = self.attack(self.actor, x, self.unit_budget.scaled(eps), self.generator)
        log_std = self.actor.log_std()
        with torch.enable_grad():  # SB3's step runs under no_grad
            kl = divergence("kl", self.actor(x), self.actor(x_adv), discrete=self.actor.group.discrete,
                            teacher_log_std=log_std, student_log_std=log_std).mean()
            grads = torch.autograd.grad(self.weight * kl, self.parameters)
        scale = min(1.0, float(self.model.max_grad_norm) / (float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))) + 1e-6))
        for p, g in zip(self.parameters, grads):
            p.grad = g * scale if p.grad is None else p.grad + g * scale
        self.model.logger.record_mean("train/smoothness", float(kl.detach()))
        self.model.logger.record("train/smooth_eps", eps)


def collection_attack(groups: Sequence[AgentGroup], unit_budgets: Mapping[str, Budget], settings: Any) -> list[AttackTransform]:
    """With ``attack_fraction`` > 0, that share of env copies and steps is played under PGD on the acting
    policies (objective ``attack_objective``, every agent a victim, radius ``eps``): PPO then learns the return of
    acting on perturbed observations, adversarial training inside the RL loop (Pattanaik et al. 2018), where the
    regulariser alone only asks the actions not to change."""
    fraction = float(settings.attack_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise MadistillError(f"finetune.attack_fraction must be in [0, 1], got {fraction}")
    if fraction == 0 or settings.eps == 0:
        return []
    attack = Attack("pgd", str(settings.attack_objective), steps=int(settings.steps), restarts=1)
    budgets = {name: b.scaled(float(settings.eps)) for name, b in unit_budgets.items()}
    return [AttackTransform(attack, [a for g in groups for a in g.agents], budgets, frequency=fraction)]


def attach_regularisers(learners: Mapping[str, Any], budgets: Mapping[str, Budget], settings: Any,
                        seed: int) -> dict[str, SmoothnessRegulariser]:
    """A smoothness regulariser on every group's PPO (``learners``: the teacher trainer's), each with its own
    seeded streams, so a run is reproducible group by group."""
    out = {}
    for i, (name, lr) in enumerate(learners.items()):
        actor = SB3Policy(lr.group, lr.model.policy, lr.actor.arch)  # the learner's weights, not an acting copy
        gen = torch.Generator(device=lr.model.device).manual_seed(int(seed) * 1000 + i)
        out[name] = SmoothnessRegulariser(lr.model, actor, budgets[name], settings, gen)
    return out
