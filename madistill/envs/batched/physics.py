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

    @property
    def n_entities(self) -> int:
        return len(self.sizes)

    def action_dims(self, continuous: bool) -> list[int]:
        """Each agent's action space size: ``Box(0, 1, (n,))`` or ``Discrete(n)``, as mpe2's SimpleEnv sets it."""
        dims = []
        for i in range(self.n_agents):
            n = MOVE_ACTIONS if self.movable[i] else (0 if continuous else 1)
            if not self.silent[i]:
                n = n + self.dim_c if continuous else n * self.dim_c
            dims.append(n)
        return dims


class BatchedWorld:
    """Positions, velocities and utterances of ``n_copies`` worlds of one layout, stepped together."""

    def __init__(self, layout: WorldLayout, n_copies: int):
        self.layout = layout
        self.pos = np.zeros((n_copies, layout.n_entities, DIM_P))
        self.vel = np.zeros((n_copies, layout.n_entities, DIM_P))
        self.c = np.zeros((n_copies, layout.n_agents, layout.dim_c))  # the utterances agents observe
        self.u = np.zeros((n_copies, layout.n_agents, DIM_P))  # this step's physical actions
        self.said = np.zeros((n_copies, layout.n_agents, layout.dim_c))  # this step's communication actions
        self._colliders = [i for i in range(layout.n_entities) if layout.collide[i]]
        self._moving = [i for i in range(layout.n_entities) if layout.movable[i]]

    def reset_copy(self, i: int, pos: np.ndarray) -> None:
        """Copy ``i`` starts at entity positions ``pos`` [entities, 2], at rest and silent."""
        self.pos[i] = pos
        self.vel[i] = 0.0
        self.c[i] = 0.0

    def set_actions(self, actions: list[np.ndarray], continuous: bool) -> None:
        """Decode each agent's actions (``[copies]`` integers, or ``[copies, n]`` values in the Box) into
        forces and utterances, as ``SimpleEnv._execute_world_step`` and ``_set_action`` do."""
        lay = self.layout
        self.u.fill(0.0)
        self.said.fill(0.0)
        rows = np.arange(self.u.shape[0])
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
                    move = a % MOVE_ACTIONS
                    for k, (axis, sign) in enumerate(((0, -1.0), (0, 1.0), (1, -1.0), (1, 1.0)), start=1):
                        self.u[move == k, i, axis] = sign
                    a = a // MOVE_ACTIONS
                if not lay.silent[i]:
                    self.said[rows, i, a] = 1.0
        self.u *= SENSITIVITY

    def step(self) -> None:
        """One ``World.step``: forces, integration, then communication."""
        lay = self.layout
        force = self._collision_forces()
        for e in self._moving:
            self.pos[:, e] += self.vel[:, e] * lay.dt
            self.vel[:, e] = self.vel[:, e] * (1 - lay.damping)
            if e in force:
                self.vel[:, e] += (force[e] / lay.mass) * lay.dt
        for i in range(lay.n_agents):
            # mpe2 adds the (absent) communication noise as 0.0; a silent agent's utterance is zeros
            self.c[:, i] = 0.0 if lay.silent[i] else self.said[:, i] + 0.0

    def _collision_forces(self) -> dict[int, np.ndarray]:
        """Each movable entity's force ``[copies, 2]``: its action (agents; mpe2 adds the absent motor noise
        as 0.0), then the contact force of every other colliding entity in ascending entity order, which is
        the order mpe2's ``a < b`` pair loop adds them in. ``F(e, o) = -F(o, e)`` bit for bit, since the
        relative position only changes sign."""
        lay = self.layout
        force = {e: self.u[:, e] + 0.0 for e in self._moving if e < lay.n_agents}
        k = lay.contact_margin
        for e in self._moving:
            if not lay.collide[e]:
                continue
            for o in self._colliders:
                if o == e:
                    continue
                delta = self.pos[:, e] - self.pos[:, o]
                sq = np.square(delta)
                dist = np.sqrt(sq[:, 0] + sq[:, 1])
                dist_min = lay.sizes[e] + lay.sizes[o]
                penetration = np.logaddexp(0, -(dist - dist_min) / k) * k
                f = lay.contact_force * delta / dist[:, None] * penetration[:, None]
                force[e] = f + force.get(e, 0.0)
        return force

    def distances(self, a: int, b: int) -> np.ndarray:
        """``[copies]`` distance between entities ``a`` and ``b`` as mpe2 computes it,
        ``sqrt(sum(square(pos_a - pos_b)))``."""
        sq = np.square(self.pos[:, a] - self.pos[:, b])
        return np.sqrt(sq[:, 0] + sq[:, 1])
