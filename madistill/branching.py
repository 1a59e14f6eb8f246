"""Env branching: candidate continuations of running episodes, played in extra env copies.

A branch starts where an episode is now (its seed and the actions executed so far, the prefix), plays one
candidate joint action, then ``horizon`` steps of the team's own greedy policy, and scores the team return
over those steps (plus a critic's discounted value at the end, where given). PettingZoo envs have no
snapshot, so the ``pettingzoo`` backend replays the prefix from the episode seed in every branch. The
batched mpe2 ports copy state instead: a trunk of one copy per episode follows the prefix (one step per call
while the prefix grows by one step) and every branch starts from a copy of its trunk's state. Both give the
same numbers (tests/test_branching.py). Replay needs an env whose episodes follow from their seed: a branch
point whose replayed observations differ from the ones the rollout saw is refused in one line
(:class:`NotBranchable`).

The lookahead attack (``attacks.lookahead``) stands on :func:`joint_returns` (joint actions of several agents),
the ``worst`` action fault (``cascade.faults``) on :func:`action_returns` (one agent's actions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.distributions import Distribution

from madistill.envs.batched import choose_backend
from madistill.envs.factory import EnvSpec
from madistill.envs.groups import AgentGroup
from madistill.envs.vector import CopyBook, GroupArrays, _copies_class, _StepArrays
from madistill.errors import MadistillError
from madistill.policies.base import TeamPolicy
from madistill.rollout import env_actions, team_actions
from madistill.transforms import ActionTransform, GroupTensors, StepContext, normalize


class NotBranchable(MadistillError):
    """The env or the agent cannot be branched: its episodes do not follow from their seed, or its actions are
    not Discrete. The attack suite skips its lookahead attack with a note on this error."""


class ActionHistory(ActionTransform):
    """The identity on actions that records, per env copy, the actions the env is given since the copy's
    episode began: the prefix a branch replays. It must come after every transform that changes actions."""

    def __init__(self) -> None:
        self.steps: list[GroupArrays] = []  # per rollout step, every copy's executed actions
        self.begin = np.zeros(0, dtype=np.int64)  # [N] index in ``steps`` of each copy's first episode step

    def reset(self) -> None:
        self.steps, self.begin = [], np.zeros(0, dtype=np.int64)

    def start_episodes(self, copies: np.ndarray, seeds: np.ndarray) -> None:
        n = int(copies.max()) + 1
        if n > len(self.begin):
            self.begin = np.concatenate([self.begin, np.zeros(n - len(self.begin), dtype=np.int64)])
        self.begin[copies] = len(self.steps)
        # steps before every copy's episode are never replayed again
        drop = int(self.begin.min())
        self.steps, self.begin = self.steps[drop:], self.begin - drop

    def __call__(self, actions: GroupTensors, dists: dict[str, Distribution], ctx: StepContext) -> GroupTensors:
        self.steps.append(env_actions(ctx.team, actions))
        return actions

    def prefix(self, rows: np.ndarray) -> list[GroupArrays]:
        """The actions executed in copies ``rows`` since their episodes began (the copies must be at the same
        episode step)."""
        begin = np.unique(self.begin[rows])
        if len(begin) != 1:
            raise ValueError("a prefix is taken for copies at one episode step")
        return [{g: a[rows] for g, a in s.items()} for s in self.steps[int(begin[0]):]]


class Branching:
    """Continuations of running episodes of ``spec`` in extra env copies of the chosen backend (env.backend:
    ``auto`` takes the batched port, and its state copy, where there is one)."""

    def __init__(self, spec: EnvSpec, groups: Sequence[AgentGroup], backend: str = "auto"):
        self.spec, self.groups = spec, list(groups)
        self.backend = choose_backend(spec, backend)
        self._books: dict[tuple[str, int], CopyBook] = {}
        self._trunk_taken: list[GroupArrays] = []  # the actions the trunk played since its reset
        self._trunk_seeds = np.zeros(0, dtype=np.int64)

    def _book(self, role: str, n: int) -> CopyBook:
        """``n`` local env copies for ``role`` (trunk or branches), built once per size."""
        if (role, n) not in self._books:
            arrays = _StepArrays(self.groups, n)
            self._books[(role, n)] = _copies_class(self.backend)(self.spec, self.groups, range(n), n,
                                                                   arrays.copies(0, n))
        return self._books[(role, n)]

    def _start(self, seeds: np.ndarray, prefix: Sequence[GroupArrays], k: int) -> CopyBook:
        """``k`` branches of each episode at the end of its prefix: copy ``j * B + i`` continues episode ``i``."""
        b = len(seeds)
        branches = self._book("branches", k * b)
        if self.backend != "batched":  # no snapshot: replay every prefix from its seed
            branches.reset_to(np.tile(seeds, k))
            for a in prefix:
                _step(branches, {g: np.concatenate([x] * k) for g, x in a.items()})
            return branches
        trunk = self._book("trunk", b)
        taken = self._trunk_taken
        same = (np.array_equal(self._trunk_seeds, seeds) and len(taken) <= len(prefix)
                and all(np.array_equal(x[g], y[g]) for x, y in zip(taken, prefix) for g in x))
        if not same:
            trunk.reset_to(seeds)
            self._trunk_seeds, self._trunk_taken = np.array(seeds, dtype=np.int64), []
        for a in prefix[len(self._trunk_taken):]:
            _step(trunk, a)
            self._trunk_taken.append(a)
        branches.copy_from(trunk, np.tile(np.arange(b), k))  # type: ignore[attr-defined]
        return branches

    def returns(self, team: TeamPolicy, seeds: np.ndarray, prefix: Sequence[GroupArrays], first: Sequence[GroupArrays],
                horizon: int, gamma: float = 1.0, critic: TeamPolicy | None = None,
                expect: GroupTensors | None = None, scored: Sequence[str] | None = None) -> np.ndarray:
        """``[B, K]``: for episodes ``seeds`` ``[B]`` after ``prefix`` (per step, every group's executed actions
        ``[B, n_g, ...]``), the discounted return of the ``scored`` agents (their mean, as episode records count
        a team's return; None: every agent) of candidate ``k``'s joint action ``first[k]`` then ``horizon``
        greedy steps of ``team``, plus, where ``critic`` is given and the episode goes on,
        ``gamma ** (horizon + 1)`` times their mean value. ``expect``: the normalised observations (``team``'s
        normaliser) the episodes show at the branch point; a replay that differs is refused (the env is not
        reproducible from its seed)."""
        k, b = len(first), len(seeds)
        book = self._start(np.asarray(seeds, dtype=np.int64), prefix, k)
        if expect is not None:
            self._check(book, team, expect, b)
        mask, n_scored = self._scored(scored)
        total, alive = np.zeros(k * b), np.ones(k * b, dtype=bool)
        gen = torch.Generator(device=team.device).manual_seed(0)  # greedy actions draw nothing
        for t in range(horizon + 1):
            if t == 0:
                actions = {g: np.concatenate([f[g] for f in first]) for g in first[0]}
            else:
                actions = env_actions(team, team_actions(team, _observations(book, team), True, gen)[1])
            episode = book.episode_idx.copy()
            _step(book, actions)
            reward = sum(np.where(mask[g.name], book.io["rewards"][g.name], 0).sum(1) for g in self.groups) / n_scored
            total += np.where(alive, gamma**t * reward, 0.0)
            alive &= book.episode_idx == episode
        if critic is not None and alive.any():
            obs = _observations(book, critic)
            with torch.no_grad():
                value = sum(torch.where(torch.as_tensor(mask[g], device=x.device),  # type: ignore[union-attr]
                                        critic[g].value(x.reshape(-1, x.shape[-1])).reshape(x.shape[:2]), 0).sum(1)
                            for g, x in obs.items()) / n_scored
            total += np.where(alive, gamma ** (horizon + 1) * value.cpu().numpy(), 0.0)
        return total.reshape(k, b).T

    def _scored(self, scored: Sequence[str] | None) -> tuple[dict[str, np.ndarray], int]:
        """Per group, which of its agents the score counts (every agent where ``scored`` is None), and how many
        agents that is in all."""
        chosen = {a for g in self.groups for a in g.agents} if scored is None else set(scored)
        return {g.name: np.array([a in chosen for a in g.agents]) for g in self.groups}, len(chosen)

    def _check(self, book: CopyBook, team: TeamPolicy, expect: GroupTensors, b: int) -> None:
        replayed = _observations(book, team)
        for g, x in expect.items():
            if not torch.equal(replayed[g][:b], x):
                raise NotBranchable(
                    f"env {self.spec.id!r} is not reproducible from its seed: replaying an episode's actions from its "
                    "seed gives other observations, so it cannot be branched; lookahead attacks and the worst-action "
                    "fault need an env that draws all its randomness from the seed given to reset()")


def _step(book: CopyBook, actions: GroupArrays) -> None:
    for g, a in actions.items():
        book.io["actions"][g][...] = a
    book.step()


def _observations(book: CopyBook, team: TeamPolicy) -> GroupTensors:
    return normalize(team, {g: a.copy() for g, a in book.io["obs"].items()})


def action_returns(branching: Branching, team: TeamPolicy, history: ActionHistory, actions: GroupArrays,
                   ctx: StepContext, group: AgentGroup, slot: int, rows: np.ndarray, horizon: int, gamma: float = 1.0,
                   critic: TeamPolicy | None = None, obs: GroupTensors | None = None,
                   scored: Sequence[str] | None = None) -> np.ndarray:
    """``[len(rows), n]``: per env copy in ``rows``, the branched return (:meth:`Branching.returns`, of the
    ``scored`` agents) of each of the ``n`` Discrete actions of agent ``slot`` of ``group``, played now while the
    others play ``actions`` (every group's ``[N, n_g]`` joint action of this step), then ``horizon`` greedy team
    steps. ``obs``: the copies' current normalised observations, to refuse an env whose replays differ."""
    n = discrete_actions(group)
    return joint_returns(branching, team, history, actions, ctx, [(group, slot)], [(k,) for k in range(n)], rows,
                         horizon, gamma, critic, obs, scored)


def joint_returns(branching: Branching, team: TeamPolicy, history: ActionHistory, actions: GroupArrays,
                  ctx: StepContext, agents: Sequence[tuple[AgentGroup, int]], choices: Sequence[Sequence[int]],
                  rows: np.ndarray, horizon: int, gamma: float = 1.0, critic: TeamPolicy | None = None,
                  obs: GroupTensors | None = None, scored: Sequence[str] | None = None) -> np.ndarray:
    """``[len(rows), len(choices)]``: as :func:`action_returns`, for joint choices of several agents at once:
    ``agents`` are (group, slot) pairs with Discrete actions, and ``choices[k][j]`` is the action agent ``j``
    plays in candidate ``k`` while every other agent plays ``actions``."""
    for group, _ in agents:
        discrete_actions(group)
    out = np.zeros((len(rows), len(choices)))
    steps = ctx.episode_step[rows]
    for t in np.unique(steps):  # one prefix length per call
        at = np.flatnonzero(steps == t)
        sel = rows[at]
        base = {g: a[sel] for g, a in actions.items()}
        first = []
        for choice in choices:
            cand = {g: a.copy() for g, a in base.items()}
            for (group, slot), k in zip(agents, choice):
                cand[group.name][:, slot] = k
            first.append(cand)
        expect = {g: x[torch.as_tensor(sel)] for g, x in obs.items()} if obs is not None else None
        out[at] = branching.returns(team, ctx.episode_seed[sel], history.prefix(sel), first, horizon, gamma, critic, expect,
                                    scored)
    return out


def discrete_actions(group: AgentGroup) -> int:
    """The number of ``group``'s Discrete actions; :class:`NotBranchable` for any other action space."""
    if not group.discrete:
        raise NotBranchable(f"branching over actions needs Discrete actions, group {group.name!r} has {group.action_space}")
    return int(group.action_space.n)  # type: ignore[attr-defined]


def value_critic(team: TeamPolicy) -> TeamPolicy | None:
    """``team`` where every group's policy has a value head (its critic for the lookahead), else None."""
    probe = {g.name: torch.zeros(1, g.obs_dim, device=team.device) for g in team.groups}
    with torch.no_grad():
        return team if all(team[g].value(x) is not None for g, x in probe.items()) else None
