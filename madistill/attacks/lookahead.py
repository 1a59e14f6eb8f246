"""The lookahead target choice (``targeted_lookahead``): an attacker with a simulator of the env picks, per
victim and step, the action that hurts the team most, and forces it with targeted PGD.

The target is the Discrete action that, forced on the victim now while the others play their clean greedy
actions, then the team's own greedy policy for ``horizon`` steps, gives the lowest team return over those
steps (plus a critic's discounted value at the horizon, where one is given): every candidate is a branch of
the running episode (``madistill.branching``). :meth:`Attack.force` realises the target inside the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.attacks.transform import attacked_copies, victim_slots
from madistill.branching import ActionHistory, Branching, worst_actions
from madistill.errors import MadistillError
from madistill.policies.base import TeamPolicy
from madistill.rollout import env_actions, team_actions
from madistill.transforms import GroupTensors, ObsTransform, StepContext


class LookaheadAttack(ObsTransform):
    """Perturbs the victims' normalised observations towards their lookahead targets. ``history`` must run in
    the same rollout, last in its action chain (``transforms()`` lists both): it records the prefix every
    branch replays."""

    def __init__(self, attack: Attack, victims: Sequence[str], budgets: Mapping[str, Budget], branching: Branching,
                 horizon: int = 1, gamma: float = 0.99, critic: TeamPolicy | None = None, frequency: float = 1.0):
        box = [g.name for g in branching.groups if not g.discrete and victim_slots(g, victims)]
        if box:
            raise MadistillError(f"targeted_lookahead branches over Discrete actions, group(s) {box} have Box actions: "
                                 "leave targeted_lookahead out of attack.methods for these victims")
        self.attack, self.victims, self.budgets = attack, list(victims), dict(budgets)
        self.branching, self.horizon, self.gamma, self.critic = branching, int(horizon), float(gamma), critic
        self.frequency = float(frequency)
        self.history = ActionHistory()

    def transforms(self) -> list[ObsTransform | ActionHistory]:
        """What a rollout under this attack needs: the attack and its action history."""
        return [self, self.history]

    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors:
        team = ctx.team
        now = attacked_copies(next(iter(obs.values())).shape[0], self.frequency, ctx.generator, team.device).cpu().numpy()
        with torch.no_grad():
            clean = env_actions(team, team_actions(team, obs, True, None)[1])
        out = dict(obs)
        for g in team.groups:
            slots = victim_slots(g, self.victims)
            x = obs[g.name].clone()
            for s in slots:
                rows = np.flatnonzero(ctx.active[g.name][:, s].cpu().numpy() & now)
                if not len(rows):
                    continue
                target = worst_actions(self.branching, team, self.history, clean, ctx, g, s, rows, self.horizon,
                                       self.gamma, self.critic, obs=obs)
                idx = torch.as_tensor(rows, device=x.device)
                x[idx, s] = self.attack.force(team[g.name], obs[g.name][idx, s], torch.as_tensor(target, device=x.device),
                                              self.budgets[g.name], ctx.generator).to(x.dtype)
            if slots:
                out[g.name] = x
        return out
