"""One repair of one group's policy: localise the neurons behind a failure set, fine-tune only them (or the
entries of a Fisher mask) on a failure term, and the baselines on the same data and steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from madistill.attacks.budget import Budget
from madistill.common.divergences import divergence
from madistill.distill.loss import DistillLoss
from madistill.envs.features import FeatureLayout
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
    neuron_scores,
    random_like,
    repair_path,
)
from madistill.repair.objectives import (
    FailureTerm,
    FixedFailures,
    ForcedTargets,
    RebuiltFailures,
    targeted_data,
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
    """One fine-tune of the grid: its learning rate and anchor weight, and on the held-out split the held-out
    failure term's ``accuracy`` (the failures' share acting as wanted; adversarial repair: the clean observations'
    share under a fresh attack; the lookahead: the states' share keeping their action under the forced target)
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


@dataclass(frozen=True)
class Terms:
    """What a variant's fine-tunes fit (``train``) and what their held-out accuracy reads (``val``)."""

    train: FailureTerm
    val: FailureTerm


def fixed_terms(split: Split) -> Terms:
    """The fixed failure set's training and held-out parts."""
    return Terms(FixedFailures(split.train), FixedFailures(split.val))


def rebuilt_terms(adversary: Adversary, original: Policy) -> Callable[[Split], Terms]:
    """Adversarial repair's terms for a split: failures rebuilt by ``adversary`` from the clean anchor's training
    part, robust accuracy on its held-out part, both wanting ``original``'s greedy clean action."""
    def terms(split: Split) -> Terms:
        return Terms(*(RebuiltFailures(adversary, c, greedy_actions(original, c))
                       for c in (split.train_clean, split.val_clean)))
    return terms


def forced_target_terms(original: Policy, states: torch.Tensor, targets: torch.Tensor, objective: DistillLoss,
                        layout: FeatureLayout, budget: Budget, share: float, seed: int) -> Callable[[Split], Terms]:
    """The lookahead's terms for a split: a random ``share`` of the ``states`` (normalised clean observations of
    the states the lookahead drove the team to, each with the target it forced there, ``targets``, -1 where it
    forced none; drawn from the targeted and the untargeted states apart) held out to judge, the rest fitted
    together with the split's clean training part (no target there), all labelled with ``original``'s clean
    head. Held-out states come from the same episodes as the fitted ones."""
    gen = torch.Generator().manual_seed(seed)
    parts = []  # the targeted and the untargeted states split apart, so the held-out part always has targets
    for rows in ((targets >= 0).nonzero().flatten(), (targets < 0).nonzero().flatten()):
        order = rows[torch.randperm(len(rows), generator=gen).to(rows.device)]
        k = min(len(rows) - 1, max(1, round(share * len(rows)))) if len(rows) > 1 else 0
        parts.append((order[:k], order[k:]))
    if not len(parts[0][0]):
        raise MadistillError(f"the lookahead forced a target in {int((targets >= 0).sum())} states of the "
                             f"{original.group.name!r} group, too few to hold some out: raise repair.episodes")
    val, train = torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]])

    def terms(split: Split) -> Terms:
        clean = split.train_clean
        fit = targeted_data(original, torch.cat([states[train], clean]),
                            torch.cat([targets[train], torch.full((len(clean),), -1, device=clean.device)]))
        return Terms(ForcedTargets(fit, objective, layout, budget),
                     ForcedTargets(targeted_data(original, states[val], targets[val]), objective, layout, budget))
    return terms


def validation_scores(original: Policy, tuned: Policy, term: FailureTerm, val_clean: torch.Tensor,
                      div: str, seed: int = 0) -> dict[str, float]:
    """How a fine-tuned policy does on the held-out split: ``accuracy``, the held-out ``term``'s (the share of
    held-out failures acting as wanted, or robust accuracy for the adversarial terms), and ``divergence`` (mean,
    of ``div``) from the original on the clean observations."""
    with torch.no_grad():
        d = divergence(div, original(val_clean), tuned(val_clean), discrete=tuned.group.discrete).mean()
    return {"accuracy": term.accuracy(original, tuned, seed), "divergence": float(d)}


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


def tune(policy: Policy, mask: Mask, terms: Terms, split: Split, settings: FinetuneSettings, rates: list[float],
         anchors: list[float], bound: float, seed: int, done: Callable[[int], object] = lambda n: None
         ) -> tuple[Policy, Choice]:
    """Fine-tune ``policy`` under ``mask`` on ``terms.train`` and the split's clean training part at every
    learning rate of ``rates`` with every anchor weight of ``anchors`` (same seed and steps), and keep the one
    :func:`choose` picks on the held-out part (``terms.val``, the split's held-out clean observations). The
    anchor weight is searched with the rate because neither alone bounds the clean divergence: when many
    parameters are free, the failure loss moves the policy faster than a weak anchor pulls it back, so a smaller
    rate fits less without diverging less. ``done(1)`` is called after each fine-tune (a progress bar's update)."""
    tuned, trials = [], []
    for rate in rates:
        for anchor in anchors:
            tuned.append(masked_finetune(policy, mask, terms.train, split.train_clean,
                                         replace(settings, learning_rate=rate, anchor=anchor), seed))
            trials.append(Trial(rate, anchor, **validation_scores(policy, tuned[-1], terms.val, split.val_clean,
                                                                  settings.divergence, seed)))
            done(1)
    choice = choose(trials, bound)
    return tuned[trials.index(choice.chosen)], choice


def term_batches(term: FailureTerm, policy: Policy, batch_size: int, batches: int, seed: int) -> Iterator[torch.Tensor]:
    """``term``'s loss on ``batches`` minibatches, computed with ``policy``: what a :func:`fisher_mask` scores
    at the original (the anchor's divergence is at its minimum there, so its gradient is zero)."""
    gen = torch.Generator().manual_seed(seed)
    attack_gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    for step in range(batches):
        loss = term.loss(policy, step, batch_size, gen, attack_gen)
        if loss is not None:
            yield loss


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
                  terms: Callable[[Split], Terms] = fixed_terms, progress: str | None = None) -> Repair:
    """Score the neurons of ``policy`` on ``failures`` (``rc.score``), choose the top ones, check their
    ablation against random ones, and fine-tune with the neuron mask (``rc.mask=fisher``: the Fisher mask) and
    every ``rc.baselines`` variant (``full``: every acting parameter; ``last``: the output layer; ``random``: as
    many random neurons per layer, or as many random acting parameters for the Fisher mask)
    on the failures plus the clean anchor ``clean``, each from the same seed and with its own learning rate and
    anchor weight chosen from ``rc.learning_rates`` x ``rc.anchors`` on a held-out ``rc.validation`` share of
    both (:func:`tune`), every variant on the same ``terms`` of the split (default: the fixed failure set;
    :func:`rebuilt_terms` for adversarial repair, :func:`forced_target_terms` for
    the lookahead's targets). The neurons are scored on the whole failure set: localisation is not what the
    held-out part validates. ``progress``: the label of a progress bar over the fine-tunes (None: no bar)."""
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
    fit = terms(split)
    if rc.mask == "fisher":
        acting_entries = acting_mask(policy)
        masked = fisher_mask(policy, acting_entries, term_batches(fit.train, policy, rc.batch_size,
                                                                  rc.fisher_batches, seed),
                             max(1, int(rc.max_parameters * acting)))
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
    trials = len(masks) * len(rc.learning_rates) * len(rc.anchors)
    with tqdm(total=trials, desc=progress, unit="fine-tune", disable=progress is None) as bar:
        for name, mask in masks.items():
            tuned, result.selection[name] = tune(policy, mask, fit, split, settings, list(rc.learning_rates),
                                                 list(rc.anchors), rc.max_divergence, seed, bar.update)
            result.policies[name], result.mask_sizes[name] = tuned, mask_size(mask)
            result.deltas[name] = parameter_delta(policy, tuned)
    return result
