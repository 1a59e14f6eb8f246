"""DAgger-style collection: run a team and keep the raw observations its live agents saw."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    obs, _, found = collect_labelled(venv, acting, seed, deterministic, None, agent_steps, episodes, progress, transforms)
    return obs, found


def collect_labelled(
    venv: MultiAgentVecEnv,
    acting: TeamPolicy,
    seed: int,
    deterministic: bool,
    label: Callable[[], dict[str, torch.Tensor]] | None,
    agent_steps: int | None = None,
    episodes: int | None = None,
    progress: str | None = None,
    transforms: Sequence[ObsTransform | ActionTransform] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[EpisodeRecord]]:
    """:func:`collect_round`, and per group the values ``label()`` holds after each step's transforms ran
    (``[N, n_g]`` per group, e.g. the target an attack forced on each agent), recorded for the same agents in the
    same order as the observations (``[M]``; empty without ``label``)."""
    visited: dict[str, list[torch.Tensor]] = {g.name: [] for g in venv.groups}
    labels: dict[str, list[torch.Tensor]] = {g.name: [] for g in venv.groups}

    def record(tr: Transition) -> None:
        now = label() if label is not None else {}
        for g in venv.groups:
            active = tr.active[g.name].reshape(-1).cpu().numpy()
            visited[g.name].append(torch.as_tensor(tr.raw_obs[g.name].reshape(-1, g.obs_dim)[active]))
            if label is not None:
                if now[g.name].shape != tr.active[g.name].shape:
                    raise ValueError(f"labels of {g.name} have shape {tuple(now[g.name].shape)}, the step's agents "
                                     f"{tuple(tr.active[g.name].shape)}: label() must describe the step just played")
                labels[g.name].append(now[g.name].reshape(-1).cpu()[torch.as_tensor(active)])

    rollout = Rollout(venv, acting, transforms, deterministic=deterministic, seed=seed)
    steps = None
    if agent_steps is not None:
        steps = -(-agent_steps // (venv.num_envs * sum(g.n_agents for g in venv.groups)))
    found = rollout.run(steps=steps, episodes=episodes, on_step=record, progress=progress)
    device = acting.device
    return ({g: torch.cat(v).to(device) for g, v in visited.items()},
            {g: torch.cat(v).to(device) for g, v in labels.items() if v}, found)
