"""Attribution methods against known answers: a linear policy's attributions in closed form, LRP's conservation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

from madistill.config import ExplainConfig
from madistill.envs.features import FeatureLayout
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.explain.attribution import (
    METHODS,
    check_methods,
    chosen_action_objective,
    greedy_actions,
    lrp_epsilon,
    policy_attributions,
)
from madistill.explain.quality import order_curves
from madistill.policies.mlp import MLPPolicy


def _policy(obs_dim: int, hidden: list[int], actions: int = 3, seed: int = 0) -> MLPPolicy:
    torch.manual_seed(seed)
    group = AgentGroup("a", ("a_0",), spaces.Box(-1, 1, (obs_dim,)), spaces.Discrete(actions))
    policy = MLPPolicy(group, {"hidden_sizes": hidden, "activation": "tanh"})
    with torch.no_grad():  # biases large enough that a method mishandling them shows
        for m in policy.net:
            if isinstance(m, torch.nn.Linear):
                m.bias.uniform_(-1, 1)
    return policy


LAYOUT = FeatureLayout.build(5, {"pair": [1, 3]})  # groups: f0, pair (1, 3), f2, f4


@pytest.mark.parametrize("baseline", [None, torch.tensor([0.5, -1.0, 0.0, 2.0, 0.3])])
def test_linear_policy_attributions_in_closed_form(baseline):
    policy = _policy(5, [])
    x = torch.randn(16, 5)
    b = torch.zeros(5) if baseline is None else baseline
    maps = policy_attributions(policy, x, LAYOUT, list(METHODS), ExplainConfig(smoothgrad_samples=4, lrp_epsilon=1e-9),
                               target="logit", baseline=baseline)
    w = policy.net[0].weight[greedy_actions(policy, x)].detach()  # [B, d]: the chosen action's weights
    member = LAYOUT.membership()
    grad_norm = (w.pow(2) @ member.T).sqrt()
    contribution = ((x - b) * w) @ member.T
    torch.testing.assert_close(maps["gradient"], grad_norm)
    torch.testing.assert_close(maps["smoothgrad"], grad_norm)  # the gradient of a linear map is the same everywhere
    for name in ("input_x_gradient", "integrated_gradients", "kernel_shap", "lime"):
        torch.testing.assert_close(maps[name], contribution, atol=1e-4, rtol=1e-4, msg=name)
    # LRP explains the logit relative to 0 whatever the baseline: the bias absorbs the rest
    torch.testing.assert_close(maps["lrp"], (x * w) @ member.T, atol=1e-4, rtol=1e-4)
    assert maps["perturbation"].shape == (16, len(LAYOUT))


def test_kernel_shap_sampled_coalitions_approach_exact_values():
    policy = _policy(8, [16])
    layout = FeatureLayout.build(8)
    x = torch.randn(8, 8)
    exact = policy_attributions(policy, x, layout, ["kernel_shap"], ExplainConfig(shap_samples=254))["kernel_shap"]
    sampled = policy_attributions(policy, x, layout, ["kernel_shap"], ExplainConfig(shap_samples=64))["kernel_shap"]
    assert (sampled - exact).abs().max() < 0.1 * exact.abs().max()
    assert not torch.allclose(sampled, exact)  # 64 < 2^8 - 2: drawn, not enumerated


def test_lrp_conserves_the_logit_without_biases():
    policy = _policy(6, [12, 12])
    with torch.no_grad():
        for m in policy.net:
            if isinstance(m, torch.nn.Linear):
                m.bias.zero_()
    x = torch.randn(32, 6)
    actions = greedy_actions(policy, x)
    relevance = lrp_epsilon(policy, x, actions, epsilon=1e-9)
    logit = policy(x).gather(1, actions[:, None]).squeeze(1).detach()
    torch.testing.assert_close(relevance.sum(1), logit, atol=1e-4, rtol=1e-4)


def test_lrp_with_biases_loses_what_the_biases_absorb():
    policy = _policy(6, [])
    x = torch.randn(32, 6)
    actions = greedy_actions(policy, x)
    relevance = lrp_epsilon(policy, x, actions, epsilon=1e-9)
    logit = policy(x).gather(1, actions[:, None]).squeeze(1).detach()
    torch.testing.assert_close(relevance.sum(1), logit - policy.net[0].bias[actions].detach(), atol=1e-4, rtol=1e-4)


def test_methods_checked_and_lrp_refuses_cnn_policies():
    with pytest.raises(MadistillError, match="unknown explain.methods"):
        check_methods(["gradient", "occlusion"])
    group = AgentGroup("img", ("a_0",), spaces.Box(0, 255, (12, 12, 3), dtype="uint8"), spaces.Discrete(3))
    policy = MLPPolicy(group, {"hidden_sizes": [8], "activation": "tanh",
                               "cnn": {"channels": [4], "kernels": [3], "strides": [1], "features_dim": 8, "max_grid": 4}})
    with pytest.raises(MadistillError, match="drop lrp from explain.methods"):
        lrp_epsilon(policy, torch.zeros(2, group.obs_dim), torch.zeros(2, dtype=torch.long), 1e-6)


def test_box_policies_explain_the_mean_and_their_deletion_curves_read_it():
    torch.manual_seed(0)
    group = AgentGroup("b", ("b_0",), spaces.Box(-1, 1, (5,)), spaces.Box(-1, 1, (2,)))
    policy = MLPPolicy(group, {"hidden_sizes": [], "activation": "tanh"})
    x = torch.randn(6, 5)
    maps = policy_attributions(policy, x, LAYOUT, ["integrated_gradients", "lrp"], ExplainConfig(lrp_epsilon=1e-9))
    w = policy.net[0].weight.detach().sum(0)  # the mean summed over the two action components
    torch.testing.assert_close(maps["integrated_gradients"], (x * w) @ LAYOUT.membership().T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(maps["lrp"], (x * w) @ LAYOUT.membership().T, atol=1e-4, rtol=1e-4)
    actions = greedy_actions(policy, x)
    curves = order_curves(chosen_action_objective(policy), x, actions, maps["lrp"], LAYOUT)
    mean_sum = policy(x).sum(1).detach().numpy()
    np.testing.assert_allclose(curves["deletion_curve"][:, 0], mean_sum, rtol=1e-5)  # the clean input's mean
    np.testing.assert_allclose(curves["deletion_curve"][:, -1], policy.net[0].bias.sum().item(), rtol=1e-5)
