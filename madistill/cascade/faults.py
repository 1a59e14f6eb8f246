"""Faults: what goes wrong with an agent, and when, as transforms of the one rollout loop.

Observation faults are ObsTransforms (what the victim sees), action faults ActionTransforms (what the victim
does, between choosing and stepping). Every fault shares one scope: victim agents, onset (fixed, or drawn per
episode from its episode seed), duration (an impulse of one step, k steps, or to the episode's end) and an
intermittency rate. A fault's randomness comes from one stream per env copy, seeded at each episode start by
(fault seed, episode seed): an episode is faulted the same way whichever copy plays it and whatever came before.

Adding a fault is one class registered here (``@register``) and one yaml in ``conf/fault/``; settings of its
own go into ``FaultConfig`` (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch.distributions import Distribution

from madistill.attacks.budget import Budget, excluded_features, group_budgets
from madistill.attacks.methods import Attack, variants
from madistill.attacks.robustness import SUITE, suite_attack
from madistill.attacks.transform import victim_slots
from madistill.branching import ActionHistory, Branching, action_returns, value_critic
from madistill.envs.factory import EnvSpec
from madistill.envs.features import FeatureLayout
from madistill.envs.groups import AgentGroup
from madistill.envs.teams import victims_team
from madistill.errors import MadistillError
from madistill.policies.base import TeamPolicy
from madistill.rollout import env_actions
from madistill.transforms import ActionTransform, GroupTensors, ObsTransform, StepContext, Transform

FAULTS: dict[str, type[Fault]] = {}

# the suite's per-step attacks crafted on the victim's own policy (or its critic): what fault=attack can play
FAULT_METHODS = tuple(name for name in variants(Attack()) if name in SUITE and name != "transfer")


def register(name: str) -> Callable[[type[Fault]], type[Fault]]:
    """Class decorator: make a fault available as ``fault=<name>`` / ``fault.name=<name>``."""

    def add(cls: type[Fault]) -> type[Fault]:
        cls.name = name
        FAULTS[name] = cls
        return cls

    return add


@dataclass(frozen=True)
class Scope:
    """Who is faulted and when (the FaultConfig fields every fault shares)."""

    victims: tuple[str, ...]  # faulted agent ids
    onset: int  # first faulted episode step
    onset_max: int | None = None  # with a value: the onset is drawn per episode from onset..onset_max
    duration: int | None = 1  # faulted steps from the onset (None: to the episode's end)
    rate: float = 1.0  # chance that the fault acts at each step of its duration
    seed: int = 0  # the fault's own seed, combined with each episode's seed

    @property
    def last_onset(self) -> int:
        """The latest step at which the fault can start."""
        return self.onset if self.onset_max is None else self.onset_max


@dataclass(frozen=True)
class FaultEnv:
    """What building a fault may need to know about the env and the settings beside it."""

    groups: Sequence[AgentGroup]
    layouts: Mapping[str, FeatureLayout]  # named feature groups per agent group (env.features)
    attack: Any = None  # the ``attack`` config section (steps, restarts, exclude, scale) for attack faults
    device: torch.device | str = "cpu"
    spec: EnvSpec | None = None  # the env itself, for faults that branch it (worst)
    backend: str = "auto"  # env.backend of the branches
    # the team white-box faults craft on, given the acting team (None: the acting team itself); for a purified
    # team, the view ``purify.gradient`` names (policies.purified.attack_view)
    crafted_on: Callable[[TeamPolicy], TeamPolicy | None] | None = None
    # the env's teams (sides), whose return the worst action lowers: its victims' team (None: one team of all)
    teams: Mapping[str, Sequence[str]] | None = None


# what a fault puts in place of the hit rows x[mask] of a group's values x: (group, x, mask, ctx) -> [m, ...]
Change = Callable[[AgentGroup, torch.Tensor, torch.Tensor, StepContext], torch.Tensor]
_UNARMED = np.random.default_rng(0)  # the stream of copies a fault is not armed on (never drawn from for effects)


class Fault(Transform):
    """Shared scope and timing. ``armed`` (``[N]`` bool, None: every copy) restricts the fault to some env
    copies: the paired runner faults one block of copies and leaves their clean twins alone."""

    name: ClassVar[str]
    spaces: ClassVar[tuple[str, ...]] = ("discrete", "box")  # action spaces an action fault can take

    def __init__(self, scope: Scope):
        self.scope = scope
        self.armed: np.ndarray | None = None
        self.onset_at = np.zeros(0, dtype=np.int64)  # [N] this episode's onset per copy
        self.rngs: list[np.random.Generator] = []  # [N] this episode's stream per copy

    @classmethod
    def from_config(cls, scope: Scope, fc: Any, env: FaultEnv) -> Fault:
        """The fault from its FaultConfig ``fc``; faults with settings of their own read them here."""
        return cls(scope)

    def check(self, env: FaultEnv) -> None:
        """Refuse, in one line, a fault this env's groups cannot take (the victims are checked before)."""
        for g in env.groups:
            kind = "discrete" if g.discrete else "box"
            if isinstance(self, ActionTransform) and kind not in self.spaces and victim_slots(g, self.scope.victims):
                raise MadistillError(f"fault {self.name!r} needs {' or '.join(self.spaces)} actions, but group {g.name!r} "
                                     f"has {g.action_space}: choose another fault for {list(self.scope.victims)}")

    def reset(self) -> None:
        self.onset_at = np.zeros(0, dtype=np.int64)
        self.rngs = []

    def start_episodes(self, copies: np.ndarray, seeds: np.ndarray) -> None:
        n = int(copies.max()) + 1
        if n > len(self.onset_at):
            self.onset_at = np.concatenate([self.onset_at, np.zeros(n - len(self.onset_at), dtype=np.int64)])
            self.rngs += [_UNARMED] * (n - len(self.rngs))
        if self.armed is not None:  # copies the fault never touches need no stream (seeding one costs ~50 us)
            keep = self.armed[copies]
            copies, seeds = copies[keep], seeds[keep]
        for i, seed in zip(copies.tolist(), seeds.tolist()):
            rng = np.random.default_rng([self.scope.seed, int(seed)])
            s = self.scope
            self.onset_at[i] = s.onset if s.onset_max is None else int(rng.integers(s.onset, s.onset_max + 1))
            self.rngs[i] = rng
        self.restart(copies)

    def restart(self, copies: np.ndarray) -> None:  # noqa: B027 - optional hook for faults with state
        """Forget what these copies' previous episodes left in the fault's state."""

    def firing(self, ctx: StepContext) -> np.ndarray:
        """``[N]`` bool: the copies in which the fault acts at this step."""
        step = ctx.episode_step
        on = step >= self.onset_at
        if self.scope.duration is not None:
            on &= step < self.onset_at + self.scope.duration
        if self.scope.rate < 1.0:  # one draw per copy and step, fired or not, so streams stay aligned
            on &= np.array([r.random() for r in self.rngs]) < self.scope.rate
        if self.armed is not None:
            on &= self.armed
        return on

    def victim_mask(self, group: AgentGroup, firing: np.ndarray, ctx: StepContext) -> torch.Tensor:
        """``[N, n_g]`` bool: the group's agent slots hit at this step (victims, firing copies, alive)."""
        active = ctx.active[group.name]
        mask = torch.zeros_like(active)
        slots = victim_slots(group, self.scope.victims)
        if slots:
            mask[:, slots] = torch.as_tensor(firing, device=active.device)[:, None]
        return mask & active

    def hit(self, values: GroupTensors, ctx: StepContext, change: Change) -> GroupTensors:
        """``values`` (per group ``[N, n_g, ...]``: observations or actions) with the rows of the slots hit at this
        step replaced by ``change(group, x, mask, ctx)``."""
        firing = self.firing(ctx)
        out = dict(values)
        if not firing.any():
            return out
        for g in ctx.team.groups:
            mask = self.victim_mask(g, firing, ctx)
            if g.name in values and mask.any():
                x = values[g.name].clone()
                x[mask] = change(g, x, mask, ctx).to(x.dtype)
                out[g.name] = x
        return out


class ObsFault(Fault, ObsTransform):
    """A fault on what the victims see: ``corrupt`` replaces the hit rows of a group's observations."""

    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors:
        return self.hit(obs, ctx, self.corrupt)

    def corrupt(self, group: AgentGroup, x: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The observations ``[m, d]`` the hit slots ``x[mask]`` see instead."""
        raise NotImplementedError


class ActionFault(Fault, ActionTransform):
    """A fault on what the victims do: ``replace`` gives the executed actions of the hit slots."""

    def __call__(self, actions: GroupTensors, dists: dict[str, Distribution], ctx: StepContext) -> GroupTensors:
        return self.hit(actions, ctx, self.replace)

    def replace(self, group: AgentGroup, a: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The actions ``[m, ...]`` the hit slots ``a[mask]`` execute instead."""
        raise NotImplementedError

    def _per_slot(self, mask: torch.Tensor, draw: Callable[[np.random.Generator], np.ndarray]) -> torch.Tensor:
        """One ``draw`` per hit slot from its copy's stream, in ``a[mask]`` order."""
        rows = [draw(self.rngs[i]) for i, _ in mask.nonzero().tolist()]
        return torch.as_tensor(np.stack(rows), device=mask.device)


class Holding(Fault):
    """A stateful fault: each hit slot holds the value it had at its first faulted step (a frozen observation,
    a stuck action) to its episode's end; an episode start forgets its copy's values."""

    def __init__(self, scope: Scope):
        super().__init__(scope)
        self.values: dict[str, torch.Tensor] = {}  # group -> [N, n_g, ...] the held value per slot
        self.holding: dict[str, torch.Tensor] = {}  # group -> [N, n_g] bool: the slot holds one

    def reset(self) -> None:
        super().reset()
        self.values, self.holding = {}, {}

    def restart(self, copies: np.ndarray) -> None:
        for h in self.holding.values():
            h[copies[copies < len(h)]] = False

    def held(self, group: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x[mask]`` with each hit slot's value replaced by the one it holds, holding ``x`` where it held none."""
        if group not in self.values or self.values[group].shape != x.shape:
            self.values[group], self.holding[group] = torch.zeros_like(x), torch.zeros_like(mask)
        fresh = mask & ~self.holding[group]
        self.values[group][fresh] = x[fresh]
        self.holding[group] |= fresh
        return self.values[group][mask]


def victim_features(fc: Any, env: FaultEnv, scope: Scope) -> dict[str, list[int]]:
    """Per group holding victims, the indices of the features ``fault.features`` names (all for an empty list):
    feature-group names are per group (a listener's ``message``), so only the victims' groups must know them."""
    return {g.name: excluded_features(list(fc.features), env.layouts[g.name], "fault.features") if fc.features
            else list(range(g.obs_dim)) for g in env.groups if victim_slots(g, scope.victims)}


@register("noise")
class Noise(ObsFault):
    """Gaussian noise of standard deviation ``sigma`` (normalised units) on the chosen features."""

    def __init__(self, scope: Scope, sigma: float, features: Mapping[str, list[int]]):
        super().__init__(scope)
        self.sigma, self.features = float(sigma), dict(features)

    @classmethod
    def from_config(cls, scope: Scope, fc: Any, env: FaultEnv) -> Fault:
        return cls(scope, fc.sigma, victim_features(fc, env, scope))

    def corrupt(self, group: AgentGroup, x: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        hit = x[mask].clone()
        idx = self.features[group.name]
        rows = [self.rngs[i].standard_normal(len(idx)) for i, _ in mask.nonzero().tolist()]
        hit[:, idx] += self.sigma * torch.as_tensor(np.stack(rows), dtype=hit.dtype, device=hit.device)
        return hit


@register("dropout")
class Dropout(ObsFault):
    """The chosen features (all by default; a feature group such as a heard message: a communication fault)
    read the normaliser's mean: the sensor or channel delivers nothing."""

    def __init__(self, scope: Scope, features: Mapping[str, list[int]]):
        super().__init__(scope)
        self.features = dict(features)

    @classmethod
    def from_config(cls, scope: Scope, fc: Any, env: FaultEnv) -> Fault:
        return cls(scope, victim_features(fc, env, scope))

    def corrupt(self, group: AgentGroup, x: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        norm = ctx.team.normalizers[group.name]
        mean = norm.normalize(torch.as_tensor(norm.mean, dtype=x.dtype, device=x.device))
        hit = x[mask].clone()
        idx = self.features[group.name]
        hit[:, idx] = mean[idx]
        return hit


@register("frozen")
class Frozen(Holding, ObsFault):
    """A stale observation: from the first faulted step on, the victim sees what it saw then."""

    def corrupt(self, group: AgentGroup, x: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.held(group.name, x, mask)


@register("attack")
class AttackFault(ObsFault):
    """An attack of the attack suite (``method``) at budget ``eps`` on the victims' observations, crafted
    white-box on the acting team (the critic method on its value heads), or on the view of it ``crafted_on``
    gives (a purified team's, as ``purify.gradient`` names it)."""

    shared_stream = True  # random starts and sparse timing draw from the rollout's generator

    def __init__(self, scope: Scope, method: str, budgets: Mapping[str, Budget], attack_cfg: Any,
                 crafted_on: Callable[[TeamPolicy], TeamPolicy | None] | None = None):
        super().__init__(scope)
        self.crafted_on = crafted_on
        self._views: dict[int, tuple[TeamPolicy, TeamPolicy]] = {}  # id(acting team) -> (it, its view)
        if method not in FAULT_METHODS:
            raise MadistillError(f"fault.method={method!r} is not a per-step attack the fault can play: use one "
                                 f"of {', '.join(FAULT_METHODS)} (fault=worst plays the lookahead's worst action itself)")
        self.attack = suite_attack(method, attack_cfg)
        self.method, self.budgets = method, dict(budgets)

    @classmethod
    def from_config(cls, scope: Scope, fc: Any, env: FaultEnv) -> Fault:
        ac = env.attack
        budgets = group_budgets(float(fc.eps), env.layouts, ac.exclude if ac else None, env.device, ac.scale if ac else None)
        return cls(scope, fc.method, budgets, ac, env.crafted_on)

    def view(self, team: TeamPolicy) -> TeamPolicy:
        """The team the perturbations are crafted on when ``team`` acts (made once per team: a view with noise
        keeps its own stream across steps)."""
        if self.crafted_on is None:
            return team
        if id(team) not in self._views:
            self._views[id(team)] = (team, self.crafted_on(team) or team)
        return self._views[id(team)][1]

    def corrupt(self, group: AgentGroup, x: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        policy = self.view(ctx.team)[group.name]
        critic = policy if self.method == "critic" else None
        if critic is not None and policy.value(x[mask][:1]) is None:
            raise MadistillError(f"fault.method=critic needs a critic, and the {group.name!r} policy has none: "
                                 "use a teacher, or another method")
        return self.attack(policy, x[mask], self.budgets[group.name], ctx.generator, critic)


@register("random")
class RandomAction(ActionFault):
    """Uniformly random actions (Discrete: any index; Box: uniform in the action box)."""

    def replace(self, group: AgentGroup, a: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        space = group.action_space
        if group.discrete:
            return self._per_slot(mask, lambda r: np.asarray(r.integers(space.n)))
        return self._per_slot(mask, lambda r: r.uniform(space.low, space.high).astype(np.float32))


@register("stuck")
class Stuck(Holding, ActionFault):
    """The victim keeps repeating the action it chose at the first faulted step."""

    def replace(self, group: AgentGroup, a: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.held(group.name, a, mask)


@register("constant")
class Constant(ActionFault):
    """One fixed action (``fault.action``): an index for Discrete groups, a vector (or one value for every
    component) for Box groups."""

    def __init__(self, scope: Scope, action: Sequence[float]):
        super().__init__(scope)
        self.action = [float(v) for v in action]

    @classmethod
    def from_config(cls, scope: Scope, fc: Any, env: FaultEnv) -> Fault:
        return cls(scope, list(fc.action))

    def check(self, env: FaultEnv) -> None:
        super().check(env)
        for g in (g for g in env.groups if victim_slots(g, self.scope.victims)):
            v = self.action
            if g.discrete and (len(v) != 1 or not v[0].is_integer() or not 0 <= v[0] < g.action_space.n):
                raise MadistillError(f"fault {self.name!r} gives the action {v}, but group {g.name!r} has Discrete "
                                     f"actions: set fault.action=[k] with k in 0..{g.action_space.n - 1}")
            if not g.discrete and len(v) not in (1, g.act_dim):
                raise MadistillError(f"fault {self.name!r} gives {len(v)} action values, but group {g.name!r} has "
                                     f"Box actions of {g.act_dim}: give 1 or {g.act_dim} values in fault.action")

    def replace(self, group: AgentGroup, a: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        value = torch.as_tensor(self.action, device=a.device)
        if group.discrete:
            return value.long().expand(int(mask.sum()))
        return value.to(a.dtype).expand(int(mask.sum()), group.act_dim).reshape(-1, *a.shape[2:])


@register("dead")
class Dead(Constant):
    """A dead agent: action 0 (Discrete; MPE's no-op) or all zeros (Box; MPE's zero force)."""

    def __init__(self, scope: Scope):
        super().__init__(scope, [0.0])

    @classmethod
    def from_config(cls, scope: Scope, fc: Any, env: FaultEnv) -> Fault:
        return cls(scope)


@register("worst")
class Worst(ActionFault):
    """The value-lowering action: at each faulted step the victim plays the Discrete action that, played now
    while the others play their own choices, then followed by ``attack.lookahead_horizon`` steps of the team's
    own greedy policy, gives the lowest return of the victims' team (its agents' mean, discounted by
    ``attack.lookahead_gamma``, plus their value at the horizon where the policies have value heads), each
    candidate a branch of the running episode (``madistill.branching``). Its action history records its own
    output, the executed actions of its copies where no later action transform changes them (in paired runs each
    fault acts on its own block only)."""

    spaces = ("discrete",)

    def __init__(self, scope: Scope, branching: Branching, horizon: int = 1, gamma: float = 0.99,
                 scored: Sequence[str] | None = None):
        """``scored``: the agents whose mean return the action lowers (None: every agent)."""
        super().__init__(scope)
        self.branching, self.horizon, self.gamma = branching, int(horizon), float(gamma)
        self.scored = None if scored is None else list(scored)
        self.history = ActionHistory()
        self.now: dict[str, np.ndarray] = {}  # this step's joint action before the fault, as the env takes it

    @classmethod
    def from_config(cls, scope: Scope, fc: Any, env: FaultEnv) -> Fault:
        if env.spec is None:
            raise ValueError("fault 'worst' branches the env: FaultEnv needs its spec")
        ac = env.attack
        return cls(scope, Branching(env.spec, env.groups, env.backend), ac.lookahead_horizon if ac else 1,
                   ac.lookahead_gamma if ac else 0.99, worst_scored(env.teams, scope.victims))

    def reset(self) -> None:
        super().reset()
        self.history.reset()

    def start_episodes(self, copies: np.ndarray, seeds: np.ndarray) -> None:
        self.history.start_episodes(copies, seeds)
        super().start_episodes(copies, seeds)

    def __call__(self, actions: GroupTensors, dists: dict[str, Distribution], ctx: StepContext) -> GroupTensors:
        self.now = env_actions(ctx.team, actions)
        out = self.hit(actions, ctx, self.replace)
        return self.history(out, dists, ctx)

    def replace(self, group: AgentGroup, a: torch.Tensor, mask: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        hits = mask.nonzero().cpu().numpy()  # (copy, slot) in a[mask] order
        out = np.zeros(len(hits), dtype=np.int64)
        critic = value_critic(ctx.team)
        for slot in np.unique(hits[:, 1]):
            at = hits[:, 1] == slot
            # the first of the lowest on ties
            out[at] = action_returns(self.branching, ctx.team, self.history, self.now, ctx, group, int(slot), hits[at, 0],
                                     self.horizon, self.gamma, critic, scored=self.scored).argmin(1)
        return torch.as_tensor(out, device=a.device)


def worst_scored(teams: Mapping[str, Sequence[str]] | None, victims: Sequence[str]) -> list[str] | None:
    """The agents whose return the worst action of ``victims`` lowers: their team's (None without teams). Victims
    of several teams have no one team to hurt, which is refused."""
    if not teams:
        return None
    side = victims_team(teams, victims)
    if side is None:
        raise MadistillError(f"fault 'worst' on {', '.join(victims)} would lower one return for victims of several "
                             f"teams ({', '.join(teams)}): fault each team's agents in a run of their own "
                             "(fault.victims=[<agents of one team>])")
    return list(teams[side])


def make_fault(fc: Any, env: FaultEnv, victims: Sequence[str] | None = None) -> Fault:
    """The fault a FaultConfig describes, checked against the env (victims default to ``fc.victims``); every
    mistake a user can make is one MadistillError line naming the setting."""
    if fc.name not in FAULTS:
        raise MadistillError(f"unknown fault {fc.name!r}: use one of {sorted(FAULTS)} (fault=<name>)")
    agents = [a for g in env.groups for a in g.agents]
    victims = list(fc.victims if victims is None else victims)
    unknown = [v for v in victims if v not in agents]
    if unknown or not victims:
        raise MadistillError(f"fault.victims names {unknown or 'no agent'}, not agents of this env (a fault file of "
                             f"conf/fault/ may name them): pass \"fault.victims=[<agents of {agents}>]\"")
    scope = Scope(tuple(victims), int(fc.onset), fc.onset_max, fc.duration, float(fc.rate), int(fc.seed))
    fault = FAULTS[fc.name].from_config(scope, fc, env)
    fault.check(env)
    return fault
