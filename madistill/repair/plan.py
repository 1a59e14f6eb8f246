"""One repair of one group's policy: localise the neurons behind a failure set, fine-tune only them, and the
baselines on the same data and steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from madistill.policies.base import Policy
from madistill.repair.failures import FailureSet
from madistill.repair.masked import (
    FinetuneSettings,
    Mask,
    mask_size,
    masked_finetune,
    module_mask,
    neuron_mask,
    parameter_delta,
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


def repair_policy(policy: Policy, failures: FailureSet, clean: torch.Tensor, rc: Any, seed: int) -> Repair:
    """Score the neurons of ``policy`` on ``failures`` (``rc.score``), choose the top ones, check their
    ablation against random ones, and fine-tune with the neuron mask and every ``rc.baselines`` variant
    (``full``: every acting parameter; ``last``: the output layer; ``random``: as many random neurons per layer)
    on the failures plus the clean anchor ``clean``, each from the same seed."""
    path = repair_path(policy)
    layers, head, head_name = path.hidden, path.head, path.head_name
    scores = neuron_scores(rc.score, policy, layers, failures.x, failures.wanted, clean, rc.ig_steps, rc.probe_l1,
                           rc.probe_steps, seed)
    acting = policy.acting_parameters
    neurons = choose_neurons(layers, scores, rc.neurons, int(rc.max_parameters * acting))
    index = {n: i for i, n in enumerate(all_neurons(layers))}
    result = Repair(scores, neurons, [float(scores[index[n]]) for n in neurons], [layer.name for layer in layers],
                    ablation_check(policy, layers, neurons, failures.x, rc.ablation_draws, seed), acting)
    masks: dict[str, Mask] = {"masked": neuron_mask(layers, neurons)}
    for name in rc.baselines:
        if name == "full":
            masks[name] = {n: torch.ones_like(p, dtype=torch.bool) for n, p in policy.named_parameters()
                           if n.startswith(tuple(f"{layer.name}." for layer in layers) + (f"{head_name}.",))
                           or n in ("_log_std", "sb3.log_std")}
        elif name == "last":
            masks[name] = module_mask({head_name: head})
        else:
            masks[name] = neuron_mask(layers, random_like(layers, neurons, 1, seed + 1)[0])
    settings = FinetuneSettings(rc.steps, rc.batch_size, rc.learning_rate, rc.weight_decay, rc.anchor, rc.divergence)
    for name, mask in masks.items():
        tuned = masked_finetune(policy, mask, failures.x, failures.wanted, clean, settings, seed)
        result.policies[name], result.mask_sizes[name] = tuned, mask_size(mask)
        result.deltas[name] = parameter_delta(policy, tuned)
    return result
