"""mpe2's world physics (``mpe2._mpe_utils.core.World.step``) for many env copies at once.

Every copy's state lives in arrays with a leading copy axis. Each operation follows mpe2's, in mpe2's
order and float64 arithmetic, so every copy steps to the same bits as its own mpe2 env: action decoding
as ``SimpleEnv._set_action``, then action forces, pairwise collision forces summed per entity in mpe2's
loop order, integration, and communication last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIM_P = 2  # mpe2's position dimensionality
MOVE_ACTIONS = DIM_P * 2 + 1  # no-op, -x, +x, -y, +y
SENSITIVITY = 5.0  # mpe2's action scale for agents without their own ``accel``
_SOFTPLUS_ZERO = -800.0  # logaddexp(0, x) == 0.0 exactly for every x below this (exp(x) underflows to 0)


@dataclass(frozen=True)
class WorldLayout:
    """The static part of a scenario's world: its entities (agents first, then landmarks, as mpe2 orders
    ``world.entities``) and mpe2's ``World`` constants."""

    n_agents: int
    sizes: tuple[float, ...]  # per entity
    movable: tuple[bool, ...]  # per entity
    collide: tuple[bool, ...]  # per entity
    silent: tuple[bool, ...]  # per agent
    dim_c: int
    dt: float = 0.1
    damping: float = 0.25
    contact_force: float = 1e2
    contact_margin: float = 1e-3
    mass: float = 1.0
    accel: tuple[float | None, ...] = ()  # per agent (empty: none has its own); None scales by SENSITIVITY
    max_speed: tuple[float | None, ...] = ()  # per agent (empty: no limits); None: no limit

    @property
    def n_entities(self) -> int:
        return len(self.sizes)


class BatchedWorld:
    """Positions, velocities and utterances of ``n_copies`` worlds of one layout, stepped together."""

    # the per-copy arrays that carry over from one step to the next (``u`` and ``said`` are set each step)
    STATE = ("pos", "vel", "c")

    def __init__(self, layout: WorldLayout, n_copies: int):
        if any(layout.movable[layout.n_agents:]):
            raise ValueError("movable landmarks are not modelled: only agents move in the ported scenarios")
        self.layout = layout
        self.pos = np.zeros((n_copies, layout.n_entities, DIM_P))
        self.vel = np.zeros((n_copies, layout.n_entities, DIM_P))
        self.c = np.zeros((n_copies, layout.n_agents, layout.dim_c))  # the utterances agents observe
        self.u = np.zeros((n_copies, layout.n_agents, DIM_P))  # this step's physical actions
        self.said = np.zeros((n_copies, layout.n_agents, layout.dim_c))  # this step's communication actions
        self._moving = np.flatnonzero(layout.movable)
        self._colliders = np.flatnonzero(layout.collide)
        # movers that collide, and each one's position among the movers
        self._pushed = np.array([e for e in self._moving if layout.collide[e]], dtype=np.int64)
        self._pushed_at = np.searchsorted(self._moving, self._pushed)
        sizes = np.asarray(layout.sizes)
        self._dist_min = sizes[self._pushed][:, None] + sizes[self._colliders][None, :]
        self._self_pair = self._pushed[:, None] == self._colliders[None, :]
        self._rows = np.arange(n_copies)
        accel = layout.accel or (None,) * layout.n_agents
        self._sensitivity = np.array([SENSITIVITY if a is None else a for a in accel])[:, None]
        limits = layout.max_speed or (None,) * layout.n_agents
        self._limited = np.array([i for i, m in enumerate(self._moving) if limits[m] is not None], dtype=np.int64)
        self._max_speed = np.array([limits[self._moving[i]] for i in self._limited], dtype=np.float64)

    def reset_copies(self, idx: np.ndarray, pos: np.ndarray) -> None:
        """Copies ``idx`` start at entity positions ``pos`` [copies, entities, 2], at rest and silent."""
        self.pos[idx] = pos
        self.vel[idx] = 0.0
        self.c[idx] = 0.0

    def set_actions(self, actions: list[np.ndarray], continuous: bool) -> None:
        """Decode each agent's actions (``[copies]`` integers, or ``[copies, n]`` values in the Box) into
        forces and utterances, as ``SimpleEnv._execute_world_step`` and ``_set_action`` do."""
        lay = self.layout
        self.u.fill(0.0)
        self.said.fill(0.0)
        for i, a in enumerate(actions):
            if continuous:
                # mpe2 clips Box actions to [0, 1] (ClipOutOfBoundsWrapper) and subtracts in the action's dtype
                a = np.clip(a, 0.0, 1.0)
                if lay.movable[i]:
                    self.u[:, i, 0] += a[:, 2] - a[:, 1]
                    self.u[:, i, 1] += a[:, 4] - a[:, 3]
                    a = a[:, MOVE_ACTIONS:]
                if not lay.silent[i]:
                    self.said[:, i] = a
            else:
                if lay.movable[i]:
                    self.u[:, i] = _MOVES[a % MOVE_ACTIONS]
                    a = a // MOVE_ACTIONS
                if not lay.silent[i]:
                    self.said[self._rows, i, a] = 1.0
        self.u *= self._sensitivity

    def step(self) -> None:
        """One ``World.step``: forces, integration of the movers, then communication (a silent agent's
        ``said`` stays zeros, its utterance in mpe2; others get mpe2's absent noise added as 0.0)."""
        lay, m = self.layout, self._moving
        force = self._forces()
        self.pos[:, m] = self.pos[:, m] + self.vel[:, m] * lay.dt
        velocity = self.vel[:, m] * (1 - lay.damping)
        velocity = velocity + (force / lay.mass) * lay.dt
        if len(self._limited):
            # mpe2 rescales a velocity above the agent's max_speed to it: v / |v| * max_speed
            v = velocity[:, self._limited]
            speed = np.sqrt(np.square(v[..., 0]) + np.square(v[..., 1]))
            over = speed > self._max_speed
            with np.errstate(invalid="ignore", divide="ignore"):  # agents at rest: not over, so v is kept
                scaled = v / speed[..., None] * self._max_speed[:, None]
            velocity[:, self._limited] = np.where(over[..., None], scaled, v)
        self.vel[:, m] = velocity
        self.c[...] = self.said + 0.0

    def _forces(self) -> np.ndarray:
        """``[copies, movers, 2]``: each mover's action (mpe2 adds the absent motor noise as 0.0), then the
        contact force of every other colliding entity in ascending entity order, the order mpe2's ``a < b``
        pair loop adds them in (``F(e, o) = -F(o, e)`` bit for bit: the relative position only changes sign).
        A mover's pair with itself adds +0.0, which changes no sum: a sum that starts at +0.0 never becomes -0.0."""
        lay = self.layout
        force = self.u[:, self._moving] + 0.0
        if len(self._pushed) == 0 or len(self._colliders) < 2:
            return force
        # one [copies, pushed, colliders] array per coordinate: numpy is slow on a trailing axis of 2
        delta = [p[:, self._pushed, None] - p[:, None, self._colliders] for p in (self.pos[..., 0], self.pos[..., 1])]
        dist = np.sqrt(np.square(delta[0]) + np.square(delta[1]))
        k = lay.contact_margin
        x = -(dist - self._dist_min) / k
        # mpe2's softplus penetration ``logaddexp(0, x)`` is exactly 0.0 where exp(x) underflows to 0 (x below
        # about -745), as between entities more than 0.75 apart; only the others take its (slow) scalar loop
        softplus = np.zeros_like(x)
        near = x > _SOFTPLUS_ZERO
        softplus[near] = np.logaddexp(0, x[near])
        penetration = softplus * k
        with np.errstate(invalid="ignore", divide="ignore"):  # self pairs: 0 / 0, replaced below
            f = [lay.contact_force * d / dist * penetration for d in delta]
        for axis, fa in enumerate(f):
            fa[:, self._self_pair] = 0.0
            for o in range(len(self._colliders)):
                force[:, self._pushed_at, axis] = fa[:, :, o] + force[:, self._pushed_at, axis]
        return force

    def distances(self, a: np.ndarray | slice, b: np.ndarray | slice) -> np.ndarray:
        """``[copies, len(a), len(b)]`` distances between entities ``a`` and ``b`` as mpe2 computes each,
        ``sqrt(sum(square(pos_a - pos_b)))``."""
        dx, dy = (p[:, a, None] - p[:, None, b] for p in (self.pos[..., 0], self.pos[..., 1]))
        return np.sqrt(np.square(dx) + np.square(dy))


# Discrete movement actions (no-op, -x, +x, -y, +y) as unit directions, scaled by each agent's sensitivity after
_MOVES = np.array([[0.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
