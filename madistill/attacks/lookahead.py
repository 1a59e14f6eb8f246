"""The lookahead target choice (``targeted_lookahead``): an attacker with a simulator of the env picks, per
step, the actions that hurt the team most, and forces them on the victims with targeted PGD.

Every Discrete action of every victim is forced at once (:meth:`Attack.force`, one PGD batch per group: all
victim slots and all actions), which shows the actions the budget can make greedy. The targets are then the
joint action of the victims that, played now while the other agents play their clean greedy actions, then the
team's own greedy policy for ``horizon`` steps, gives the lowest return of the victims' team over those steps
(plus a critic's discounted value at the horizon, where one is given), among the reachable ones: every candidate
is a branch of the running episode (``madistill.branching``). The joint choices include leaving any victim at its clean
action, so the attack on a set considers every attack on its subsets at that step. Where the victims have more
joint actions than ``joint`` allows, each victim's target is chosen alone, with the others at their clean
greedy actions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.attacks.transform import attacked_copies, victim_slots
from madistill.branching import ActionHistory, Branching, NotBranchable, discrete_actions, joint_returns
from madistill.envs.groups import AgentGroup
from madistill.policies.base import TeamPolicy
from madistill.rollout import env_actions, team_actions
from madistill.transforms import GroupTensors, ObsTransform, StepContext


def box_victims(groups: Sequence[AgentGroup], victims: Sequence[str]) -> list[str]:
    """The groups with Box actions among ``victims``' groups: the lookahead branches over Discrete actions only."""
    return [g.name for g in groups if not g.discrete and victim_slots(g, victims)]


class LookaheadAttack(ObsTransform):
    """Perturbs the victims' normalised observations towards their lookahead targets. ``history`` must run in
    the same rollout, last in its action chain (``transforms()`` lists both): it records the prefix every
    branch replays. ``joint``: the most joint actions of the victims branched at one step; with more, each
    victim's target is chosen with the others at their clean actions. ``surrogate``: the team whose policies the
    targets are forced on and whose greedy play the branches continue with, instead of the acting one (for an
    acting team that draws which policy acts, such as DAgger's mix of teacher and student). ``sides``: teams (team
    -> agents) whose victims are targeted apart, each team's victims towards the actions that lower that team's
    mean return while the other teams' victims keep their clean actions (None: all victims together, scored by
    the mean return of every agent). :class:`NotBranchable` for Box victims."""

    shared_stream = True  # random starts and sparse timing draw from the rollout's generator

    def __init__(self, attack: Attack, victims: Sequence[str], budgets: Mapping[str, Budget], branching: Branching,
                 horizon: int = 1, gamma: float = 0.99, critic: TeamPolicy | None = None, frequency: float = 1.0,
                 joint: int = 64, surrogate: TeamPolicy | None = None,
                 sides: Mapping[str, Sequence[str]] | None = None):
        box = box_victims(branching.groups, victims)
        if box:
            raise NotBranchable(f"targeted_lookahead branches over Discrete actions, group(s) {box} have Box actions: "
                                "leave targeted_lookahead out of attack.methods for these victims")
        self.attack, self.victims, self.budgets = attack, list(victims), dict(budgets)
        self.branching, self.horizon, self.gamma, self.critic = branching, int(horizon), float(gamma), critic
        self.frequency, self.joint, self.surrogate = float(frequency), int(joint), surrogate
        self.sides = None if sides is None else {t: list(a) for t, a in sides.items()}
        self.history = ActionHistory()
        # per group [N, n_g]: the target each agent was forced towards at the last step, -1 where none (not a
        # victim, inactive, not attacked, or the lookahead kept its clean action); DAgger records them
        self.targets: dict[str, torch.Tensor] = {}

    def transforms(self) -> list[ObsTransform | ActionHistory]:
        """What a rollout under this attack needs: the attack and its action history."""
        return [self, self.history]

    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors:
        team = self.surrogate or ctx.team
        self.targets = {name: torch.full(a.shape, -1, dtype=torch.long) for name, a in ctx.active.items()}
        now = attacked_copies(next(iter(obs.values())).shape[0], self.frequency, ctx.generator, team.device).cpu().numpy()
        agents = [(g, s) for g in team.groups for s in victim_slots(g, self.victims)]
        if not agents:
            return obs
        active = np.array([ctx.active[g.name][:, s].cpu().numpy() & now for g, s in agents])
        rows = np.flatnonzero(active.any(0))
        if not len(rows):
            return obs
        with torch.no_grad():
            clean = env_actions(team, team_actions(team, obs, True, None)[1])
        adv, reached = self._force_all(team, obs, rows, ctx)
        for j, (g, s) in enumerate(agents):  # a victim inactive in a row keeps its clean action there
            idle = ~active[j, rows]
            reached[j][idle] = np.eye(reached[j].shape[1], dtype=bool)[clean[g.name][rows[idle], s]]
        picks = self._choose(team, agents, reached, clean, obs, ctx, rows)
        out = {name: x.clone() for name, x in obs.items()}
        for j, (g, s) in enumerate(agents):
            hit = np.flatnonzero(active[j, rows])
            x = out[g.name]
            x[torch.as_tensor(rows[hit]), s] = adv[j][torch.as_tensor(picks[j][hit]), torch.as_tensor(hit)].to(x.dtype)
            moved = hit[picks[j][hit] != clean[g.name][rows[hit], s]]
            self.targets[g.name][torch.as_tensor(rows[moved]), s] = torch.as_tensor(picks[j][moved], dtype=torch.long)
        return out

    def _force_all(self, team: TeamPolicy, obs: GroupTensors, rows: np.ndarray,
                   ctx: StepContext) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        """Per victim (in group and slot order): the perturbations forcing each of its ``n`` actions ``[n, m, d]``
        in ``rows`` (``m`` of them) and which actions became greedy ``[m, n]`` (where none did, every action
        counts as reached: the clean one is reached in principle). One PGD batch per group: ``n x slots x m``
        rows, candidate ``k`` of slot ``j`` of row ``i`` at ``(k * slots + j) * m + i``."""
        adv, reached = [], []
        idx = torch.as_tensor(rows, device=team.device)
        for g in team.groups:
            slots = victim_slots(g, self.victims)
            if not slots:
                continue
            n, policy = discrete_actions(g), team[g.name]
            x = obs[g.name][idx][:, slots].transpose(0, 1).reshape(len(slots) * len(rows), -1)
            cand = torch.arange(n, device=x.device).repeat_interleave(len(x))
            forced = self.attack.force(policy, x.repeat(n, 1), cand, self.budgets[g.name], ctx.generator)
            with torch.no_grad():
                hit = (policy(forced).argmax(-1) == cand).reshape(n, len(slots), len(rows)).cpu().numpy()
            forced = forced.reshape(n, len(slots), len(rows), -1)
            for j in range(len(slots)):
                r = hit[:, j].T.copy()
                r |= ~r.any(1, keepdims=True)
                adv.append(forced[:, j])
                reached.append(r)
        return adv, reached

    def _choose(self, team: TeamPolicy, agents: list[tuple[AgentGroup, int]], reached: list[np.ndarray],
                clean: dict[str, np.ndarray], obs: GroupTensors, ctx: StepContext, rows: np.ndarray) -> list[np.ndarray]:
        """Per victim, its target action in each of ``rows``: the reachable joint action of its side's victims (all
        victims where ``sides`` is None) with the lowest branched return of that side, or (more joint actions than
        ``joint``) each victim's reachable action with the lowest return while the others play their clean actions.
        ``obs``: the clean observations, which the replays must show."""
        picks: list[np.ndarray] = [np.empty(0)] * len(agents)
        for scored, part in self._parts(agents):
            sizes = [reached[i].shape[1] for i in part]
            for chosen in [part] if math.prod(sizes) <= self.joint else [[i] for i in part]:
                ok = [reached[i] for i in chosen]
                choices = list(itertools.product(*(range(r.shape[1]) for r in ok)))
                ret = joint_returns(self.branching, team, self.history, clean, ctx, [agents[i] for i in chosen], choices,
                                    rows, self.horizon, self.gamma, self.critic, obs, scored)
                allowed = np.all([r[:, [c[j] for c in choices]] for j, r in enumerate(ok)], axis=0)
                best = np.array(choices)[np.where(allowed, ret, np.inf).argmin(1)]  # [m, victims]
                for j, i in enumerate(chosen):
                    picks[i] = best[:, j]
        return picks

    def _parts(self, agents: list[tuple[AgentGroup, int]]) -> list[tuple[list[str] | None, list[int]]]:
        """The victims (indices into ``agents``) targeted together, each part with the agents whose return scores
        it: one part of all, scored by every agent, without ``sides``; else one per side with victims in it."""
        if self.sides is None:
            return [(None, list(range(len(agents))))]
        named = [g.agents[s] for g, s in agents]
        parts = [(members, [i for i, a in enumerate(named) if a in members]) for members in self.sides.values()]
        return [(members, part) for members, part in parts if part]
