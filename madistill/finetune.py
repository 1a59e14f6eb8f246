"""Robust RL fine-tuning of a distilled student (SA-PPO, Zhang et al. 2020).

Distillation can only imitate the teacher. Where robustness needs behaviour the teacher does not have (on
simple_spread_v3 a robust student gives up clean return: docs/results.md, "Robustness"), the student can keep
learning from the env's return instead. Each group's student actor and its teacher's critic become one SB3
actor-critic that the teacher trainer's PPO loop trains (the teacher's normalisers kept fixed, so inputs keep
their units), and at every PPO optimiser step the gradient of SA-PPO's smoothness regulariser (an extra loss
of the trainer) is added:

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
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from madistill.attacks.budget import Budget
from madistill.attacks.collection import collection_transforms
from madistill.attacks.learned import AlternatingDirector, DirectorAttack
from madistill.attacks.lookahead import LookaheadAttack
from madistill.attacks.methods import training_attack
from madistill.attacks.transform import AttackTransform
from madistill.branching import ActionHistory, Branching
from madistill.common.divergences import divergence
from madistill.common.schedules import linear_ramp
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.policies.base import TeamPolicy
from madistill.policies.mlp import MLPPolicy
from madistill.policies.sb3 import SB3Policy
from madistill.sb3_adapter import ACTOR_PREFIXES, actor_linears
from madistill.teacher import OptimizerStep


def actor_pairs(student: MLPPolicy, sb3: ActorCriticPolicy) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Matching parameters (student's, SB3 actor's) of a student MLP and an SB3 actor of its hidden sizes."""
    mine = [m for m in student.net if isinstance(m, nn.Linear)]
    theirs = actor_linears(sb3)
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
        critic = {k: v for k, v in t.sb3.state_dict().items() if not k.startswith(ACTOR_PREFIXES)}
        missing, unexpected = ac.sb3.load_state_dict(critic, strict=False)
        assert not unexpected and all(k.startswith(ACTOR_PREFIXES) for k in missing), (missing, unexpected)
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
    """SA-PPO's regulariser on one group's PPO, an extra loss at each of its optimiser steps (``ExtraLoss``).

    At each step it is ``weight * KL(pi(x) || pi(x + delta))`` on a minibatch of the rollout's live
    observations (``delta``: PGD on that KL, one restart); the trainer adds its gradient, clipped to PPO's
    ``max_grad_norm`` on its own, to PPO's. The clean distribution is the target (``divergence`` detaches it),
    so the regulariser pulls the perturbed one toward it.
    """

    def __init__(self, unit_budget: Budget, settings: Any, generator: torch.Generator):
        self.unit_budget, self.generator = unit_budget, generator
        self.weight, self.eps, self.ramp = float(settings.smooth_weight), float(settings.eps), float(settings.ramp)
        self.attack = training_attack("kl", int(settings.steps))
        self.rows = np.random.default_rng(int(generator.initial_seed()))

    def current_eps(self, progress: float) -> float:
        """The radius at ``progress`` (share of training done): linear from 0 to ``eps`` over the first ``ramp``."""
        return linear_ramp(self.eps, progress, self.ramp)

    def __call__(self, step: OptimizerStep) -> torch.Tensor | None:
        eps = self.current_eps(step.progress)
        if self.weight == 0 or eps == 0:
            return None
        actor = step.policy
        x = step.live_observations(step.batch_size, self.rows)
        x_adv = self.attack(actor, x, self.unit_budget.scaled(eps), self.generator)
        with torch.enable_grad():  # whatever grad mode the optimiser step is called in
            log_std = actor.log_std()
            kl = divergence("kl", actor(x), actor(x_adv), discrete=actor.group.discrete,
                            teacher_log_std=log_std, student_log_std=log_std).mean()
            loss = self.weight * kl
        step.log("smoothness", float(kl.detach()), mean=True)
        step.log("smooth_eps", eps)
        return loss


def collection_attack(groups: Sequence[AgentGroup], unit_budgets: Mapping[str, Budget], settings: Any,
                      attack_settings: Any = None, branching: Branching | None = None,
                      critic: TeamPolicy | None = None, director: AlternatingDirector | None = None,
                      sides: Mapping[str, Sequence[str]] | None = None,
                      ) -> list[AttackTransform | LookaheadAttack | ActionHistory | DirectorAttack]:
    """With ``attack_fraction`` > 0, that share of env copies and steps is played under the training attack
    ``attack_objective`` on the acting policies (``steps`` PGD steps, every agent a victim, radius ``eps``): PPO
    then learns the return of acting on perturbed observations, adversarial training inside the RL loop (Pattanaik
    et al. 2018), where the regulariser alone only asks the actions not to change. ``attack_settings``,
    ``branching``, ``critic``, ``director`` (trained before it is applied) and ``sides`` (the env's teams) as
    :func:`madistill.attacks.collection.collection_transforms` takes them (the stage passes the teacher's local
    critic, where it has one)."""
    return collection_transforms(groups, unit_budgets, str(settings.attack_objective), int(settings.steps),
                                 float(settings.attack_fraction), float(settings.eps), attack_settings, branching,
                                 critic, director=director, sides=sides)


def smoothness_regularisers(groups: Sequence[AgentGroup], budgets: Mapping[str, Budget], settings: Any, seed: int,
                            device: torch.device | str) -> dict[str, SmoothnessRegulariser]:
    """A smoothness regulariser for every group's PPO, by group name, each with its own seeded streams, so a
    run is reproducible group by group."""
    return {g.name: SmoothnessRegulariser(budgets[g.name], settings,
                                          torch.Generator(device=device).manual_seed(int(seed) * 1000 + i))
            for i, g in enumerate(groups)}
