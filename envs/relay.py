"""Relay: a PettingZoo ParallelEnv with a known, configurable dependency graph.

N agents sit on a directed graph.  Every step every agent emits one of K
symbols.  A hidden *target* symbol is drawn at reset and, at each step with
probability ``switch_prob``, switches to a uniformly random *different* symbol.
Only *source* agents (agents without in-neighbours) observe the target; every
other agent observes the symbols its in-neighbours emitted on the previous
step.  All agents share one reward per step: the fraction of agents whose
emitted symbol equals the target that was in effect when they acted.

Information about the target therefore has to be relayed along the edges, one
hop per step, which gives a ground-truth dependency structure:

* ``dependency_graph["edges"]`` lists ``(src, dst, 1)`` for every direct edge:
  the action ``src`` takes at step ``t`` is in ``dst``'s observation at
  ``t + 1`` and can first change ``dst``'s action at ``t + 1``.
* ``influence_lags()`` gives, for every ordered pair ``(src, dst)`` with
  ``dst`` reachable from ``src``, the shortest-path length: the minimum number
  of steps after which ``src``'s action can first affect ``dst``'s action.
  Unreachable pairs (e.g. downstream -> upstream on a chain) have no entry.

Step order within ``step(actions)``:

1. reward = mean over agents of ``actions[agent] == target_t``;
2. the target may switch (``target_{t+1}``);
3. observations at ``t + 1`` hold the in-neighbours' actions of step ``t``
   and, for sources, the one-hot of ``target_{t+1}``.

Example::

    from envs import relay
    env = relay.parallel_env(n_agents=4, topology="star", n_symbols=3)
    obs, infos = env.reset(seed=0)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from pettingzoo import ParallelEnv
from pettingzoo.utils.conversions import parallel_to_aec

from envs.steps import truncating_step

TOPOLOGIES = ("chain", "star", "edges")

_CELL = 32  # pixel size of one agent square in rgb_array renders
_GAP = 8  # gap between squares / border thickness
_EMPTY_RGB = (128, 128, 128)  # colour of an agent that has not acted yet


def _palette(n: int) -> np.ndarray:
    """``n`` distinct, saturated RGB colours (uint8, shape (n, 3))."""
    cols = np.empty((n, 3), dtype=np.uint8)
    for k in range(n):
        h = k / n
        i = int(h * 6) % 6
        f = h * 6 - int(h * 6)
        v, s = 1.0, 0.85
        p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
        rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
        cols[k] = np.round(np.array(rgb) * 255).astype(np.uint8)
    return cols


def _build_edges(
    n_agents: int, topology: str, edges: Iterable[Sequence[int]] | None
) -> list[tuple[int, int]]:
    """Validate the topology arguments and return a sorted list of index edges."""
    if topology not in TOPOLOGIES:
        raise ValueError(
            f"unknown topology {topology!r}; use one of {list(TOPOLOGIES)} "
            "(with topology='edges' pass edges=[[src, dst], ...])"
        )
    if topology != "edges":
        if edges is not None:
            raise ValueError(
                f"edges=... is only used with topology='edges' (got topology={topology!r}); "
                "either drop edges or set topology='edges'"
            )
        if topology == "chain":
            return [(i, i + 1) for i in range(n_agents - 1)]
        return [(0, i) for i in range(1, n_agents)]  # star: agent 0 is the hub

    if edges is None:
        raise ValueError("topology='edges' needs an explicit edges=[[src, dst], ...] list")
    out: set[tuple[int, int]] = set()
    for e in edges:
        try:
            src, dst = e
        except (TypeError, ValueError):
            raise ValueError(
                f"bad edge {e!r}: each edge must be a pair [src, dst] of agent indices"
            ) from None
        if (
            isinstance(src, bool)
            or isinstance(dst, bool)
            or not (isinstance(src, (int, np.integer)) and isinstance(dst, (int, np.integer)))
        ):
            raise ValueError(
                f"bad edge {e!r}: src and dst must be integer agent indices in [0, {n_agents - 1}]"
            )
        src, dst = int(src), int(dst)
        if not (0 <= src < n_agents and 0 <= dst < n_agents):
            raise ValueError(
                f"edge {[src, dst]} is out of range for n_agents={n_agents}; "
                f"indices must lie in [0, {n_agents - 1}] (or raise n_agents)"
            )
        if src == dst:
            raise ValueError(
                f"self loop {[src, dst]} is not allowed; remove it "
                "(an agent always knows its own last action)"
            )
        if (src, dst) in out:
            raise ValueError(f"duplicate edge {[src, dst]}; list each edge once")
        out.add((src, dst))
    return sorted(out)


class RelayEnv(ParallelEnv):
    """Relay ParallelEnv (``relay_v0``).

    Args:
        n_agents: number of agents, named ``agent_0 .. agent_{n_agents-1}``.
        n_symbols: number of symbols K (>= 2); action space ``Discrete(K)``.
        topology: ``"chain"`` (0->1->...->N-1), ``"star"`` (0->i for all i>0)
            or ``"edges"`` (use ``edges``).
        edges: list of ``[src, dst]`` index pairs, only with ``topology="edges"``.
            At least one agent must have no in-neighbours (a source).
        switch_prob: per-step probability that the target switches to a
            uniformly random different symbol.
        max_cycles: episode length; all agents are truncated after this many steps.
        render_mode: ``None``, ``"rgb_array"``, ``"ansi"`` or ``"human"`` (text).

    Attributes:
        possible_agents / agents: agent names.
        edges: sorted list of ``(src_index, dst_index)``.
        in_neighbours: ``{agent: [in-neighbour names, sorted by index]}``; this
            is the order of the one-hot blocks in that agent's observation.
        sources: names of agents with no in-neighbours (they observe the target).
        dependency_graph: ``{"edges": [(src, dst, lag), ...]}`` with lag 1 for
            every direct edge (``src``'s action at ``t`` can first affect
            ``dst``'s action at ``t + 1``).
        target: the current hidden target symbol (for evaluation only).
        target_history: targets in effect at each step taken this episode.
        last_actions: ``{agent: symbol}`` emitted on the previous step
            (empty right after reset).

    Observation of agent i: ``Box(0, 1, (d_i,), float32)``, the concatenation
    of one one-hot block of size K per in-neighbour (the symbol it emitted on
    the previous step; all zeros at t = 0), followed, for sources only, by the
    one-hot of the current target.  See ``feature_names(agent)``.
    """

    metadata = {
        "name": "relay_v0",
        "render_modes": ["rgb_array", "ansi", "human"],
        "is_parallelizable": True,
        "render_fps": 4,
    }

    def __init__(
        self,
        n_agents: int = 4,
        n_symbols: int = 3,
        topology: str = "chain",
        edges: Iterable[Sequence[int]] | None = None,
        switch_prob: float = 0.1,
        max_cycles: int = 25,
        render_mode: str | None = None,
    ):
        if isinstance(n_agents, bool) or not isinstance(n_agents, (int, np.integer)) or n_agents < 1:
            raise ValueError(f"n_agents must be an integer >= 1, got {n_agents!r}")
        if isinstance(n_symbols, bool) or not isinstance(n_symbols, (int, np.integer)) or n_symbols < 2:
            raise ValueError(
                f"n_symbols must be an integer >= 2 (the target switches to a different symbol), "
                f"got {n_symbols!r}"
            )
        if not 0.0 <= float(switch_prob) <= 1.0:
            raise ValueError(f"switch_prob must lie in [0, 1], got {switch_prob!r}")
        if isinstance(max_cycles, bool) or not isinstance(max_cycles, (int, np.integer)) or max_cycles < 1:
            raise ValueError(f"max_cycles must be an integer >= 1, got {max_cycles!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode {render_mode!r} not supported; use None or one of "
                f"{self.metadata['render_modes']}"
            )

        self.n_agents = int(n_agents)
        self.n_symbols = int(n_symbols)
        self.topology = topology
        self.switch_prob = float(switch_prob)
        self.max_cycles = int(max_cycles)
        self.render_mode = render_mode

        self.edges = _build_edges(self.n_agents, topology, edges)
        self.possible_agents = [f"agent_{i}" for i in range(self.n_agents)]
        self.agents: list[str] = []
        self._index = {a: i for i, a in enumerate(self.possible_agents)}

        preds: list[list[int]] = [[] for _ in range(self.n_agents)]
        self._succ: list[list[int]] = [[] for _ in range(self.n_agents)]
        for s, d in self.edges:
            preds[d].append(s)
            self._succ[s].append(d)
        self._preds = [sorted(p) for p in preds]
        for s in self._succ:
            s.sort()

        self.in_neighbours = {
            self.possible_agents[i]: [self.possible_agents[j] for j in self._preds[i]]
            for i in range(self.n_agents)
        }
        self.sources = [self.possible_agents[i] for i in range(self.n_agents) if not self._preds[i]]
        if not self.sources:
            raise ValueError(
                "the graph has no source agent (every agent has an in-neighbour), so no "
                "agent can ever see the target; leave at least one agent without incoming edges"
            )
        self.dependency_graph = {
            "edges": [(self.possible_agents[s], self.possible_agents[d], 1) for s, d in self.edges]
        }

        k = self.n_symbols
        self.observation_spaces = {
            a: spaces.Box(0.0, 1.0, (len(self._feature_names(a)),), dtype=np.float32)
            for a in self.possible_agents
        }
        self.action_spaces = {a: spaces.Discrete(k) for a in self.possible_agents}

        self._np_random: np.random.Generator | None = None
        self._palette = _palette(k)
        self.target: int = 0
        self.target_history: list[int] = []
        self.last_actions: dict[str, int] = {}
        self.num_steps = 0

    # ------------------------------------------------------------------ spaces
    def observation_space(self, agent: str) -> spaces.Box:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        return self.action_spaces[agent]

    def _feature_names(self, agent: str) -> list[str]:
        i = self._index[agent]
        names = [
            f"in:{self.possible_agents[j]}=sym{s}" for j in self._preds[i] for s in range(self.n_symbols)
        ]
        if not self._preds[i]:
            names += [f"target=sym{s}" for s in range(self.n_symbols)]
        return names

    def feature_names(self, agent: str) -> list[str]:
        """Names of ``agent``'s observation features, in observation order.

        ``"in:agent_j=symS"`` is 1 iff in-neighbour ``agent_j`` emitted symbol S
        on the previous step; ``"target=symS"`` (sources only) is 1 iff the
        current target is S.
        """
        if agent not in self._index:
            raise KeyError(f"unknown agent {agent!r}; expected one of {self.possible_agents}")
        return self._feature_names(agent)

    # ---------------------------------------------------------- ground truth
    def influence_lags(self) -> dict[tuple[str, str], int]:
        """Shortest influence lag for every reachable ordered pair.

        Returns ``{(src, dst): lag}`` where ``lag`` is the length of the
        shortest directed path from ``src`` to ``dst`` (BFS): ``src``'s action
        at step ``t`` can first affect ``dst``'s action at step ``t + lag``.
        Pairs with ``dst`` unreachable from ``src`` are absent, as are
        ``(a, a)`` self pairs.
        """
        lags: dict[tuple[str, str], int] = {}
        for s in range(self.n_agents):
            dist = {s: 0}
            queue = deque([s])
            while queue:
                u = queue.popleft()
                for v in self._succ[u]:
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        queue.append(v)
            for d, lag in dist.items():
                if d != s:
                    lags[(self.possible_agents[s], self.possible_agents[d])] = lag
        return lags

    # ------------------------------------------------------------- dynamics
    @property
    def np_random(self) -> np.random.Generator:
        if self._np_random is None:
            self._np_random, _ = seeding.np_random()
        return self._np_random

    def _observe(self, agent: str) -> np.ndarray:
        i = self._index[agent]
        k = self.n_symbols
        obs = np.zeros(self.observation_spaces[agent].shape, dtype=np.float32)
        if self._preds[i]:
            for b, j in enumerate(self._preds[i]):
                sym = self.last_actions.get(self.possible_agents[j])
                if sym is not None:
                    obs[b * k + sym] = 1.0
        else:
            obs[self.target] = 1.0
        return obs

    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None or self._np_random is None:
            self._np_random, _ = seeding.np_random(seed)
            if seed is not None:
                for n, a in enumerate(self.possible_agents):
                    self.action_spaces[a].seed(seed + n)
        self.agents = self.possible_agents[:]
        self.num_steps = 0
        self.last_actions = {}
        self.target = int(self.np_random.integers(self.n_symbols))
        self.target_history = []
        obs = {a: self._observe(a) for a in self.agents}
        infos = {a: {} for a in self.agents}
        if self.render_mode == "human":
            self.render()
        return obs, infos

    def step(self, actions: dict[str, int]):
        if not self.agents:
            raise RuntimeError("episode is over (or reset() was never called); call reset() first")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ValueError(f"step() needs an action for every live agent; missing {missing}")
        acts: dict[str, int] = {}
        for a in self.agents:
            act = actions[a]
            if act is None or not self.action_spaces[a].contains(np.int64(act)):
                raise ValueError(
                    f"invalid action {act!r} for {a}; expected an int in [0, {self.n_symbols - 1}]"
                )
            acts[a] = int(act)

        target = self.target
        self.target_history.append(target)
        reward = float(np.mean([acts[a] == target for a in self.agents]))

        if self.switch_prob > 0 and self.np_random.random() < self.switch_prob:
            self.target = int((target + self.np_random.integers(1, self.n_symbols)) % self.n_symbols)

        self.last_actions = acts
        self.num_steps += 1
        out = truncating_step(self, {a: self._observe(a) for a in self.agents}, {a: reward for a in self.agents},
                              self.num_steps >= self.max_cycles)
        if self.render_mode == "human":
            self.render()
        return out

    # ------------------------------------------------------------- rendering
    def _render_text(self) -> str:
        syms = " ".join(
            f"{a}:{self.last_actions[a] if a in self.last_actions else '-'}" for a in self.possible_agents
        )
        return f"t={self.num_steps} target={self.target} | {syms}"

    def _render_rgb(self) -> np.ndarray:
        n = self.n_agents
        h = _CELL + 4 * _GAP
        w = n * _CELL + (n + 3) * _GAP
        img = np.full((h, w, 3), 255, dtype=np.uint8)
        img[:_GAP, :] = img[-_GAP:, :] = self._palette[self.target]  # border = target colour
        img[:, :_GAP] = img[:, -_GAP:] = self._palette[self.target]
        y0 = 2 * _GAP
        for i, a in enumerate(self.possible_agents):
            x0 = 2 * _GAP + i * (_CELL + _GAP)
            sym = self.last_actions.get(a)
            colour = _EMPTY_RGB if sym is None else self._palette[sym]
            img[y0 : y0 + _CELL, x0 : x0 + _CELL] = colour
        return img

    def render(self):
        """``rgb_array``: HxWx3 uint8 image, one square per agent coloured by the
        symbol it last emitted (grey before the first step), framed by a border
        in the target's colour.  ``ansi`` returns a text line; ``human`` prints it."""
        if self.render_mode is None:
            gymnasium.logger.warn(
                "You are calling render() without specifying any render mode; "
                "pass render_mode='rgb_array' (or 'ansi'/'human') to the constructor."
            )
            return None
        if self.render_mode == "rgb_array":
            return self._render_rgb()
        text = self._render_text()
        if self.render_mode == "human":
            print(text)
            return None
        return text

    def close(self):
        pass


def parallel_env(**kwargs) -> RelayEnv:
    """Create the ``relay_v0`` ParallelEnv; kwargs go to :class:`RelayEnv`."""
    return RelayEnv(**kwargs)


def raw_env(**kwargs):
    """AEC version of ``relay_v0`` (no extra wrappers)."""
    return parallel_to_aec(parallel_env(**kwargs))


def env(**kwargs):
    """AEC version of ``relay_v0`` via ``pettingzoo.utils.conversions.parallel_to_aec``."""
    return raw_env(**kwargs)
