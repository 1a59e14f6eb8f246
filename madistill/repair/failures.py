"""Failure sets: observations on which a group's policy acts wrongly, each with the action it should take.

Built with the attack suite (clean observations attacked inside a budget; kept where the attacked action
differs from the clean one, which is the wanted action), from the lookahead's forced targets (states where the
harmful action it chose, forced on the policy, is taken) or read from a user ``.npz`` of raw observations
(``obs [N, d]``) and wanted actions (``actions [N]``). Adversarial repair (:class:`Adversary`) rebuilds the set
during the fine-tune, attacking the policy being tuned. Observations are normalised with the policy's own
normaliser, the units its network and the attacks work in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack, force_targets
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


def current_failures(policy: Policy, clean: torch.Tensor, wanted: torch.Tensor, attack: Attack, budget: Budget,
                     generator: torch.Generator | None, name: str) -> FailureSet:
    """The failures ``policy`` has now: ``clean`` (normalised) attacked on ``policy``, kept where its greedy action
    differs from ``wanted`` (one per clean observation), each wanting that action."""
    adv = attack(policy, clean, budget, generator)
    flipped = (greedy_actions(policy, adv) != wanted).nonzero().flatten()
    return FailureSet(adv[flipped].detach(), wanted[flipped], name, len(clean))


def attack_failures(policy: Policy, clean: torch.Tensor, attack: Attack, budget: Budget, seed: int, name: str,
                    limit: int) -> FailureSet:
    """The attacked clean observations ``clean`` (normalised) whose greedy action the attack changes, at most
    ``limit`` of them, wanting the clean action; ``name`` says which attack in the report."""
    gen = torch.Generator(device=clean.device).manual_seed(seed)
    found = current_failures(policy, clean, greedy_actions(policy, clean), attack, budget, gen, name)
    return FailureSet(found.x[:limit], found.wanted[:limit], name, found.searched)


def forced_failures(policy: Policy, states: torch.Tensor, targets: torch.Tensor, steps: int, budget: Budget,
                    seed: int, name: str, limit: int) -> FailureSet:
    """The lookahead's failures: each state of ``states`` (normalised) with a target in ``targets`` (-1: none),
    that target forced on ``policy`` by ``steps`` targeted PGD steps, kept where the policy then takes it (at
    most ``limit``), wanting its greedy action on the clean state."""
    rows = (targets >= 0).nonzero().flatten()
    x, target = states[rows], targets[rows]
    gen = torch.Generator(device=states.device).manual_seed(seed)
    forced = force_targets(policy, x, target, budget, steps, gen)
    reached = (greedy_actions(policy, forced) == target).nonzero().flatten()[:limit]
    return FailureSet(forced[reached].detach(), greedy_actions(policy, x[reached]), name, len(rows))


@dataclass(frozen=True)
class Adversary:
    """Adversarial repair (``repair.refresh`` > 0): every ``every`` fine-tuning steps the failure set is rebuilt
    by the training attack ``attack`` on the policy being tuned, and the held-out choice judges each fine-tune
    by a fresh ``check`` attack on it, both inside ``budget``."""

    every: int
    attack: Attack
    check: Attack
    budget: Budget

    def failures(self, policy: Policy, clean: torch.Tensor, wanted: torch.Tensor,
                 generator: torch.Generator | None) -> FailureSet:
        """The failures the training attack finds on ``policy`` now (see :func:`current_failures`)."""
        return current_failures(policy, clean, wanted, self.attack, self.budget, generator, "training attack")

    def robust_accuracy(self, policy: Policy, clean: torch.Tensor, wanted: torch.Tensor, seed: int) -> float:
        """The share of ``clean`` on which ``policy`` still takes the ``wanted`` action under the ``check``
        attack crafted on it (seeded, so every fine-tune faces the same random starts)."""
        gen = torch.Generator(device=clean.device).manual_seed(seed)
        adv = self.check(policy, clean, self.budget, gen)
        return float((greedy_actions(policy, adv) == wanted).float().mean())


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
