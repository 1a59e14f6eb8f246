"""One repair of one group's policy: localise the neurons behind a failure set, fine-tune only them, and the
baselines on the same data and steps."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from madistill.common.divergences import divergence
from madistill.errors import MadistillError
from madistill.policies.base import Policy, greedy_actions
from madistill.repair.failures import Adversary, FailureSet
from madistill.repair.masked import (
    FinetuneSettings,
    Mask,
    fisher_mask,
    mask_size,
    masked_finetune,
    module_mask,
    neuron_mask,
    parameter_delta,
    random_entries,
)
from madistill.repair.neurons import (
    Layer,
    Neuron,
    ablation_check,
    all_neurons,
    failure_loss,
    neuron_scores,
    random_like,
    repair_path,
)


def acting_mask(policy: Policy) -> Mask:
    """Every acting parameter of ``policy``: its hidden layers, its action head and a Box policy's log std (not
    a critic's, which does not act)."""
    path = repair_path(policy)
    prefixes = tuple(f"{layer.name}." for layer in path.hidden) + (f"{path.head_name}.",)
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in policy.named_parameters()
            if n.startswith(prefixes) or n in ("_log_std", "sb3.log_std")}


def choose_neurons(layers: list[Layer], scores: torch.Tensor, share: float, max_parameters: int) -> list[Neuron]:
    """The top ``share`` of the neurons by score (at least one), lowest-scored dropped until their parameters
    (weight row and bias each) fit in ``max_parameters``; at least one neuron is always kept."""
    neurons = all_neurons(layers)
    k = max(1, round(share * len(neurons)))
    order = torch.argsort(scores, descending=True, stable=True)[:k].tolist()
    chosen = [neurons[i] for i in order]
    while len(chosen) > 1 and sum(layers[i].linear.in_features + 1 for i, _ in chosen) > max_parameters:
        chosen.pop()
    return chosen


@dataclass(frozen=True)
class Split:
    """The failure set and the clean anchor, each split into a part the fine-tune sees and a held-out part that
    chooses its learning rate."""

    train: FailureSet
    train_clean: torch.Tensor
    val: FailureSet
    val_clean: torch.Tensor


def holdout(failures: FailureSet, clean: torch.Tensor, share: float, seed: int) -> Split:
    """A random ``share`` of the failures and of the clean observations held out (at least one of each, and
    at least one of each left to train on)."""
    if len(failures) < 2 or len(clean) < 2:
        raise MadistillError(f"choosing the repair's learning rate holds out part of the {len(failures)} failing and "
                             f"{len(clean)} clean observations, and needs 2 of each: raise repair.episodes or repair.eps")
    gen = torch.Generator().manual_seed(seed)

    def cut(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.randperm(n, generator=gen)
        k = min(n - 1, max(1, round(share * n)))
        return order[k:], order[:k]

    def part(i: torch.Tensor) -> FailureSet:
        i = i.to(failures.x.device)
        return FailureSet(failures.x[i], failures.wanted[i], failures.source, failures.searched)

    (ft, fv), (ct, cv) = cut(len(failures)), cut(len(clean))
    return Split(part(ft), clean[ct.to(clean.device)], part(fv), clean[cv.to(clean.device)])


@dataclass(frozen=True)
class Trial:
    """One fine-tune of the grid: its learning rate and anchor weight, and on the held-out split the failures'
    share acting as wanted (``accuracy``; adversarial repair: the clean observations' share under a fresh attack)
    and the clean anchor's mean divergence from the original (``divergence``)."""

    learning_rate: float
    anchor: float
    accuracy: float
    divergence: float


@dataclass(frozen=True)
class Choice:
    """A variant's fine-tuning settings chosen on the validation split: the chosen trial, every trial, and
    whether the chosen one kept the held-out divergence within the bound."""

    chosen: Trial
    trials: list[Trial]
    within_bound: bool


def validation_scores(original: Policy, tuned: Policy, val: FailureSet, val_clean: torch.Tensor, div: str,
                      adversary: Adversary | None = None, seed: int = 0) -> dict[str, float]:
    """How a fine-tuned policy does on the held-out split: ``accuracy`` on the failures (with an ``adversary``: on
    the held-out clean observations under its fresh attack on ``tuned``, wanting the original's clean action,
    because an adversarial repair is asked to resist the attack on itself, not the failures the original had),
    ``divergence`` (mean, of ``div``) from the original on the clean observations."""
    with torch.no_grad():
        d = divergence(div, original(val_clean), tuned(val_clean), discrete=tuned.group.discrete).mean()
    if adversary is not None:
        accuracy = adversary.robust_accuracy(tuned, val_clean, greedy_actions(original, val_clean), seed)
    else:
        accuracy = float((greedy_actions(tuned, val.x) == val.wanted).float().mean())
    return {"accuracy": accuracy, "divergence": float(d)}


def choose(trials: list[Trial], bound: float) -> Choice:
    """The trial with the best held-out failure accuracy among those whose clean divergence is at most ``bound``
    (ties: the smaller divergence, then the earlier trial); if none stays within it, the one with the smallest
    divergence. A bound rather than a weighted sum: accuracy and divergence have no common unit to weigh, and a
    bound states what the repair guarantees (clean behaviour moves at most this much) in the anchor's own
    terms."""
    within = [t for t in trials if t.divergence <= bound]
    if within:
        best = max(within, key=lambda t: (t.accuracy, -t.divergence))
    else:
        best = min(trials, key=lambda t: t.divergence)
    return Choice(best, trials, bool(within))


def tune(policy: Policy, mask: Mask, split: Split, settings: FinetuneSettings, rates: list[float],
         anchors: list[float], bound: float, seed: int, adversary: Adversary | None = None) -> tuple[Policy, Choice]:
    """Fine-tune ``policy`` under ``mask`` on the split's training part at every learning rate of ``rates`` with
    every anchor weight of ``anchors`` (same seed and steps; with an ``adversary``, adversarially: see
    :func:`masked_finetune`), and keep the one :func:`choose` picks on the held-out part. The anchor weight is
    searched with the rate because neither alone bounds the clean divergence: when many parameters are free, the
    failure loss moves the policy faster than a weak anchor pulls it back, so a smaller rate fits less without
    diverging less."""
    tuned, trials = [], []
    for rate in rates:
        for anchor in anchors:
            tuned.append(masked_finetune(policy, mask, split.train.x, split.train.wanted, split.train_clean,
                                         replace(settings, learning_rate=rate, anchor=anchor), seed, adversary))
            trials.append(Trial(rate, anchor, **validation_scores(policy, tuned[-1], split.val, split.val_clean,
                                                                  settings.divergence, adversary, seed)))
    choice = choose(trials, bound)
    return tuned[trials.index(choice.chosen)], choice


def failure_batches(policy: Policy, failures: FailureSet, batch_size: int, batches: int, seed: int):
    """The fine-tune's failure term on ``batches`` minibatches of ``failures``, computed with ``policy``: what a
    :func:`fisher_mask` scores at the original (the anchor's divergence is at its minimum there, so its gradient
    is zero)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        i = torch.randint(len(failures), (batch_size,), generator=gen).to(failures.x.device)
        yield failure_loss(policy, failures.x[i], failures.wanted[i]).mean()


@dataclass
class Repair:
    """What :func:`repair_policy` found and made: the scores of every neuron, the chosen ones, the ablation check,
    and per variant (``masked`` and the baselines) the fine-tuned policy, its mask's size and its update."""

    scores: torch.Tensor
    neurons: list[Neuron]
    chosen_scores: list[float]
    layer_names: list[str]
    ablation: dict[str, float]
    acting_parameters: int
    policies: dict[str, Policy] = field(default_factory=dict)
    mask_sizes: dict[str, int] = field(default_factory=dict)
    deltas: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    selection: dict[str, Choice] = field(default_factory=dict)


def repair_policy(policy: Policy, failures: FailureSet, clean: torch.Tensor, rc: Any, seed: int,
                  adversary: Adversary | None = None) -> Repair:
    """Score the neurons of ``policy`` on ``failures`` (``rc.score``), choose the top ones, check their
    ablation against random ones, and fine-tune with the neuron mask and every ``rc.baselines`` variant
    (``full``: every acting parameter; ``last``: the output layer; ``random``: as many random neurons per layer)
    on the failures plus the clean anchor ``clean``, each from the same seed and with its own learning rate and
    anchor weight chosen from ``rc.learning_rates`` x ``rc.anchors`` on a held-out ``rc.validation`` share of
    both (:func:`tune`); with an ``adversary`` every variant is fine-tuned and judged adversarially. The
    neurons are scored on the whole failure set: localisation is not what the held-out part validates."""
    path = repair_path(policy)
    layers, head, head_name = path.hidden, path.head, path.head_name
    scores = neuron_scores(rc.score, policy, layers, failures.x, failures.wanted, clean, rc.ig_steps, rc.probe_l1,
                           rc.probe_steps, seed)
    acting = policy.acting_parameters
    neurons = choose_neurons(layers, scores, rc.neurons, int(rc.max_parameters * acting))
    index = {n: i for i, n in enumerate(all_neurons(layers))}
    result = Repair(scores, neurons, [float(scores[index[n]]) for n in neurons], [layer.name for layer in layers],
                    ablation_check(policy, layers, neurons, failures.x, rc.ablation_draws, seed), acting)
    split = holdout(failures, clean, rc.validation, seed)
    if rc.mask == "fisher":
        acting_entries = acting_mask(policy)
        masked = fisher_mask(policy, acting_entries,
                             failure_batches(policy, split.train, rc.batch_size, rc.fisher_batches, seed),
                             int(rc.max_parameters * acting))
        random = random_entries(acting_entries, mask_size(masked), seed + 1)
    else:
        masked = neuron_mask(layers, neurons)
        random = neuron_mask(layers, random_like(layers, neurons, 1, seed + 1)[0])
    masks: dict[str, Mask] = {"masked": masked}
    for name in rc.baselines:
        if name == "full":
            masks[name] = acting_mask(policy)
        elif name == "last":
            masks[name] = module_mask({head_name: head})
        else:
            masks[name] = random
    settings = FinetuneSettings(rc.steps, rc.batch_size, rc.learning_rates[0], rc.weight_decay, rc.anchors[0],
                                rc.divergence)
    for name, mask in masks.items():
        tuned, result.selection[name] = tune(policy, mask, split, settings, list(rc.learning_rates),
                                             list(rc.anchors), rc.max_divergence, seed, adversary)
        result.policies[name], result.mask_sizes[name] = tuned, mask_size(mask)
        result.deltas[name] = parameter_delta(policy, tuned)
    return result
