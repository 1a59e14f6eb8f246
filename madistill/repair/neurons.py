"""Neurons of an MLP policy's acting path: where they are, scores for a failure, and ablation.

A neuron is one unit of a hidden layer: the output of the activation after a hidden ``Linear``. Scores rank the
neurons by how much they drive a failure objective (minus the log-probability of the wanted action on the
failure set); ablation sets chosen units to 0, the activation's output for a unit that contributes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from madistill.errors import MadistillError
from madistill.policies.base import Policy, greedy_actions, log_prob
from madistill.policies.path import ActingPath, Layer, acting_path

SCORES = ("grad", "ig", "probe")

Neuron = tuple[int, int]  # (hidden layer, unit)


def repair_path(policy: Policy) -> ActingPath:
    """``policy``'s acting path, which repair needs to have hidden layers (their units are the neurons); other
    policies get a one-line MadistillError."""
    path = acting_path(policy, "repair", "repair a policy of a group observing vectors")
    if not path.hidden:
        raise MadistillError(f"repair needs hidden layers of Linear + activation; the {policy.group.name!r} policy "
                             "has none: repair a policy with hidden_sizes")
    return path


def all_neurons(layers: Sequence[Layer]) -> list[Neuron]:
    """Every (layer, unit), layer by layer."""
    return [(i, u) for i, layer in enumerate(layers) for u in range(layer.linear.out_features)]


@contextmanager
def recorded(layers: Sequence[Layer]) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, ``out[i]`` holds hidden layer i's units ``[B, n_i]`` of the latest forward pass."""
    out: list[torch.Tensor | None] = [None] * len(layers)

    def keep(i: int):
        def hook(_m: nn.Module, _inp: tuple, y: torch.Tensor) -> None:
            out[i] = y
        return hook

    handles = [layer.act.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replaced(layer: Layer, fn) -> Iterator[None]:
    """Within the block, the layer's units are ``fn(units)``."""
    handle = layer.act.register_forward_hook(lambda _m, _i, y: fn(y))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def ablated(layers: Sequence[Layer], neurons: Sequence[Neuron]) -> Iterator[None]:
    """Within the block, ``neurons`` output 0."""
    handles = []
    for i, layer in enumerate(layers):
        units = [u for li, u in neurons if li == i]
        if units:
            keep = torch.ones(layer.linear.out_features)
            keep[units] = 0.0
            handles.append(layer.act.register_forward_hook(lambda _m, _i, y, k=keep: y * k.to(y)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def failure_loss(policy: Policy, x: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Per observation, minus the log-probability of the wanted action: what a repair lowers."""
    return -log_prob(policy.dist(x), wanted)


def activation_x_gradient(policy: Policy, layers: Sequence[Layer], x: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Per neuron, mean over ``x`` of |unit x d(failure loss)/d(unit)|: the first-order change of the loss when
    the unit is ablated."""
    with recorded(layers) as units:
        loss = failure_loss(policy, x, wanted).sum()
        grads = torch.autograd.grad(loss, units)
    return torch.cat([(u * g).abs().mean(0) for u, g in zip(units, grads)]).detach()


def integrated_gradients(policy: Policy, layers: Sequence[Layer], x: torch.Tensor, wanted: torch.Tensor,
                         steps: int) -> torch.Tensor:
    """Per neuron, mean over ``x`` of |integrated gradients| of the failure loss along the path from the
    ablated units (0) to the actual ones, one layer at a time (the later layers follow the scaled units)."""
    with torch.no_grad(), recorded(layers) as units:
        policy(x)
    actual = [u.detach() for u in units]
    scores = []
    alphas = (torch.arange(steps, dtype=x.dtype) + 0.5) / steps  # midpoint rule
    for layer, a in zip(layers, actual):
        total = torch.zeros_like(a)
        for alpha in alphas:
            point = (alpha * a).requires_grad_(True)
            with replaced(layer, lambda _y, p=point: p):
                loss = failure_loss(policy, x, wanted).sum()
            total += torch.autograd.grad(loss, point)[0]
        scores.append((a * total / steps).abs().mean(0))
    return torch.cat(scores).detach()


def probe_weights(policy: Policy, layers: Sequence[Layer], failing: torch.Tensor, clean: torch.Tensor, l1: float,
                  steps: int, seed: int) -> torch.Tensor:
    """Per neuron, |weight| of an L1-regularised logistic probe from the standardised units to the label
    "failure observation" (``failing``) vs "clean observation" (``clean``)."""
    with torch.no_grad(), recorded(layers) as units:
        policy(torch.cat([failing, clean]))
        feats = torch.cat([u for u in units], dim=1)
    feats = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)
    label = torch.cat([torch.ones(len(failing)), torch.zeros(len(clean))]).to(feats)
    weight = 1.0 / torch.where(label > 0, label.mean(), 1 - label.mean())  # balanced classes
    gen = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(feats.shape[1], generator=gen)).to(feats).requires_grad_(True)
    b = torch.zeros((), dtype=feats.dtype, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        logits = feats @ w + b
        loss = (nn.functional.binary_cross_entropy_with_logits(logits, label, reduction="none") * weight).mean()
        loss = loss + l1 * w.abs().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().abs()


def neuron_scores(method: str, policy: Policy, layers: Sequence[Layer], failing: torch.Tensor, wanted: torch.Tensor,
                  clean: torch.Tensor, ig_steps: int, probe_l1: float, probe_steps: int, seed: int) -> torch.Tensor:
    """Scores ``[N]`` of every neuron (``all_neurons`` order) by ``method`` (one of :data:`SCORES`)."""
    if method == "grad":
        return activation_x_gradient(policy, layers, failing, wanted)
    if method == "ig":
        return integrated_gradients(policy, layers, failing, wanted, ig_steps)
    if method == "probe":
        return probe_weights(policy, layers, failing, clean, probe_l1, probe_steps, seed)
    raise MadistillError(f"unknown repair.score {method!r}: use one of {SCORES}")


def action_change(policy: Policy, layers: Sequence[Layer], neurons: Sequence[Neuron], x: torch.Tensor) -> float:
    """Share of ``x`` whose greedy action changes when ``neurons`` are ablated."""
    before = greedy_actions(policy, x)
    with ablated(layers, neurons):
        after = greedy_actions(policy, x)
    return float((before != after).float().mean())


def ablation_check(policy: Policy, layers: Sequence[Layer], chosen: Sequence[Neuron], x: torch.Tensor, draws: int,
                   seed: int) -> dict[str, float]:
    """How much ablating the chosen neurons changes the policy's actions on the failure observations ``x``,
    against ablating as many random neurons (``draws`` draws, per-layer counts kept): the chosen share, the
    random draws' mean, and the share of draws that change at least as much as the chosen neurons."""
    top = action_change(policy, layers, chosen, x)
    rand = [action_change(policy, layers, n, x) for n in random_like(layers, chosen, draws, seed)]
    return {"top": top, "random_mean": sum(rand) / len(rand), "random_at_least_top": sum(r >= top for r in rand) / len(rand)}


def random_like(layers: Sequence[Layer], chosen: Sequence[Neuron], draws: int, seed: int) -> list[list[Neuron]]:
    """``draws`` random neuron sets with as many units in each layer as ``chosen`` (so as many parameters)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        pick: list[Neuron] = []
        for i, layer in enumerate(layers):
            k = sum(li == i for li, _ in chosen)
            pick += [(i, int(u)) for u in torch.randperm(layer.linear.out_features, generator=gen)[:k]]
        out.append(pick)
    return out
