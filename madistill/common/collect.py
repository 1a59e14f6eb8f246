"""DAgger-style collection: run a team and keep the raw observations its live agents saw."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from madistill.envs.episodes import EpisodeRecord
from madistill.envs.vector import MultiAgentVecEnv
from madistill.policies.base import TeamPolicy
from madistill.rollout import Rollout, Transition
from madistill.transforms import ActionTransform, ObsTransform


def collect_round(
    venv: MultiAgentVecEnv,
    acting: TeamPolicy,
    seed: int,
    deterministic: bool,
    agent_steps: int | None = None,
    episodes: int | None = None,
    progress: str | None = None,
    transforms: Sequence[ObsTransform | ActionTransform] = (),
) -> tuple[dict[str, torch.Tensor], list[EpisodeRecord]]:
    """Run ``acting`` for at least ``agent_steps`` live agent-steps (or ``episodes`` episodes), its
    observations passed through ``transforms``; returns each group's visited *raw* (untransformed)
    observations ``[M, d]`` (alive agents only) and the finished episodes."""
    visited: dict[str, list[torch.Tensor]] = {g.name: [] for g in venv.groups}

    def record(tr: Transition) -> None:
        for g in venv.groups:
            active = tr.active[g.name].reshape(-1).cpu().numpy()
            visited[g.name].append(torch.as_tensor(tr.raw_obs[g.name].reshape(-1, g.obs_dim)[active]))

    rollout = Rollout(venv, acting, transforms, deterministic=deterministic, seed=seed)
    steps = None
    if agent_steps is not None:
        steps = -(-agent_steps // (venv.num_envs * sum(g.n_agents for g in venv.groups)))
    found = rollout.run(steps=steps, episodes=episodes, on_step=record, progress=progress)
    device = acting.device
    return {g: torch.cat(v).to(device) for g, v in visited.items()}, found
