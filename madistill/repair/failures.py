"""Failure sets: observations on which a group's policy acts wrongly, each with the action it should take.

Built with the attack suite (clean observations attacked inside a budget; kept where the attacked action
differs from the clean one, which is the wanted action) or read from a user ``.npz`` of raw observations
(``obs [N, d]``) and wanted actions (``actions [N]``). Observations are normalised with the policy's own
normaliser, the units its network and the attacks work in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import Policy, greedy_actions


@dataclass
class FailureSet:
    """Failing observations ``x [N, d]`` (normalised), the wanted actions ``wanted [N]``, where they came from,
    and how many candidates were searched (0 for a file)."""

    x: torch.Tensor
    wanted: torch.Tensor
    source: str
    searched: int = 0

    def __len__(self) -> int:
        return len(self.x)


def attack_failures(policy: Policy, clean: torch.Tensor, attack: Attack, budget: Budget, seed: int, name: str,
                    limit: int) -> FailureSet:
    """The attacked clean observations ``clean`` (normalised) whose greedy action the attack changes, at most
    ``limit`` of them, wanting the clean action; ``name`` says which attack in the report."""
    gen = torch.Generator(device=clean.device).manual_seed(seed)
    adv = attack(policy, clean, budget, gen)
    before, after = greedy_actions(policy, clean), greedy_actions(policy, adv)
    flipped = (before != after).nonzero().flatten()[:limit]
    return FailureSet(adv[flipped].detach(), before[flipped], name, len(clean))


def file_failures(path: str | Path, policy: Policy, normalizer: ObsNormalizer, device: torch.device) -> FailureSet:
    """The failure set of a ``.npz`` with ``obs`` (raw observations ``[N, d]``) and ``actions`` (``[N]`` wanted
    Discrete actions) for ``policy``'s group; a one-line MadistillError names what is wrong with it."""
    g = policy.group
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise MadistillError(f"repair.failures={path} is not a readable .npz ({e}): save obs and actions with "
                             "numpy.savez") from e
    missing = [k for k in ("obs", "actions") if k not in data]
    if missing:
        raise MadistillError(f"repair.failures={path} lacks {missing}: it needs obs [N, {g.obs_dim}] and actions [N]")
    obs, actions = np.asarray(data["obs"], dtype=np.float32), np.asarray(data["actions"])
    if obs.ndim != 2 or obs.shape[1] != g.obs_dim or len(obs) == 0:
        raise MadistillError(f"repair.failures={path}: obs has shape {obs.shape}; the {g.name!r} group needs "
                             f"[N > 0, {g.obs_dim}]")
    if actions.shape != (len(obs),) or not np.issubdtype(actions.dtype, np.integer) \
            or actions.min() < 0 or actions.max() >= g.act_dim:
        raise MadistillError(f"repair.failures={path}: actions must be {len(obs)} integers in [0, {g.act_dim}) "
                             f"for the {g.name!r} group")
    x = normalizer.normalize(torch.as_tensor(obs, device=device))
    return FailureSet(x, torch.as_tensor(actions, device=device, dtype=torch.long), str(path))
