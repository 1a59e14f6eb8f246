"""Explanation metrics against hand-computed values: deletion/insertion AUCs, OOD share, the randomisation check."""

from __future__ import annotations

import math

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from madistill.envs.features import FeatureLayout
from madistill.envs.groups import AgentGroup
from madistill.explain.attribution import chosen_action_objective, policy_attributions
from madistill.explain.quality import order_curves, random_order_curves, randomisation_curve
from madistill.policies.base import Policy, greedy_actions
from madistill.policies.mlp import MLPPolicy


class OneFeature(Policy):
    """Two actions with logits ``[w * x_0, 0]``: only feature 0 matters."""

    def __init__(self, w: float):
        super().__init__()
        self.group = AgentGroup("a", ("a_0",), spaces.Box(-9, 9, (3,)), spaces.Discrete(2))
        self.w = w

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.w * obs[:, 0], torch.zeros(len(obs))], 1)


def test_deletion_and_insertion_auc_of_a_one_feature_policy_equal_the_hand_computed_values():
    policy, layout = OneFeature(2.0), FeatureLayout.build(3)
    x = torch.tensor([[1.0, 5.0, 0.4]])  # feature 1 is 5 stds from the mean
    p = 1 / (1 + math.exp(-2.0))  # probability of the chosen action 0; 1/2 once feature 0 is at the baseline 0
    f, actions = chosen_action_objective(policy, "prob"), greedy_actions(policy, x)
    assert actions.tolist() == [0]
    maps = policy_attributions(policy, x, layout, ["gradient"])
    right = order_curves(f, x, actions, maps["gradient"], layout, ood_k=3.0)
    np.testing.assert_allclose(right["deletion_curve"][0], [p, 0.5, 0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(right["deletion_auc"], [(p / 2 + 0.5 + 0.5 + 0.25) / 3], rtol=1e-6)
    np.testing.assert_allclose(right["insertion_auc"], [(0.25 + p + p + p / 2) / 3], rtol=1e-6)
    # masked inputs: [0, 5, .4] (feature 1 beyond 3 stds) then [0, 0, .4]; inserted: [1, 0, 0] then [1, 5, 0]
    np.testing.assert_allclose(right["deletion_ood"], [0.5])
    np.testing.assert_allclose(right["insertion_ood"], [0.5])
    wrong = order_curves(f, x, actions, torch.tensor([[0.0, 2.0, 1.0]]), layout)  # feature 0 last
    np.testing.assert_allclose(wrong["deletion_auc"], [(p / 2 + p + p + 0.25) / 3], rtol=1e-6)
    floor = random_order_curves(f, x, actions, layout, orders=200, seed=0)
    # each position of feature 0 equally likely: the mean of the three orders' AUCs, within sampling error
    expected = np.mean([(p / 2 + 0.5 * (k > 1) + p * (k <= 1) + 0.5 * (k > 2) + p * (k <= 2) + 0.25) / 3
                        for k in (1, 2, 3)])
    assert abs(floor["deletion_auc"][0] - expected) < 0.02
    assert right["deletion_auc"][0] < floor["deletion_auc"][0] < wrong["deletion_auc"][0]


def _trained_ish(d: int) -> MLPPolicy:
    """An MLP whose first layer reads feature i with weight scale 10^(2i/d - 1): gradient maps rank features by
    that scale, as a trained network's ranks its informative features."""
    torch.manual_seed(0)
    group = AgentGroup("a", ("a_0",), spaces.Box(-1, 1, (d,)), spaces.Discrete(3))
    policy = MLPPolicy(group, {"hidden_sizes": [32, 32], "activation": "tanh"})
    with torch.no_grad():
        policy.net[0].weight.mul_(torch.logspace(-1, 1, d))
    return policy


def test_randomisation_check_drops_to_near_zero_on_a_fully_reinitialised_network():
    d = 48
    policy, layout = _trained_ish(d), FeatureLayout.build(d)
    x = torch.randn(64, d)
    actions = greedy_actions(policy, x)

    def explainer(p: Policy):
        return lambda xs, acts: policy_attributions(p, xs, layout, ["gradient"], actions=acts)["gradient"]

    curves = [randomisation_curve(policy, explainer, x, actions, seed) for seed in range(4)]
    assert list(curves[0]) == ["top", "top-1", "top-2"]
    top = np.mean([np.nanmean(c["top"]) for c in curves])
    full = np.mean([np.nanmean(c["top-2"]) for c in curves])
    assert top > 0.6  # the output layer alone re-initialised: the first layer's ranking still shows
    assert abs(full) < 0.15  # every layer re-initialised: the maps no longer rank like the policy's
    # the re-initialised copy is a copy: the policy keeps its weights
    assert torch.equal(policy.net[0].weight, _trained_ish(d).net[0].weight)
    assert isinstance(policy.net[-1], nn.Linear)
