"""Purification defence: per-group denoisers that map a (possibly perturbed) normalised observation back
towards the clean data, put in front of any policy (``PurifiedPolicy``: purifier, then policy).

A denoiser is an MLP trained on a teacher's clean observations to map ``x + delta`` back to ``x``, with
``delta`` drawn from the l_inf ball of the attack budgets (uniform in the ball or at its corners), followed by
a projection onto the range each feature took in those observations. Optionally it is randomised: Gaussian
noise is added before denoising, at training and at inference (the randomised-smoothing / DiffPure idea of
drowning the perturbation in noise the denoiser was trained to remove).

The purified policy is differentiable, so a white-box attack on it attacks through the purifier (the adaptive
attack). :func:`attack_view` gives the other views an evaluation needs (Athalye et al. 2018): ``bpda`` (the
purifier's forward pass, identity in the backward pass, for a purifier treated as non-differentiable),
``ignore`` (the undefended policy: attacks unaware of the purifier), and expectation over the purifier's
noise (EOT, ``samples`` > 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies.base import Policy, TeamPolicy
from madistill.policies.sb3 import activation

# what white-box attacks differentiate when a purifier guards the policy (attack_view)
GRADIENTS = ("through", "bpda", "ignore")


class Denoiser(nn.Module):
    """One group's purifier: ``x -> clip(z + MLP(z))`` with ``z = clip(x) + noise * N(0, I)``, where ``clip``
    clips each feature to the range ``[low, high]`` it took in the clean data (``arch["clip"]``; a feature
    constant there is thus restored exactly).

    The residual form starts as the identity (the last layer is zero-initialised), so an untrained or
    undertrained denoiser leaves clean observations as they are. ``arch``: ``hidden_sizes``, ``activation``,
    ``noise`` (std of the inference noise in normalised units, 0: deterministic) and ``clip``.
    """

    def __init__(self, obs_dim: int, arch: Mapping[str, Any]):
        super().__init__()
        self.obs_dim, self.arch = int(obs_dim), dict(arch)
        act = activation(self.arch["activation"])
        layers: list[nn.Module] = []
        width = self.obs_dim
        for h in self.arch["hidden_sizes"]:
            layers += [nn.Linear(width, h), act()]
            width = h
        last = nn.Linear(width, self.obs_dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.register_buffer("low", torch.full((self.obs_dim,), -float("inf")))
        self.register_buffer("high", torch.full((self.obs_dim,), float("inf")))

    @property
    def noise(self) -> float:
        return float(self.arch["noise"])

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self._clip(x)  # a value outside the clean range is certainly perturbed: the MLP never sees it
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self._clip(x + self.net(x))

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return torch.max(torch.min(x, self.high), self.low) if self.arch["clip"] else x


class Purifier(nn.Module):
    """A team's denoisers by group, with the observation normalisers of the data they were trained on (a
    purifier reads observations in those units, so it guards only policies normalised the same way)."""

    def __init__(self, denoisers: Mapping[str, Denoiser], normalizers: Mapping[str, ObsNormalizer], source: str = ""):
        super().__init__()
        self.denoisers = nn.ModuleDict(dict(denoisers))
        self.normalizers = dict(normalizers)
        self.source = source  # the directory it was loaded from, for messages

    def __getitem__(self, group: str) -> Denoiser:
        return self.denoisers[group]  # type: ignore[return-value]


class PurifiedPolicy(Policy):
    """``inner`` acting on purified observations: ``forward(x) = inner(denoiser(x))``.

    ``gradient``: ``through`` (the composition, differentiable end to end) or ``bpda`` (the same forward value;
    in the backward pass the denoiser is the identity, so the input gradient is ``inner``'s at the purified
    point). ``samples`` > 1: the head is the mean over that many draws of the denoiser's noise (expectation
    over the purifier's randomness, for attacks; acting uses one draw). ``seed``: the noise stream's seed.
    """

    kind = "purified"

    def __init__(self, inner: Policy, denoiser: Denoiser, gradient: str = "through", samples: int = 1, seed: int = 0):
        super().__init__()
        if gradient not in ("through", "bpda"):
            raise ValueError(f"a purified policy's gradient is through or bpda, not {gradient!r}")
        self.group, self.inner, self.denoiser = inner.group, inner, denoiser
        self.gradient, self.samples, self.seed = gradient, int(samples), int(seed)
        self._generator: torch.Generator | None = None

    def _noise_generator(self, device: torch.device) -> torch.Generator | None:
        if self.denoiser.noise == 0:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def purify(self, obs: torch.Tensor) -> torch.Tensor:
        """The purified observations (with ``bpda``, identity in the backward pass)."""
        z = self.denoiser(obs, self._noise_generator(obs.device))
        return obs + (z - obs).detach() if self.gradient == "bpda" else z

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.samples == 1:
            return self.inner(self.purify(obs))
        heads = self.inner(self.purify(obs.repeat(self.samples, *([1] * (obs.dim() - 1)))))
        return heads.reshape(self.samples, len(obs), *heads.shape[1:]).mean(0)

    def log_std(self) -> torch.Tensor | None:
        return self.inner.log_std()

    def value(self, obs: torch.Tensor) -> torch.Tensor | None:
        return self.inner.value(self.purify(obs))

    @property
    def acting_parameters(self) -> int:
        return self.inner.acting_parameters + sum(p.numel() for p in self.denoiser.parameters())


def purified_team(team: TeamPolicy, purifier: Purifier, seed: int = 0) -> TeamPolicy:
    """``team`` with ``purifier`` in front of every group's policy (the normalisers shared; group ``i``'s noise
    seeded with ``seed + i``). Refused in one line when a group is missing from the purifier or normalised
    differently."""
    where = f"purifier {purifier.source}".strip()
    policies = {}
    for i, g in enumerate(team.groups):
        if g.name not in purifier.denoisers or purifier[g.name].obs_dim != g.obs_dim:
            raise MadistillError(f"{where} has no denoiser for group {g.name!r} with {g.obs_dim} features: train one "
                                 "on this policy's teacher (madistill purify purify.teacher=<teacher run>)")
        mine, theirs = purifier.normalizers[g.name], team.normalizers[g.name]
        if not (np.allclose(mine.mean, theirs.mean) and np.allclose(mine.std, theirs.std)):
            raise MadistillError(f"{where} reads group {g.name!r}'s observations normalised differently from this "
                                 "policy's: train one on this policy's teacher (madistill purify purify.teacher=<teacher run>)")
        policies[g.name] = PurifiedPolicy(team[g.name], purifier[g.name], seed=seed + i)
    return TeamPolicy(team.groups, policies, team.normalizers)


def attack_view(team: TeamPolicy, gradient: str, samples: int = 1, seed: int = 0) -> TeamPolicy | None:
    """The team white-box attacks on a purified ``team`` differentiate (None when no group is purified, or
    for the plain adaptive attack, ``through`` with one sample, whose view is the team itself).

    ``through``: through the purifier; ``bpda``: its forward pass with identity gradients; ``ignore``: the
    undefended policies (attacks unaware of the purifier). ``samples`` > 1 averages the head over that many
    draws of the purifier's noise (EOT); refused for a deterministic purifier. The view draws its noise from
    its own stream (``seed``), so attacking leaves the acting policies' noise as it was."""
    if gradient not in GRADIENTS:
        raise MadistillError(f"unknown purifier gradient {gradient!r}: use one of {GRADIENTS}")
    purified = {g.name: p for g in team.groups if isinstance(p := team[g.name], PurifiedPolicy)}
    if not purified:
        return None
    if samples > 1 and not any(p.denoiser.noise > 0 for p in purified.values()):
        raise MadistillError("purify.eot_samples > 1 averages over the purifier's noise, and this purifier has none: "
                             "set purify.eot_samples=1, or train a randomised one with purify.noise > 0")
    if gradient == "through" and samples == 1 and not any(p.denoiser.noise > 0 for p in purified.values()):
        return None

    def view(p: Policy, i: int) -> Policy:
        if not isinstance(p, PurifiedPolicy):
            return p
        return p.inner if gradient == "ignore" else PurifiedPolicy(p.inner, p.denoiser, gradient, samples, seed + i)

    return TeamPolicy(team.groups, {g.name: view(team[g.name], i) for i, g in enumerate(team.groups)}, team.normalizers)


def perturb(x: torch.Tensor, eps: float, sign_share: float, generator: torch.Generator | None) -> torch.Tensor:
    """``x`` plus a training perturbation per row: a radius uniform in ``[0, eps]``, at a random corner of the
    l_inf ball of that radius for a ``sign_share`` of the rows, else uniform in the ball."""
    b, d = x.shape
    radius = eps * torch.rand(b, 1, generator=generator, device=x.device)
    u = 2 * torch.rand(b, d, generator=generator, device=x.device) - 1
    corner = torch.rand(b, 1, generator=generator, device=x.device) < sign_share
    return x + radius * torch.where(corner, u.sign(), u)


def train_denoiser(
    x: torch.Tensor, arch: Mapping[str, Any], eps: float, sign_share: float, epochs: int, batch_size: int,
    learning_rate: float, generator: torch.Generator, log: Any = None,
) -> Denoiser:
    """A denoiser for clean normalised observations ``x`` ``[M, d]``: Adam on the mean squared error between
    ``denoiser(perturb(x))`` and ``x`` for ``epochs`` passes of ``batch_size`` rows. Its clip range is the range
    of ``x``. ``log(epoch, loss)`` gets each epoch's mean loss."""
    den = Denoiser(x.shape[1], arch).to(x.device)
    den.low.copy_(x.min(0).values)
    den.high.copy_(x.max(0).values)
    opt = torch.optim.Adam(den.parameters(), lr=learning_rate)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator, device=x.device)
        total = 0.0
        for start in range(0, len(x), batch_size):
            clean = x[order[start:start + batch_size]]
            loss = (den(perturb(clean, eps, sign_share, generator), generator) - clean).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(clean)
        if log is not None:
            log(epoch, total / len(x))
    return den.eval()
