"""Observations a user gives a stage in a file (``saliency.obs``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError


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
