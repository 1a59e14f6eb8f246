"""Gradient-masked fine-tuning: only the parameters a mask selects move, every other one stays bit-identical.

A mask frees a few neurons (:func:`neuron_mask`), whole modules (:func:`module_mask`), the entries a Fisher
score ranks first (:func:`fisher_mask`) or random entries (:func:`random_entries`). A neuron's parameters are
the row of the ``Linear`` weight into it and its bias: they compute the unit and nothing else, so the mask
changes what the chosen units respond to while every other unit computes exactly what it did. (Its outgoing
column would change how much downstream units listen to it, which C-delta-theta style circuit edits also touch;
the rows alone keep the update local to the units the localisation chose.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from madistill.common.divergences import divergence
from madistill.policies.base import Policy
from madistill.policies.path import Layer
from madistill.repair.neurons import Neuron
from madistill.repair.objectives import FailureTerm

Mask = dict[str, torch.Tensor]  # parameter name -> bool tensor of its shape: True where the parameter may move


def neuron_mask(layers: Sequence[Layer], neurons: Sequence[Neuron]) -> Mask:
    """The weight rows into ``neurons`` and their biases."""
    mask: Mask = {}
    for i, u in neurons:
        layer = layers[i]
        w = mask.setdefault(f"{layer.name}.weight", torch.zeros_like(layer.linear.weight, dtype=torch.bool))
        b = mask.setdefault(f"{layer.name}.bias", torch.zeros_like(layer.linear.bias, dtype=torch.bool))
        w[u] = True
        b[u] = True
    return mask


def module_mask(modules: Mapping[str, torch.nn.Module]) -> Mask:
    """Every parameter of the named modules (``name`` -> module)."""
    return {f"{name}.{p}": torch.ones_like(t, dtype=torch.bool) for name, m in modules.items()
            for p, t in m.named_parameters()}


def _entries(candidates: Mask, flat: torch.Tensor) -> Mask:
    """The mask of the entries at ``flat`` positions of ``candidates``' parameters laid end to end."""
    chosen = torch.zeros(sum(m.numel() for m in candidates.values()), dtype=torch.bool)
    chosen[flat] = True
    out, start = {}, 0
    for name, m in candidates.items():
        out[name] = chosen[start:start + m.numel()].view(m.shape).to(m.device) & m
        start += m.numel()
    return out


def fisher_mask(policy: Policy, candidates: Mask, losses: Iterable[torch.Tensor], count: int) -> Mask:
    """The ``count`` entries of ``candidates`` with the largest empirical Fisher information of the fine-tuning
    loss: the sum over ``losses`` (minibatch losses computed with ``policy``) of each entry's squared gradient. To
    first order these are the entries whose moves lower the loss fastest, wherever they sit in the network (the
    FISH mask of Sung et al. 2021); ties go to the earlier entry. Fewer when fewer entries have any gradient."""
    params = dict(policy.named_parameters())
    acc = {n: torch.zeros_like(params[n]) for n in candidates}
    for loss in losses:
        grads = torch.autograd.grad(loss, [params[n] for n in acc], allow_unused=True)
        for a, g in zip(acc.values(), grads):
            if g is not None:
                a += g.detach().pow(2)
    score = torch.cat([torch.where(candidates[n], a, -1.0).flatten().cpu() for n, a in acc.items()])
    count = min(count, int((score > 0).sum()))  # an entry the loss does not move is no part of the repair
    return _entries(candidates, torch.argsort(score, descending=True, stable=True)[:count])


def random_entries(candidates: Mask, count: int, seed: int) -> Mask:
    """``count`` entries of ``candidates`` drawn uniformly (at most as many as it holds): the baseline of a
    :func:`fisher_mask` of the same size."""
    free = torch.cat([m.flatten().cpu() for m in candidates.values()]).nonzero().flatten()
    pick = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))[:count]
    return _entries(candidates, free[pick])


def mask_size(mask: Mask) -> int:
    """How many parameters ``mask`` lets move."""
    return int(sum(int(m.sum()) for m in mask.values()))


@dataclass(frozen=True)
class FinetuneSettings:
    """The masked fine-tune's optimisation (``repair.*``): Adam(W) steps, batch, the anchor's weight and
    divergence."""

    steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    anchor: float
    divergence: str


def masked_finetune(policy: Policy, mask: Mask, term: FailureTerm, clean: torch.Tensor, s: FinetuneSettings,
                    seed: int) -> Policy:
    """A copy of ``policy`` fine-tuned on the failure ``term`` (:mod:`madistill.repair.objectives`: a fixed
    failure set, failures rebuilt on the policy being tuned, or the lookahead's forced targets) plus the clean
    anchor (``s.anchor`` x the divergence from the original policy's head on clean observations), with only the
    ``mask``ed parameters free. Minibatch indices are drawn from one generator seeded with ``seed``, the
    attacks' random starts from another, so every variant of a repair sees the same data in the same order.

    The gradient is masked and the optimiser's update guarded: AdamW's weight decay, and Adam's moments for an
    entry whose gradient was once non-zero, move a parameter whatever its gradient, so after every step the
    masked-out entries are put back to their values before it. Parameters outside ``mask`` are not given to the
    optimiser at all."""
    tuned = copy.deepcopy(policy)
    tuned.train()
    params = dict(tuned.named_parameters())
    masks = {n: m.to(params[n].device) for n, m in mask.items()}
    opt = torch.optim.AdamW([params[n] for n in masks], lr=s.learning_rate, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    attack_gen = torch.Generator(device=clean.device).manual_seed(seed)
    with torch.no_grad():
        reference = policy(clean)
    for step in range(s.steps):
        loss = torch.zeros((), device=clean.device)
        failing = term.loss(tuned, step, s.batch_size, gen, attack_gen)
        if failing is not None:
            loss = loss + failing
        j = torch.randint(len(clean), (s.batch_size,), generator=gen).to(clean.device)
        if s.anchor:
            loss = loss + s.anchor * divergence(s.divergence, reference[j], tuned(clean[j]),
                                                discrete=tuned.group.discrete).mean()
        if not loss.requires_grad:  # no failure left and no anchor: nothing to fit this step
            continue
        masked_step(opt, params, masks, loss)
    return tuned.eval()


def masked_step(opt: torch.optim.Optimizer, params: Mapping[str, torch.Tensor], masks: Mask,
                loss: torch.Tensor) -> None:
    """One step of ``opt`` on ``loss`` that moves only the ``masks``ed entries of ``params`` (name -> parameter):
    the gradient is masked, and the masked-out entries are put back after the step, since weight decay and
    Adam's moments of an entry whose gradient was once non-zero move it whatever its gradient."""
    opt.zero_grad()
    loss.backward()
    before = {}
    for n, m in masks.items():
        params[n].grad.mul_(m)
        before[n] = params[n].detach().clone()
    opt.step()
    with torch.no_grad():
        for n, m in masks.items():
            params[n].copy_(torch.where(m, params[n], before[n]))


def parameter_delta(original: Policy, tuned: Policy) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The update as its support: parameter name -> (flat indices of the entries that differ bit for bit, the
    tuned values there, their change), for every parameter with at least one changed entry. Writing the values
    at the indices rebuilds the tuned parameter exactly (adding the change would round)."""
    out = {}
    after = dict(tuned.named_parameters())
    for name, p in original.named_parameters():
        old, new = p.detach().flatten(), after[name].detach().flatten()
        changed = (new != old).nonzero().flatten()
        if len(changed):
            out[name] = (changed, new[changed], new[changed] - old[changed])
    return out


def changed_count(delta: Mapping[str, tuple[torch.Tensor, ...]]) -> int:
    """Parameters a :func:`parameter_delta` changes."""
    return sum(len(d[0]) for d in delta.values())
