"""Explanation metrics against hand-computed values: deletion/insertion AUCs, OOD share, the randomisation check."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from madistill.config import ExplainConfig
from madistill.envs.features import FeatureLayout
from madistill.envs.groups import AgentGroup
from madistill.explain.attribution import chosen_action_objective, policy_attributions
from madistill.explain.evaluation import score_methods, summarise
from madistill.explain.metrics import spearman
from madistill.explain.quality import (
    crossed_summary,
    order_curves,
    random_order_curves,
    randomisation_curve,
    randomisation_verdict,
)
from madistill.policies.base import Policy, greedy_actions
from madistill.policies.mlp import MLPPolicy
from madistill.policies.sb3 import SB3Policy


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


def _trained_ish(d: int, scale: torch.Tensor | None = None, hidden: int = 32) -> MLPPolicy:
    """An MLP whose first layer reads feature i with weight scale ``scale[i]`` (default 10^(2i/d - 1)): gradient
    maps rank features by that scale, as a trained network's ranks its informative features."""
    torch.manual_seed(0)
    group = AgentGroup("a", ("a_0",), spaces.Box(-1, 1, (d,)), spaces.Discrete(3))
    policy = MLPPolicy(group, {"hidden_sizes": [hidden, hidden], "activation": "tanh"})
    with torch.no_grad():
        policy.net[0].weight.mul_(torch.logspace(-1, 1, d) if scale is None else scale)
    return policy


def _features_explainer(method: str, d: int):
    layout = FeatureLayout.build(d)
    return lambda p: (lambda xs, acts: policy_attributions(p, xs, layout, [method], actions=acts)[method])


def test_randomisation_check_drops_to_near_zero_on_a_fully_reinitialised_network():
    d = 48
    policy = _trained_ish(d)
    x = torch.randn(64, d)
    actions = greedy_actions(policy, x)
    check = randomisation_curve(policy, _features_explainer("gradient", d), x, actions, seed=0, draws=8)
    assert list(check["abs"]) == ["top", "top-1", "top-2"] and check["abs"]["top"].shape == (8, 64)
    assert np.nanmean(check["abs"]["top"]) > 0.6  # the output layer alone re-initialised: the first layer still ranks
    full = crossed_summary([check["abs"]["top-2"]], n_boot=500)
    assert abs(full["mean"]) < 0.1 and full["draws"] == 8 and full["n"] == 8 * 64
    assert randomisation_verdict(full, 0.2) == "passes"
    # the re-initialised copies are copies: the policy keeps its weights
    assert torch.equal(policy.net[0].weight, _trained_ish(d).net[0].weight)
    assert isinstance(policy.net[-1], nn.Linear)


def test_every_parameter_the_output_depends_on_is_reinitialised():
    """Fully re-initialised means every weight on the way from the (normalised) input to the action, output layer
    included, for students and SB3 teachers; the normaliser is not a layer (the maps are taken after it)."""
    group = AgentGroup("a", ("a_0",), spaces.Box(-1, 1, (5,)), spaces.Discrete(3))
    x = torch.randn(8, 5)
    for policy in (MLPPolicy(group, {"hidden_sizes": [16, 16], "activation": "tanh"}),
                   SB3Policy.from_arch(group, {"hidden_sizes": [16, 16], "activation": "tanh"})):
        seen: list[Policy] = []

        def explainer(p: Policy, seen: list[Policy] = seen):
            seen.append(p)
            return _features_explainer("gradient", 5)(p)

        randomisation_curve(policy, explainer, x, greedy_actions(policy, x), seed=0)
        objective = chosen_action_objective(policy, "logit")(x, greedy_actions(policy, x)).sum()
        names, params = zip(*policy.named_parameters())
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        used = {n for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}
        assert used and len(seen) == 4  # the policy, then the copy after each of its 3 Linear layers
        after = dict(seen[-1].named_parameters())
        changed = {n for n, v in policy.named_parameters() if not torch.equal(v, after[n])}
        assert used <= changed, used - changed


def test_randomisation_check_compares_single_features_not_group_sizes():
    """Trained weights on the features of the three 4-feature groups: grouped L2 scores rank those groups first
    for a re-initialised network too (a norm over 4 features outweighs one over 1), so grouped maps would keep a
    correlation no re-initialisation removes; compared feature by feature the check drops to 0 and passes."""
    sizes = [1, 1, 1, 4, 4, 4]
    d = sum(sizes)
    layout = FeatureLayout.build(d, {f"g{i}": list(range(sum(sizes[:i]), sum(sizes[:i + 1]))) for i in range(6)})
    scale = torch.tensor([1.0] * 3 + [10.0] * 12)
    policy = _trained_ish(d, scale)
    x = torch.randn(48, d)
    settings = ExplainConfig(randomisation_draws=16, infidelity_samples=2, sensitivity_samples=1, random_orders=1,
                             n_boot=300)
    scores, _ = score_methods(policy, x, layout, ["gradient"], settings)
    s = summarise([scores], settings.n_boot)["gradient"]
    assert s["randomisation_verdict"] == "passes", s["randomisation"]["top-2"]
    # the grouped comparison, for contrast: the group sizes alone keep the rankings alike
    trained = policy_attributions(policy, x, layout, ["gradient"])["gradient"]
    grouped = []
    for seed in range(16):
        torch.manual_seed(seed)
        twin = copy.deepcopy(policy)
        for layer in twin.net:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        grouped.append(spearman(policy_attributions(twin, x, layout, ["gradient"],
                                                    actions=greedy_actions(policy, x))["gradient"], trained))
    assert np.nanmean(grouped) > 0.3


def test_the_ci_covers_the_spread_between_reinitialisations():
    """Each draw's correlation is nearly the same on every observation: the CI must be over draws as well, so one
    draw cannot pass (however many observations), and draws that disagree give a wide CI around their mean."""
    rng = np.random.default_rng(0)
    offsets = np.array([0.8, -0.6, 0.7, -0.9, 0.5, -0.5, 0.6, -0.6])  # mean 0, std ~0.67
    block = offsets[:, None] + rng.normal(0, 0.05, (8, 200))
    pooled = crossed_summary([block], n_boot=1000)
    assert abs(pooled["mean"]) < 0.01
    np.testing.assert_allclose(pooled["draw_range"], [-0.9, 0.8], atol=0.02)
    lo, hi = pooled["mean_ci"]
    assert lo < -0.25 and hi > 0.25  # about +-1.96 * 0.67 / sqrt(8), not +-0.01 as over observations alone
    assert randomisation_verdict(pooled, 0.2) == "inconclusive"
    one = crossed_summary([block[:1]], n_boot=1000)  # a single draw: the observations alone, all near 0.8
    assert randomisation_verdict(one, 0.2) == "fails"
    # seeds pool: two blocks resampled each on its own
    both = crossed_summary([block, -block], n_boot=1000)
    assert abs(both["mean"]) < 1e-12 and both["draws"] == 16 and both["n"] == 3200


def test_a_map_that_multiplies_by_the_input_fails_through_its_magnitude():
    """Input x gradient of a network whose features sit at very different distances from the baseline: with every
    layer re-initialised its |map| still ranks features by |x| (Adebayo et al.'s finding for Gradient x Input), so
    it fails; its signed map, whose signs the new weights redraw, drops to 0."""
    d = 12
    policy = _trained_ish(d, torch.ones(d))
    x = torch.randn(64, d) * torch.logspace(-2, 1, d)
    check = randomisation_curve(policy, _features_explainer("input_x_gradient", d), x, greedy_actions(policy, x),
                                seed=0, draws=16)
    magnitude = crossed_summary([check["abs"]["top-2"]], n_boot=500)
    assert magnitude["mean"] > 0.5 and randomisation_verdict(magnitude, 0.2) == "fails"
    assert np.nanmean(check["input"]) > 0.8  # the trained map ranks by |x| as much
    assert randomisation_verdict(crossed_summary([check["signed"]["top-2"]], n_boot=500), 0.2) == "passes"
    gradient = randomisation_curve(policy, _features_explainer("gradient", d), x, greedy_actions(policy, x),
                                   seed=0, draws=16)
    assert randomisation_verdict(crossed_summary([gradient["abs"]["top-2"]], n_boot=500), 0.2) == "passes"
