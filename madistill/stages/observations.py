"""Observations a stage explains: from a file a user gives (``saliency.obs``, ``explain.obs``) or from episodes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from madistill.envs.groups import AgentGroup
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.policies.base import TeamPolicy
from madistill.transforms import ActionTransform, ObsTransform


def load_observations(path: str | Path, groups: Sequence[AgentGroup]) -> dict[str, torch.Tensor]:
    """Raw observations per group from an ``.npz`` (keys ``<group>`` or ``obs/<group>``, arrays ``[M, d]``)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k.removeprefix("obs/"): f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise MadistillError(f"cannot read observations {path} ({e}): pass an .npz with one [M, d] array per group") from e
    out = {}
    for g in groups:
        if g.name not in arrays:
            raise MadistillError(f"{path} has no observations for group {g.name!r}: add an array named {g.name!r}")
        x = np.asarray(arrays[g.name], dtype=np.float32).reshape(len(arrays[g.name]), -1)
        if x.shape[1] != g.obs_dim:
            raise MadistillError(f"{path}: {g.name!r} observations have {x.shape[1]} features, the env gives {g.obs_dim}")
        if not np.isfinite(x).all():
            raise MadistillError(f"{path}: {g.name!r} observations contain NaN or inf: clean the file")
        out[g.name] = torch.as_tensor(x)
    return out


def explained_observations(
    cfg: DictConfig, venv: MultiAgentVecEnv, team: TeamPolicy, path: str | None, episodes: int,
    faults: Sequence[ObsTransform | ActionTransform] = (),
) -> dict[str, torch.Tensor]:
    """Raw observations per group to explain: from the ``.npz`` at ``path``, else from ``episodes`` greedy
    episodes of ``team`` (episode seeds from ``eval.seed``) played under ``faults`` (the configured fault: the
    states a faulted team visits, as the env emits them)."""
    if path:
        return load_observations(path, venv.groups)
    from madistill.common.collect import collect_round

    bar = "observations" if cfg.logger.progress else None
    return collect_round(venv, team, cfg.eval.seed, True, episodes=episodes, progress=bar, transforms=faults)[0]
