"""The lookahead target choice (``targeted_lookahead``): an attacker with a simulator of the env picks, per
victim and step, the action that hurts the team most, and forces it with targeted PGD.

The target is the Discrete action that, forced on the victim now while the others play their clean greedy
actions, then the team's own greedy policy for ``horizon`` steps, gives the lowest team return over those
steps (plus a critic's discounted value at the horizon, where one is given), among the actions the budget can
force: every candidate is a branch of the running episode (``madistill.branching``), and :meth:`Attack.force`
drives PGD towards all of them in one batch. Each victim's target is chosen with the others at their clean
greedy actions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.attacks.transform import attacked_copies, victim_slots
from madistill.branching import ActionHistory, Branching, action_returns
from madistill.errors import MadistillError
from madistill.policies.base import Policy, TeamPolicy
from madistill.rollout import env_actions, team_actions
from madistill.transforms import GroupTensors, ObsTransform, StepContext


class LookaheadAttack(ObsTransform):
    """Perturbs the victims' normalised observations towards their lookahead targets. ``history`` must run in
    the same rollout, last in its action chain (``transforms()`` lists both): it records the prefix every
    branch replays."""

    shared_stream = True  # random starts and sparse timing draw from the rollout's generator

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
                ret = action_returns(self.branching, team, self.history, clean, ctx, g, s, rows, self.horizon,
                                     self.gamma, self.critic, obs=obs)
                idx = torch.as_tensor(rows, device=x.device)
                x[idx, s] = self._force_worst(team[g.name], obs[g.name][idx, s], ret, self.budgets[g.name], ctx).to(x.dtype)
            if slots:
                out[g.name] = x
        return out

    def _force_worst(self, policy: Policy, x: torch.Tensor, ret: np.ndarray, budget: Budget, ctx: StepContext) -> torch.Tensor:
        """PGD towards every action at once (``n`` candidates of ``m`` rows in one batch); per row, the perturbation
        of the candidate with the lowest branched return ``ret`` ``[m, n]`` among those the budget makes greedy (the
        clean greedy action always is), else of the lowest one."""
        m, n = ret.shape
        cand = torch.arange(n, device=x.device).repeat_interleave(m)  # candidate k of row i at k * m + i
        adv = self.attack.force(policy, x.repeat(n, 1), cand, budget, ctx.generator)
        with torch.no_grad():
            reached = (policy(adv).argmax(-1) == cand).reshape(n, m).T.cpu().numpy()
        score = np.where(reached | ~reached.any(1, keepdims=True), ret, np.inf)
        return adv.reshape(n, m, -1)[torch.as_tensor(score.argmin(1)), torch.arange(m)]
