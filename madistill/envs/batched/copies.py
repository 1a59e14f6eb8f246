"""The batched backend's env copies: one ``BatchedScenario`` steps all of a process's copies at once."""

from __future__ import annotations

import numpy as np

from madistill.envs.batched import port_for
from madistill.envs.episodes import EpisodeRecord
from madistill.envs.factory import EnvSpec
from madistill.envs.vector import CopyBook


class BatchedCopies(CopyBook):
    """Env copies of a ported mpe2 env, with the PettingZoo backend's contract (``_Copies``): the same
    observations, rewards, flags, final observations, auto-resets, episode seeds and episode records."""

    def _build(self, spec: EnvSpec, render_mode: str | None) -> None:
        """``render_mode`` must be None: ``choose_backend`` sends rendering to the PettingZoo backend."""
        port = port_for(spec)
        if port is None or render_mode is not None:
            raise ValueError(f"no batched backend for {spec.id!r} with render_mode={render_mode!r}")
        self.scenario = port(len(self.copy_ids), **spec.kwargs)
        # agent k of the scenario reads and writes slot (group, j)
        self.slots = [self.slot[a] for a in self.scenario.agents]
        # agent_returns lists the agents in slot order, as _Copies does
        self._return_order = [self.scenario.agents.index(a) for a in self.slot]
        self.ep_ret = np.zeros((len(self.copy_ids), len(self.slots)))

    def _reset_copies(self, idx: np.ndarray) -> None:
        """Start the next episode of copies ``idx``; writes their ``obs`` and ``active``."""
        self.scenario.reset_copies(idx, self.playing()[idx])
        self.ep_len[idx] = 0
        self.ep_ret[idx] = 0.0
        for (g, j), o in zip(self.slots, self.scenario.observations(idx)):
            self.io["obs"][g][idx, j] = o
            self.io["active"][g][idx, j] = True

    def copy_from(self, other: BatchedCopies, rows: np.ndarray) -> None:
        """This book's copies become copies ``rows`` of ``other`` (the same env), mid-episode, with their
        observations: a state copy in place of replaying the episodes from their seeds."""
        self.scenario.copy_from(other.scenario, rows)
        self.first, self.episode_idx[:] = other.playing()[rows], 0
        self.ep_len[:], self.ep_ret[:] = other.ep_len[rows], other.ep_ret[rows]
        self._clear()
        for field in ("obs", "active"):
            for g, a in self.io[field].items():
                a[...] = other.io[field][g][rows]

    def _reset_all(self) -> None:
        self._reset_copies(np.arange(len(self.copy_ids)))

    def step(self, _: None = None) -> tuple[list[EpisodeRecord], np.ndarray]:
        """Step every copy with the actions in ``io["actions"]``; writes the outputs, returns the finished
        episodes and ``playing()``."""
        self._clear()
        io = self.io
        rewards = self.scenario.step([io["actions"][g][:, j] for g, j in self.slots])
        self.ep_len += 1
        # mpe2 checks the time limit first: an episode ending both ways is truncated
        truncated = self.ep_len >= self.scenario.max_cycles
        terminated = ~truncated & self.scenario.terminal()
        for k, ((g, j), o) in enumerate(zip(self.slots, self.scenario.observations(slice(None)))):
            io["obs"][g][:, j] = o
            io["rewards"][g][:, j] = rewards[:, k]
            io["terminated"][g][:, j] = terminated
            io["truncated"][g][:, j] = truncated
            io["active"][g][:, j] = True
            # returns add up the float32 rewards the step reports, as the PettingZoo backend's do
            self.ep_ret[:, k] += io["rewards"][g][:, j]
        done = np.flatnonzero(truncated | terminated)
        names = list(self.slot)
        episodes = [EpisodeRecord(seed=int(seed), length=int(length), agent_returns=dict(zip(names, returns)))
                    for seed, length, returns in zip(self.playing()[done], self.ep_len[done],
                                                     self.ep_ret[done][:, self._return_order].tolist())]
        if done.size:
            for g, j in self.slots:
                io["final_obs"][g][done, j] = io["obs"][g][done, j]
            self.episode_idx[done] += 1
            self._reset_copies(done)
        self._check_finite(io["obs"])
        self._check_finite(io["final_obs"])
        return episodes, self.playing()

    def render(self, i: int) -> None:
        raise ValueError("the batched backend does not render; choose_backend picks pettingzoo for rendering")

    def close(self) -> None:
        """Nothing to release: the copies are arrays."""
