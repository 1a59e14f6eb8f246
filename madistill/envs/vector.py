"""N copies of a PettingZoo env stepped together, with per-group batched arrays in and out.

Layout: for group ``g`` with ``n_g`` agents, observations are ``[num_envs, n_g, obs_dim]`` float32,
rewards/flags ``[num_envs, n_g]``. Agents that are gone (terminated early, or absent) sit in an absorbing
zero observation with ``active=False``; rollouts mask them out of losses and statistics. Copies reset
themselves when their episode ends; copy ``i`` plays episode seeds ``seed + i + k * num_envs`` (k = 0, 1,
...) so every run of the same seed sees the same episodes, whatever the number of workers. With a
``seed_period`` P, copy ``i`` plays ``seed + i % P + k * P`` instead: copies i, i + P, i + 2P, ... play the
same episodes side by side (paired counterfactual runs, each block under its own transforms).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from gymnasium import spaces

from madistill.envs.batched import batched_copies, choose_backend
from madistill.envs.episodes import EpisodeRecord
from madistill.envs.factory import EnvSpec, make_env
from madistill.envs.groups import AgentGroup, flatten_obs, group_agents
from madistill.errors import MadistillError

GroupArrays = dict[str, np.ndarray]
_PARENT_CHECK_S = 1.0  # how often an idle env worker checks that its parent is still alive


@dataclass
class VecStep:
    """What one step of all copies returns. All dicts are keyed by group name."""

    obs: GroupArrays  # [N, n_g, d] observation the agents act on next (after auto-reset)
    rewards: GroupArrays  # [N, n_g]
    terminated: GroupArrays  # [N, n_g] the agent's episode ended by termination (no bootstrap)
    truncated: GroupArrays  # [N, n_g] ended by a time limit (bootstrap from final_obs)
    final_obs: GroupArrays  # [N, n_g, d] observation at which an agent's episode ended, zeros elsewhere
    active: GroupArrays  # [N, n_g] agent is alive in ``obs`` and will act on it
    episodes: list[EpisodeRecord]  # episodes that finished during this step

    @property
    def dones(self) -> GroupArrays:
        return {g: self.terminated[g] | self.truncated[g] for g in self.terminated}


class _StepArrays:
    """Every array one step exchanges with the env copies, for all copies: the actions in; observations,
    rewards and flags out (``VecStep``'s fields). With worker processes it lives in shared memory and each
    worker writes its slice of the copies in place, so a step pipes only a command and the finished
    episodes, not pickled arrays (that pickling cost a sixth of an mpe2 step)."""

    OUT = ("obs", "rewards", "terminated", "truncated", "final_obs", "active")

    def __init__(self, groups: Sequence[AgentGroup], num_envs: int, memory: Any = None):
        """``memory``: a buffer of ``nbytes(groups, num_envs)`` bytes to lay the arrays over (shared memory
        from ``multiprocessing``); None allocates private memory."""
        layout, nbytes = self._layout(groups, num_envs)
        if memory is None:
            memory = np.zeros(nbytes, dtype=np.uint8)
        self.memory = memory
        raw = np.frombuffer(memory, dtype=np.uint8)
        self.fields: dict[str, GroupArrays] = {}
        for field, group, dtype, shape, offset in layout:
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            self.fields.setdefault(field, {})[group] = raw[offset: offset + size].view(dtype).reshape(shape)

    @staticmethod
    def _layout(groups: Sequence[AgentGroup], n: int) -> tuple[list[tuple[str, str, Any, tuple[int, ...], int]], int]:
        """(field, group, dtype, shape, byte offset) of every array, 8-byte aligned, and the bytes they take."""
        layout, offset = [], 0
        for g in groups:
            flags = (n, g.n_agents)
            for field, shape, dtype in (
                ("obs", (*flags, g.obs_dim), np.float32), ("final_obs", (*flags, g.obs_dim), np.float32),
                ("rewards", flags, np.float32), ("terminated", flags, np.bool_), ("truncated", flags, np.bool_),
                ("active", flags, np.bool_), ("actions", (*flags, *g.action_space.shape), _action_dtype(g)),
            ):
                layout.append((field, g.name, dtype, shape, offset))
                offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 8) * 8
        return layout, offset

    @staticmethod
    def nbytes(groups: Sequence[AgentGroup], num_envs: int) -> int:
        """The size of the memory to lay a ``_StepArrays`` over."""
        return _StepArrays._layout(groups, num_envs)[1]

    def copies(self, lo: int, hi: int) -> dict[str, GroupArrays]:
        """Views of copies ``lo:hi`` of every field (what one worker writes)."""
        return {f: {g: a[lo:hi] for g, a in arrays.items()} for f, arrays in self.fields.items()}

    def result(self, episodes: list[EpisodeRecord]) -> VecStep:
        """A VecStep holding copies of the outputs, so the next step cannot overwrite what a caller keeps."""
        return VecStep(*({g: a.copy() for g, a in self.fields[f].items()} for f in self.OUT), episodes=episodes)


def _action_dtype(group: AgentGroup) -> Any:
    return np.int64 if group.discrete else group.action_space.dtype


class CopyBook:
    """Env copies owned by one process, writing each step's outputs into ``io`` (its copies' slice of a
    ``_StepArrays``) and reading the actions there. This base does the bookkeeping every backend shares:
    which slot each agent writes, whose episode each copy plays, clearing the outputs and the NaN check. A
    backend implements ``_build``, ``_reset_all``, ``step()``, ``render(i)`` and ``close()``."""

    def __init__(
        self,
        spec: EnvSpec,
        groups: list[AgentGroup],
        copy_ids: Sequence[int],
        num_envs: int,
        io: dict[str, GroupArrays],
        render_mode: str | None = None,
        nan_policy: str = "error",
        seed_period: int | None = None,
    ):
        """``groups``: the parent's, which ``io`` (this process's slice of the ``_StepArrays``) is laid out by;
        ``seed_period``: copies this many apart play the same episode seeds (None: ``num_envs``, all differ)."""
        self.nan_policy = nan_policy
        self.copy_ids = np.asarray(copy_ids, dtype=np.int64)
        self.num_envs = num_envs
        self.period = seed_period or num_envs
        self.env_id = spec.id
        self.groups = groups
        self.io = io
        self.slot = {a: (g.name, j) for g in self.groups for j, a in enumerate(g.agents)}
        self.episode_idx = np.zeros(len(self.copy_ids), dtype=np.int64)
        self.ep_len = np.zeros(len(self.copy_ids), dtype=np.int64)
        self.first = self.copy_ids % self.period  # each copy's first episode seed
        self._build(spec, render_mode)

    def _build(self, spec: EnvSpec, render_mode: str | None) -> None:
        """Create the backend's copies of ``spec``."""
        raise NotImplementedError

    def _reset_all(self) -> None:
        """Start every copy's first episode (``playing()`` gives the seeds); write ``obs`` and ``active``."""
        raise NotImplementedError

    def reset(self, seed: int) -> np.ndarray:
        """Reset every copy; writes ``obs`` and ``active``, returns ``playing()``."""
        return self.reset_to(seed + self.copy_ids % self.period)

    def reset_to(self, seeds: np.ndarray) -> np.ndarray:
        """Reset copy i to episode seed ``seeds[i]`` (its later episodes follow ``period`` apart); writes ``obs``
        and ``active``, returns ``playing()``. Branching (``envs.branching``) replays chosen episodes this way."""
        self.first = np.asarray(seeds, dtype=np.int64).copy()
        self.episode_idx[:] = 0
        self._clear()
        self._reset_all()
        self._check_finite(self.io["obs"])
        return self.playing()

    def _clear(self) -> None:
        for field in _StepArrays.OUT:
            for a in self.io[field].values():
                a.fill(0)

    def _check_finite(self, arrays: GroupArrays) -> None:
        """One vectorised check per step; NaN/inf either stops the run or becomes 0 (env.nan_policy)."""
        for g, a in arrays.items():
            bad = ~np.isfinite(a)
            if bad.any():
                if self.nan_policy == "error":
                    i, j = np.argwhere(bad)[0][:2]
                    agent = next(ag for ag, (gg, jj) in self.slot.items() if gg == g and jj == j)
                    raise MadistillError(
                        f"env {self.env_id!r} returned a NaN/inf observation for {agent!r} (copy {self.copy_ids[i]}, "
                        f"episode step {self.ep_len[i]}): "
                        "fix the env, or set env.nan_policy=zero to replace non-finite values with 0"
                    )
                a[bad] = 0.0

    def _episode_seed(self, i: int) -> int:
        """Copy i's k-th episode has seed ``first[i] + k * period`` (``first``: ``seed + copy_id % period``)."""
        return int(self.playing()[i])

    def playing(self) -> np.ndarray:
        """The seed of the episode each copy is playing."""
        return self.first + self.episode_idx * self.period


class _Copies(CopyBook):
    """PettingZoo env copies: one env per copy, stepped one after another."""

    def _build(self, spec: EnvSpec, render_mode: str | None) -> None:
        self.envs = [make_env(spec, render_mode=render_mode) for _ in self.copy_ids]
        self.flatten = {a: _flattener(self.envs[0].observation_space(a)) for a in self.slot}
        self.ep_ret = [dict.fromkeys(self.slot, 0.0) for _ in range(len(self.envs))]

    def _write_obs(self, out: GroupArrays, i: int, agent: str, obs: Any) -> None:
        g, j = self.slot[agent]
        out[g][i, j] = self.flatten[agent](obs)

    def _reset_copy(self, i: int) -> None:
        obs, _ = self.envs[i].reset(seed=self._episode_seed(i))
        for agent in self.envs[i].agents:
            self._write_obs(self.io["obs"], i, agent, obs[agent])
            g, j = self.slot[agent]
            self.io["active"][g][i, j] = True
        self.ep_len[i] = 0
        self.ep_ret[i] = dict.fromkeys(self.slot, 0.0)

    def _reset_all(self) -> None:
        for i in range(len(self.envs)):
            self._reset_copy(i)

    def step(self, _: None = None) -> tuple[list[EpisodeRecord], np.ndarray]:
        """Step every copy with the actions in ``io["actions"]``; writes the outputs, returns the finished
        episodes and ``playing()``."""
        self._clear()
        io = self.io
        obs_out, final_obs, active = io["obs"], io["final_obs"], io["active"]
        # the buffer is overwritten next step, and an env may keep the (Box) action it was given
        actions = {g: a.copy() for g, a in io["actions"].items()}
        rew, term, trunc = io["rewards"], io["terminated"], io["truncated"]
        episodes: list[EpisodeRecord] = []
        for i, env in enumerate(self.envs):
            acting = list(env.agents)
            act = {}
            for agent in acting:
                g, j = self.slot[agent]
                act[agent] = actions[g][i, j]
            obs, r, te, tr, _ = env.step(act)
            self.ep_len[i] += 1
            for agent in acting:
                g, j = self.slot[agent]
                rew[g][i, j] = r.get(agent, 0.0)
                self.ep_ret[i][agent] += float(rew[g][i, j])
                term[g][i, j] = bool(te.get(agent, False))
                trunc[g][i, j] = bool(tr.get(agent, False)) and not term[g][i, j]
            alive = [a for a in env.agents if not (te.get(a, False) or tr.get(a, False))]
            if not alive:
                # Whole episode over: agents still acting were cut by the episode end, not terminated.
                for agent in acting:
                    g, j = self.slot[agent]
                    if not term[g][i, j]:
                        trunc[g][i, j] = True
                    if agent in obs:
                        self._write_obs(final_obs, i, agent, obs[agent])
                episodes.append(EpisodeRecord(seed=self._episode_seed(i), length=int(self.ep_len[i]), agent_returns=dict(self.ep_ret[i])))
                self.episode_idx[i] += 1
                self._reset_copy(i)
                continue
            for agent in alive:  # agents joining mid-episode included
                g, j = self.slot[agent]
                self._write_obs(obs_out, i, agent, obs[agent])
                active[g][i, j] = True
            for agent in acting:
                if agent not in alive and agent in obs:
                    self._write_obs(final_obs, i, agent, obs[agent])
        self._check_finite(obs_out)
        self._check_finite(final_obs)
        return episodes, self.playing()

    def render(self, i: int) -> Any:
        return self.envs[i].render()

    def close(self) -> None:
        for env in self.envs:
            env.close()


# env.num_workers=null by chosen backend: PettingZoo copies step one at a time in Python, so two worker processes
# use both cores of a 2-core machine; the batched port steps every copy with one set of array operations, which
# the worker pipes and the split would only slow down (docs/batched_mpe.md)
DEFAULT_WORKERS = {"pettingzoo": 2, "batched": 0}


def _copies_class(backend: str) -> type[CopyBook]:
    """The class that steps a process's copies for a chosen backend (``batched`` or ``pettingzoo``)."""
    return batched_copies() if backend == "batched" else _Copies


def _worker(conn: Connection, spec: EnvSpec, groups: list[AgentGroup], copy_ids: list[int], num_envs: int,
            nan_policy: str, memory: Any, backend: str, seed_period: int | None) -> None:
    # Signals are the parent's to handle (Ctrl-C and a cluster's SIGTERM checkpoint there, then close us); a
    # worker only outlives a parent killed outright, so it watches for that instead of lingering.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    lo, hi = copy_ids[0], copy_ids[-1] + 1
    try:
        copies = _copies_class(backend)(spec, groups, copy_ids, num_envs,
                                        _StepArrays(groups, num_envs, memory).copies(lo, hi), nan_policy=nan_policy,
                                        seed_period=seed_period)
        conn.send(("ok", None))
    except BaseException as e:  # report construction errors to the parent instead of dying silently
        conn.send(("error", (isinstance(e, MadistillError), str(e) or traceback.format_exc())))
        return
    while True:
        if not conn.poll(_PARENT_CHECK_S):
            if os.getppid() != parent:
                return
            continue
        cmd, arg = conn.recv()
        try:
            if cmd == "close":
                copies.close()
                conn.send(("ok", None))
                return
            result = getattr(copies, cmd)(arg)
            conn.send(("ok", result))
        except BaseException as e:
            conn.send(("error", (isinstance(e, MadistillError), str(e) if isinstance(e, MadistillError) else traceback.format_exc())))


class MultiAgentVecEnv:
    """``num_envs`` copies of one PettingZoo env, grouped by agent spaces, stepped in lock-step.

    ``num_workers=0`` steps every copy in this process (simplest, used for rendering and tests);
    ``num_workers=W`` splits the copies over W worker processes so env stepping uses several cores;
    ``num_workers=None`` takes the chosen backend's default (``DEFAULT_WORKERS``).
    ``backend`` (env.backend): ``pettingzoo`` steps one PettingZoo env per copy, ``batched`` a batched port of
    an mpe2 env (``madistill.envs.batched``) all copies at once, ``auto`` the port where there is one.
    ``seed_period`` P (a divisor of ``num_envs``): copies P apart play the same episode seeds (module docstring).
    """

    def __init__(
        self,
        spec: EnvSpec,
        num_envs: int,
        num_workers: int | None = 0,
        grouping: str = "auto",
        render_mode: str | None = None,
        nan_policy: str = "error",
        start_method: str = "fork",
        backend: str = "auto",
        seed_period: int | None = None,
    ):
        if seed_period is not None and (seed_period < 1 or num_envs % seed_period):
            raise ValueError(f"seed_period must divide num_envs={num_envs}, got {seed_period}")
        self.spec = spec
        self.num_envs = num_envs
        self.grouping, self.nan_policy, self.seed_period = grouping, nan_policy, seed_period
        self.backend = choose_backend(spec, backend, render_mode)
        copies = _copies_class(self.backend)
        self.num_workers = min(DEFAULT_WORKERS[self.backend] if num_workers is None else num_workers, num_envs)
        num_workers = self.num_workers
        self._local: CopyBook | None = None
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        probe = make_env(spec)
        self.groups: list[AgentGroup] = group_agents(probe, grouping)
        self.possible_agents: list[str] = list(probe.possible_agents)
        self.feature_names: dict[str, list[str] | None] = _feature_names(probe, self.groups)
        probe.close()
        self.episode_seeds = np.zeros(0, dtype=np.int64)
        if render_mode is not None and num_workers > 0:
            raise MadistillError("rendering needs env.num_workers=0")
        if num_workers == 0:
            self._arrays = _StepArrays(self.groups, num_envs)
            self._local = copies(spec, self.groups, range(num_envs), num_envs, self._arrays.copies(0, num_envs),
                                 render_mode, nan_policy, seed_period)
        else:
            ctx = mp.get_context(start_method)
            self._arrays = _StepArrays(self.groups, num_envs, ctx.RawArray("B", _StepArrays.nbytes(self.groups, num_envs)))
            for ids in np.array_split(np.arange(num_envs), num_workers):
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=_worker,
                    args=(child, spec, self.groups, ids.tolist(), num_envs, nan_policy, self._arrays.memory, self.backend,
                          seed_period),
                    daemon=True,
                )
                p.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(p)
            for conn in self._conns:
                self._recv(conn)

    episode_seeds: np.ndarray
    """``[num_envs]``: the seed of the episode each copy plays in the latest observations (set by ``reset``
    and ``step``; empty before the first ``reset``)."""

    def with_copies(self, num_envs: int) -> MultiAgentVecEnv:
        """A vector env of the same env, backend, grouping and NaN policy with ``num_envs`` copies, stepped in this
        process (for the batched backend, where one set of array operations steps any number of copies)."""
        return MultiAgentVecEnv(self.spec, num_envs, 0, self.grouping, nan_policy=self.nan_policy, backend=self.backend)

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def _recv(self, conn: Connection) -> Any:
        status, payload = conn.recv()
        if status == "error":
            user_error, msg = payload
            self.close()
            raise MadistillError(msg) if user_error else RuntimeError(f"env worker failed:\n{msg}")
        return payload

    def _call(self, cmd: str, args: list[Any]) -> list[Any]:
        for conn, a in zip(self._conns, args):
            conn.send((cmd, a))
        return [self._recv(conn) for conn in self._conns]

    def reset(self, seed: int = 0) -> tuple[GroupArrays, GroupArrays]:
        """Reset every copy (copy i to episode seed ``seed + i``); returns (obs, active)."""
        if self._local is not None:
            self.episode_seeds = np.array(self._local.reset(seed))
        else:
            self.episode_seeds = np.concatenate(self._call("reset", [seed] * len(self._conns)))
        res = self._arrays.result([])
        return res.obs, res.active

    def step(self, actions: GroupArrays) -> VecStep:
        """Apply one action per agent slot: per group ``[N, n_g]`` integers (Discrete) or ``[N, n_g, *shape]``
        numbers (Box, cast to the space's dtype); a wrong shape, type or range is a MadistillError."""
        for g in self.groups:
            self._arrays.fields["actions"][g.name][...] = _checked_actions(g, actions.get(g.name), self.num_envs)
        parts = [self._local.step()] if self._local is not None else self._call("step", [None] * len(self._conns))
        self.episode_seeds = np.concatenate([seeds for _, seeds in parts])
        return self._arrays.result([e for episodes, _ in parts for e in episodes])

    def render(self, i: int = 0) -> Any:
        if self._local is None:
            raise MadistillError("rendering needs env.num_workers=0")
        return self._local.render(i)

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        for conn in self._conns:
            try:
                conn.send(("close", None))
                conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.terminate()
        self._conns, self._procs = [], []

    def __enter__(self) -> MultiAgentVecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked_actions(group: AgentGroup, actions: Any, num_envs: int) -> np.ndarray:
    """A group's actions as the env may take them, or a one-line error naming what is wrong: the env's own
    wrappers that check actions are skipped (``aec_cycle``), so the check is here, for every backend."""
    shape = (num_envs, group.n_agents, *group.action_space.shape)
    a = np.asarray(actions)
    if actions is None or a.shape != shape:
        got = "no actions" if actions is None else f"shape {a.shape}"
        raise MadistillError(f"group {group.name!r} needs actions of shape {shape} (copies, agents, action), got {got}")
    if group.discrete:
        if a.dtype.kind not in "iu":
            raise MadistillError(f"group {group.name!r} has Discrete actions: give integers, got {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= group.action_space.n):
            raise MadistillError(f"group {group.name!r}: actions must be in 0..{group.action_space.n - 1}, got "
                                 f"{a.min()}..{a.max()}")
    elif not np.isfinite(a).all():
        raise MadistillError(f"group {group.name!r}: NaN/inf actions")
    return a


def _flattener(space: Any) -> Any:
    """Per-agent observation flattening; Box gets a fast path (gymnasium's generic flatten is slow)."""
    if isinstance(space, spaces.Box):
        return lambda o: np.asarray(o, dtype=np.float32).reshape(-1)
    return lambda o: flatten_obs(space, o)


def _feature_names(env: Any, groups: list[AgentGroup]) -> dict[str, list[str] | None]:
    """Feature names per group where the env provides ``feature_names(agent)`` (e.g. envs.relay) and every agent
    of the group names its features alike: where they differ (relay's source reads its target where the others
    read a neighbour), no one agent's names say what a shared policy's input is, so the group gets none."""
    fn = getattr(env, "feature_names", None) or getattr(getattr(env, "unwrapped", None), "feature_names", None)
    out: dict[str, list[str] | None] = {}
    for g in groups:
        try:
            names = [list(fn(a)) for a in g.agents] if callable(fn) else None
        except Exception:  # an env's optional helper must not break env construction
            names = None
        same = names is not None and all(n == names[0] for n in names) and len(names[0]) == g.obs_dim
        out[g.name] = names[0] if same else None
    return out
