"""Rollouts played partly under attack, so a learner sees the states an attacked team drifts into: the training
attack of robust RL fine-tuning (``finetune.attack_objective``) and of DAgger collection
(``distill.adv_collect_objective``). The director is trained by its owner, in alternation with the policy it
attacks (:class:`madistill.attacks.learned.AlternatingDirector`), and applied here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from madistill.attacks.budget import Budget
from madistill.attacks.learned import AlternatingDirector, DirectorAttack
from madistill.attacks.lookahead import LookaheadAttack
from madistill.attacks.methods import training_attack
from madistill.attacks.transform import AttackTransform
from madistill.branching import ActionHistory, Branching
from madistill.config import AttackConfig
from madistill.envs.factory import EnvSpec
from madistill.envs.groups import AgentGroup
from madistill.envs.teams import several_teams
from madistill.policies.base import TeamPolicy


def collection_transforms(groups: Sequence[AgentGroup], unit_budgets: Mapping[str, Budget], objective: str,
                          steps: int, fraction: float, eps: float, attack_settings: Any = None,
                          branching: Branching | None = None, critic: TeamPolicy | None = None,
                          surrogate: TeamPolicy | None = None, director: AlternatingDirector | None = None,
                          sides: Mapping[str, Sequence[str]] | None = None,
                          ) -> list[AttackTransform | LookaheadAttack | ActionHistory | DirectorAttack]:
    """The transforms that play a ``fraction`` of env copies and steps under the training attack ``objective``
    (``steps`` PGD steps, every agent a victim, radius ``eps`` times the unit budgets); none where ``fraction``
    or ``eps`` is 0.

    ``attack_settings`` (``cfg.attack``; default: its defaults) gives the targeted attacks' ``target_candidates``
    and the lookahead's settings (horizon, discount, joint choice, critic). ``targeted_lookahead`` branches the
    running episodes with ``branching`` and, with ``lookahead_critic``, adds ``critic``'s values at the horizon to
    its rewards, as the suite's lookahead does. ``surrogate``: the team the perturbations are crafted on (and the
    lookahead's branches play) instead of the acting one, for an acting team that is not one policy per agent
    (DAgger's per-step mix of teacher and student). ``director``: the trained director the transform applies
    (``objective=director``). ``sides``: the env's teams; with several, the lookahead targets each team's agents
    by that team's return (across opposing teams the mean return of all agents would not tell harm apart)."""
    if fraction == 0 or eps == 0:
        return []
    ac = attack_settings if attack_settings is not None else AttackConfig()
    budgets = {name: b.scaled(float(eps)) for name, b in unit_budgets.items()}
    agents = [a for g in groups for a in g.agents]
    if objective == "director":
        if director is None:
            raise ValueError("the director collection attack needs its trained AlternatingDirector")
        return [director.transform(budgets, fraction, surrogate)]
    if objective == "targeted_lookahead":
        if branching is None:
            raise ValueError("the lookahead collection attack needs the env's branching")
        # the targeted PGD of targeted_random realises the lookahead's targets; its own target choice is not used
        return LookaheadAttack(training_attack("targeted_random", steps), agents, budgets, branching,
                               ac.lookahead_horizon, ac.lookahead_gamma, critic if ac.lookahead_critic else None,
                               fraction, ac.lookahead_joint, surrogate,
                               sides if several_teams(sides) else None).transforms()
    attack = training_attack(objective, steps, int(ac.target_candidates))
    return [AttackTransform(attack, agents, budgets, frequency=fraction, surrogate=surrogate)]


def training_director(spec: EnvSpec, groups: Sequence[AgentGroup], steps: int, attack_settings: Any,
                      seed: int) -> AlternatingDirector:
    """Robust training's director for a run with seed ``seed``: every agent a victim, its targets forced by the
    targeted PGD of ``steps`` steps (that of targeted_random, whose own target choice is not used), the
    ``attack.director_*`` settings; untrained until its owner trains it against the policy it attacks."""
    return AlternatingDirector(spec, [a for g in groups for a in g.agents], training_attack("targeted_random", steps),
                               attack_settings, seed)
