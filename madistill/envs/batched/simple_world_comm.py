"""mpe2's simple_world_comm_v3, batched: a leader adversary directs adversaries chasing good agents that
eat food and hide in forests, around obstacles."""

from __future__ import annotations

import numpy as np

from madistill.envs.batched.physics import WorldLayout
from madistill.envs.batched.scenario import BatchedScenario

ADVERSARY_SIZE, GOOD_SIZE = 0.075, 0.045
OBSTACLE_SIZE, FOOD_SIZE, FOREST_SIZE = 0.2, 0.03, 0.3


class SimpleWorldComm(BatchedScenario):
    """``mpe2.simple_world_comm_v3`` with every argument. Agents: the leader (adversary 0, the only speaker),
    the other adversaries, then the good agents; landmarks: obstacles, food, forests."""

    modelled = ("num_good", "num_adversaries", "num_obstacles", "num_food", "max_cycles", "num_forests",
                "continuous_actions", "dynamic_rescaling", "benchmark_data")

    def __init__(self, n_copies: int, num_good: int = 2, num_adversaries: int = 4, num_obstacles: int = 1,
                 num_food: int = 2, max_cycles: int = 25, num_forests: int = 2, continuous_actions: bool = False,
                 **_render_only: object):
        """``dynamic_rescaling`` and ``benchmark_data`` only change rendering and infos, which no stage reads."""
        super().__init__(n_copies, max_cycles, continuous_actions)
        n_adv, n_agents = num_adversaries, num_adversaries + num_good
        self.n_adv, self.n_agents = n_adv, n_agents
        self.agents = tuple("leadadversary_0" if i == 0 else f"adversary_{i - 1}" if i < n_adv
                            else f"agent_{i - n_adv}" for i in range(n_agents))
        first_food, first_forest = n_agents + num_obstacles, n_agents + num_obstacles + num_food
        self.food = np.arange(first_food, first_forest)
        self.forests = np.arange(first_forest, first_forest + num_forests)
        self.landmarks = np.arange(n_agents, first_forest + num_forests)  # obstacles, food, forests
        adversary = [i < n_adv for i in range(n_agents)]
        self._make_world(WorldLayout(
            n_agents=n_agents,
            sizes=tuple(ADVERSARY_SIZE if a else GOOD_SIZE for a in adversary)
            + (OBSTACLE_SIZE,) * num_obstacles + (FOOD_SIZE,) * num_food + (FOREST_SIZE,) * num_forests,
            movable=(True,) * n_agents + (False,) * len(self.landmarks),
            collide=(True,) * (n_agents + num_obstacles) + (False,) * (num_food + num_forests),
            silent=(False,) + (True,) * (n_agents - 1), dim_c=4,
            accel=tuple(3.0 if a else 4.0 for a in adversary), max_speed=tuple(1.0 if a else 1.3 for a in adversary),
        ))
        self._sizes = np.asarray(self.world.layout.sizes)

    def position_draws(self) -> list[tuple[np.ndarray, float, float]]:
        """Agents in [-1, 1]; every landmark in [-0.9, 0.9], then food and forests drawn again."""
        return [(np.arange(self.n_agents), -1.0, 1.0), (self.landmarks, -0.9, 0.9), (self.food, -0.9, 0.9),
                (self.forests, -0.9, 0.9)]

    def _hits(self, a: np.ndarray | slice, b: np.ndarray, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        """``[copies, len(a), len(b)]``: mpe2's ``is_collision`` (distance below the summed sizes)."""
        pos = self.world.pos[idx]
        ia, ib = np.arange(self.world.layout.n_entities)[a], np.asarray(b)
        dx, dy = (p[:, ia, None] - p[:, None, ib] for p in (pos[..., 0], pos[..., 1]))
        return np.sqrt(np.square(dx) + np.square(dy)) < self._sizes[ia][:, None] + self._sizes[ib][None, :]

    def rewards(self) -> np.ndarray:
        w, n_adv = self.world, self.n_adv
        good = np.arange(n_adv, self.n_agents)
        adv = np.arange(n_adv)
        caught = self._hits(good, adv)  # [copies, good, adversaries]
        out = np.empty((self.n_copies, self.n_agents))
        # adversaries: -0.1 * the closest good agent's distance, then +5 per (good, adversary) collision in
        # mpe2's loop order (good agent outer)
        nearest = w.distances(good, adv).min(axis=1)  # [copies, adversaries]
        hits = caught.reshape(self.n_copies, -1)
        for a in range(n_adv):
            r = 0.0 - 0.1 * nearest[:, a]
            for h in hits.T:
                r = r + 5.0 * h
            out[:, a] = r
        # good agents: -5 per colliding adversary, minus twice the boundary penalty per coordinate, +2 per
        # food touched, minus 0.05 * the nearest food's distance
        eats = self._hits(good, self.food)
        food_dist = w.distances(good, self.food).min(axis=2)
        for k, g in enumerate(good):
            r = 0.0 - 5.0 * caught[:, k].sum(axis=1)
            for p in range(2):
                r = r - 2 * _bound(np.abs(w.pos[:, g, p]))
            for f in range(len(self.food)):
                r = r + 2.0 * eats[:, k, f]
            out[:, g] = r - 0.05 * food_dist[:, k]
        return out

    def observations(self, idx: np.ndarray | slice) -> list[np.ndarray]:
        """Adversaries (leader included): ``[vel, pos, landmarks, others, good others' vel, in_forest, leader's
        comm]``; good agents: ``[vel, pos, landmarks, others, in_forest, good others' vel]``. Another agent's
        position and velocity read as zeros unless both share a forest, neither is in one, or the observer
        is the leader."""
        w, n_adv = self.world, self.n_adv
        pos, vel = w.pos[idx], w.vel[idx]
        b = len(pos)
        in_forest = self._hits(slice(0, self.n_agents), self.forests, idx)  # [copies, agents, forests]
        hidden_anywhere = in_forest.any(axis=2)
        out = []
        for i in range(self.n_agents):
            parts = [vel[:, i], pos[:, i], (pos[:, self.landmarks] - pos[:, i: i + 1]).reshape(b, -1)]
            rel, vels = [], []
            for o in range(self.n_agents):
                if o == i:
                    continue
                seen = (in_forest[:, i] & in_forest[:, o]).any(axis=1) | (~hidden_anywhere[:, i] & ~hidden_anywhere[:, o])
                if i == 0:
                    seen = np.ones(b, dtype=bool)
                rel.append(np.where(seen[:, None], pos[:, o] - pos[:, i], 0.0))
                if o >= n_adv:
                    vels.append(np.where(seen[:, None], vel[:, o], 0.0))
            forest = np.where(in_forest[:, i], 1.0, -1.0)
            if i < n_adv:
                parts += rel + vels + [forest, w.c[idx, 0]]
            else:
                parts += rel + [forest] + vels
            out.append(np.concatenate(parts, axis=1))
        return out


def _bound(x: np.ndarray) -> np.ndarray:
    """mpe2's boundary penalty of |coordinate| x: 0 below 0.9, then (x - 0.9) * 10 up to 1, then
    min(exp(2x - 2), 10)."""
    out = np.zeros_like(x)
    mid = (x >= 0.9) & (x < 1.0)
    out[mid] = (x[mid] - 0.9) * 10
    far = x >= 1.0
    out[far] = np.minimum(np.exp(2 * x[far] - 2), 10)
    return out
