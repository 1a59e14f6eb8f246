"""Attacks as an ObsTransform: who is attacked (victim agents), when (every step or a fraction of steps),
and against which policy the perturbation is crafted (the victim's own: white-box; another: transfer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.policies.base import TeamPolicy
from madistill.transforms import GroupTensors, ObsTransform, StepContext


class AttackTransform(ObsTransform):
    """Perturbs the normalised observations of ``victims`` before their policies act.

    ``surrogate``: craft on this team instead of the acting one (a transfer attack; it must share the acting
    team's observation normalisation, as a student and its teacher do). ``critic``: the team whose value
    heads the ``value`` objective uses. ``frequency``: the chance that a copy is attacked at a step (sparse
    timing draws from the rollout's generator, so it is reproducible with the seed).
    """

    shared_stream = True  # random starts and sparse timing draw from the rollout's generator

    def __init__(
        self,
        attack: Attack,
        victims: Sequence[str],
        budgets: Mapping[str, Budget],
        frequency: float = 1.0,
        surrogate: TeamPolicy | None = None,
        critic: TeamPolicy | None = None,
    ):
        self.attack, self.victims, self.budgets = attack, list(victims), dict(budgets)
        self.frequency, self.surrogate, self.critic = float(frequency), surrogate, critic

    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors:
        team = ctx.team
        unknown = set(self.victims) - set(team.group_of)
        if unknown:
            raise MadistillError(f"attack victims {sorted(unknown)} are not agents of this env: {sorted(team.group_of)}")
        now = attacked_copies(next(iter(obs.values())).shape[0], self.frequency, ctx.generator, team.device)
        out = dict(obs)
        for g in team.groups:
            slots = victim_slots(g, self.victims)
            if not slots:
                continue
            mask = torch.zeros_like(ctx.active[g.name])
            mask[:, slots] = True
            mask &= ctx.active[g.name] & now[:, None]
            if not mask.any():
                continue
            crafted_on = (self.surrogate or team)[g.name]
            critic = self.critic[g.name] if self.critic is not None else None
            x = obs[g.name]
            adv = self.attack(crafted_on, x[mask], self.budgets[g.name], ctx.generator, critic)
            x = x.clone()
            x[mask] = adv.to(x.dtype)
            out[g.name] = x
        return out


def attacked_copies(n: int, frequency: float, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """``[n]`` bool: which of ``n`` env copies are attacked at this step, each with chance ``frequency``.

    Drawn from the rollout's generator so sparse timing is reproducible with the seed; nothing is drawn at
    frequency 1, so attacking every step leaves the generator as it was for the attack itself.
    """
    if frequency >= 1.0:
        return torch.ones(n, dtype=torch.bool, device=device)
    return torch.rand(n, generator=generator, device=device) < frequency


def victim_slots(group: AgentGroup, victims: Sequence[str]) -> list[int]:
    """Positions of the victims among the group's agents."""
    return [i for i, a in enumerate(group.agents) if a in victims]


TEAM_PREFIX = "team:"


def victim_sets(
    spec: Sequence[str], agents: Sequence[str], teams: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[str]]:
    """Named victim sets from config: ``all`` (every agent at once), ``each`` (every agent alone), an agent
    id, ``team:<name>`` (every agent of one of ``teams``), or several of these joined with ``+``."""
    teams = teams or {}
    out: dict[str, list[str]] = {}
    for item in spec:
        if item == "all":
            out["all"] = list(agents)
        elif item == "each":
            out.update({a: [a] for a in agents})
        else:
            names: list[str] = []
            for part in item.split("+"):
                if part.startswith(TEAM_PREFIX):
                    if part.removeprefix(TEAM_PREFIX) not in teams:
                        raise MadistillError(f"attack.victims names {part!r}, but the env's teams are {list(teams)}:"
                                             " use team:<one of them> (or set env.teams)")
                    members = teams[part.removeprefix(TEAM_PREFIX)]
                elif part in agents:
                    members = [part]
                else:
                    raise MadistillError(f"attack.victims names {[part]}: use all, each, team:<name> or agents of "
                                         f"{list(agents)}")
                names += [a for a in members if a not in names]
            out[item] = names
    return out


class ConstantOffset(ObsTransform):
    """Adds one fixed perturbation, a random corner of the budget per victim agent, at every step.

    Held for whole episodes, offsets of positions look like a different but plausible world, so a policy
    cannot tell them from clean inputs by their consistency over time; per-step attacks (PGD, FGSM) change
    from step to step. The suite's ``offsets`` attack plays several of these on the same episode seeds and
    keeps the worst per episode: a search attack that needs episode replays (a simulator), no gradients.
    """

    def __init__(self, victims: Sequence[str], budgets: Mapping[str, Budget], seed: int):
        self.victims, self.budgets = list(victims), dict(budgets)
        self.generator = torch.Generator().manual_seed(seed)
        self.deltas: dict[str, torch.Tensor] = {}  # group -> [n_agents, d], drawn at first use

    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors:
        out = dict(obs)
        for g in ctx.team.groups:
            slots = victim_slots(g, self.victims)
            if not slots:
                continue
            x = obs[g.name]
            if g.name not in self.deltas:
                signs = torch.randint(0, 2, x.shape[1:], generator=self.generator).to(x) * 2 - 1
                self.deltas[g.name] = signs * self.budgets[g.name].radius.to(x)
            x = x.clone()
            x[:, slots] += self.deltas[g.name][slots]
            out[g.name] = x
        return out
