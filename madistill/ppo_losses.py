"""PPO's losses as SB3's ``PPO.train()`` computes them, and each head's forward and backward pass for a minibatch,
written once in the subset of Python that TorchScript compiles.

The fast update (:func:`madistill.sb3_adapter.fast_train`) runs the actor's and the critic's pass as one compiled
call each (:func:`compiled`) where both heads are plain MLPs on features without weights, and calls
:func:`actor_losses` and :func:`value_loss` from Python otherwise (a CNN encoder feeding both heads). A compiled
call holds the GIL only to start: run from Python, each of a pass's few dozen small operations takes the GIL
back, and the critic's thread and the actor's would spend much of a minibatch handing it to each other. The
compiled passes run the modules' own ATen operations, which autograd records as it records theirs, so they
compute the same floats (tests/test_sb3_adapter.py).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# the activations a madistill MLP may have (madistill.policies.sb3.ACTIVATIONS, with their default arguments), as
# the codes :func:`mlp` takes
ACTIVATION_CODES: dict[type[nn.Module], int] = {nn.Tanh: 0, nn.ReLU: 1, nn.ELU: 2, nn.GELU: 3}


def mlp_layers(modules: list[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
    """The weights and biases of ``modules`` and their activation's code, where they are linear layers with one
    activation of :data:`ACTIVATION_CODES` between each two (as SB3's MLP and its head); else None."""
    linears, activations = modules[::2], modules[1::2]
    kinds = {type(m) for m in activations}
    plain = all(type(m) is nn.Linear and m.bias is not None for m in linears) and len(linears) == len(activations) + 1
    defaults = all(not getattr(m, "inplace", False) and getattr(m, "alpha", 1.0) == 1.0
                   and getattr(m, "approximate", "none") == "none" for m in activations)
    if not plain or not defaults or len(kinds) > 1 or not kinds <= ACTIVATION_CODES.keys():
        return None
    return [m.weight for m in linears], [m.bias for m in linears], ACTIVATION_CODES[next(iter(kinds), nn.Tanh)]


def mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], activation: int) -> torch.Tensor:
    """The forward pass of :func:`mlp_layers`' layers: each linear layer, and the activation between two."""
    last = len(weights) - 1
    for i in range(len(weights)):
        x = F.linear(x, weights[i], biases[i])
        if i < last:
            if activation == 0:
                x = torch.tanh(x)
            elif activation == 1:
                x = torch.relu(x)
            elif activation == 2:
                x = F.elu(x)
            else:
                x = F.gelu(x)
    return x


def entropy(dist: torch.Tensor, gaussian: bool) -> torch.Tensor:
    """Each sample's entropy (torch's formulas, as SB3's distributions compute them) from ``dist``: normalised
    logits, or a Gaussian's standard deviations."""
    if gaussian:
        return (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(dist)).sum(dim=1)
    return -(dist * torch.softmax(dist, -1)).sum(-1)


def normalized_advantages(advantages: torch.Tensor, normalize: bool) -> torch.Tensor:
    """A minibatch's advantages as SB3's loss reads them: with ``normalize`` (and more than one), less their mean
    and over their standard deviation."""
    if normalize and advantages.numel() > 1:
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    return advantages


def approx_kl_terms(log_ratio: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Each sample's term of SB3's approximate KL from the log-ratio of new to old probabilities and the ratio
    itself (its mean is the estimate SB3 logs and stops at)."""
    return (ratio - 1) - log_ratio


def actor_losses(out: torch.Tensor, log_std: torch.Tensor | None, actions: torch.Tensor, old_log_prob: torch.Tensor,
                 advantages: torch.Tensor, clip_range: float, ent_coef: float, target_kl: float | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """SB3's actor loss of a minibatch from the action head's output ``out`` (logits, or with ``log_std`` a
    Gaussian's mean) and its :func:`normalized_advantages`: the loss, its clipped-surrogate term, and whether the
    approximate KL stops the update (compared in float32, as SB3 compares its float32 array); and for
    :func:`logged_stats`, detached, the log-ratio of the new to the old probabilities and the distribution's
    :func:`entropy` argument. Torch's categorical and
    normal formulas are written out, as SB3's distributions compute them. With ``ent_coef`` 0 the loss leaves the
    entropy out: its gradient would be zeros, which change no float."""
    if log_std is None:
        dist = out - out.logsumexp(-1, keepdim=True)  # torch's Categorical(logits=out)
        log_prob = dist.gather(-1, actions.long()).flatten()
    else:
        dist = torch.ones_like(out) * log_std.exp()  # SB3's DiagGaussianDistribution, torch's Normal
        log_prob = (-((actions - out) ** 2) / (2 * dist**2) - dist.log() - math.log(math.sqrt(2 * math.pi))).sum(dim=1)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    policy_loss = -torch.min(advantages * ratio, advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)).mean()
    loss = policy_loss
    if ent_coef != 0.0:
        loss = policy_loss + ent_coef * -torch.mean(entropy(dist, log_std is not None))
    stop = False
    if target_kl is not None:
        with torch.no_grad():
            stop = bool(torch.mean(approx_kl_terms(log_ratio, ratio)) > 1.5 * target_kl)
    return loss, policy_loss, log_ratio.detach(), dist.detach(), stop


def minibatch_means(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The mean of each minibatch's values in ``x``, an epoch's minibatches one after another, each of
    ``batch_size`` values but the last."""
    full = x.numel() // batch_size * batch_size
    means = x[:full].view(-1, batch_size).mean(1)
    return torch.cat([means, x[full:].mean().view(1)]) if full < x.numel() else means


def logged_stats(log_ratios: list[torch.Tensor], dists: list[torch.Tensor], gaussian: bool, clip_range: float,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The approximate KL, clip fraction and entropy loss SB3 logs for each minibatch of an epoch, from what
    :func:`actor_losses` returned for them, computed for the whole epoch at once rather than per minibatch (to SB3's
    values up to the last bits of each float)."""
    log_ratio = torch.cat(log_ratios)
    ratio = torch.exp(log_ratio)
    approx_kl = minibatch_means(approx_kl_terms(log_ratio, ratio), batch_size)
    clip_fraction = minibatch_means((torch.abs(ratio - 1) > clip_range).float(), batch_size)
    dist = torch.cat(dists)
    # for the log, a categorical's probabilities are exp(normalised logits): torch's softmax over a few actions
    # costs as much per sample as the whole epoch's other statistics
    per_sample = entropy(dist, gaussian) if gaussian else -(dist * dist.exp()).sum(-1)
    return approx_kl, clip_fraction, -minibatch_means(per_sample, batch_size)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_range_vf: float | None) -> torch.Tensor:
    """SB3's value loss of a minibatch from the critic's ``values`` (flat), with its optional clipping around the
    values the rollout recorded."""
    if clip_range_vf is not None:
        values = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    return F.mse_loss(returns, values)


def mlp_actor_backward(features: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                       activation: int, log_std: torch.Tensor | None, actions: torch.Tensor, old_log_prob: torch.Tensor,
                       advantages: torch.Tensor, clip_range: float, ent_coef: float, target_kl: float | None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The actor's pass of a minibatch for an MLP actor: :func:`actor_losses` of its output, back-propagated unless
    the KL stops the update; what :func:`actor_losses` returns, detached."""
    loss, policy_loss, log_ratio, dist, stop = actor_losses(
        mlp(features, weights, biases, activation), log_std, actions, old_log_prob, advantages, clip_range, ent_coef,
        target_kl)
    if not stop:
        loss.backward()
    return loss.detach(), policy_loss.detach(), log_ratio, dist, stop


def mlp_value_backward(features: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                       activation: int, old_values: torch.Tensor, returns: torch.Tensor, clip_range_vf: float | None,
                       vf_coef: float) -> torch.Tensor:
    """The critic's pass of a minibatch for an MLP critic: ``vf_coef`` times :func:`value_loss` back-propagated;
    the loss, detached."""
    loss = value_loss(mlp(features, weights, biases, activation).flatten(), old_values, returns, clip_range_vf)
    (vf_coef * loss).backward()
    return loss.detach()


@functools.cache
def compiled(name: str) -> Any:
    """The TorchScript compilation of this module's function ``name`` (once per process)."""
    with warnings.catch_warnings():  # TorchScript is deprecated; the torch releases madistill admits (< 2.14) have it
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(globals()[name])
