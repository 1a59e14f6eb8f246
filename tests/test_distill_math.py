"""Distillation maths on hand-computed cases: divergences (value and gradient), saliency, the DIGR penalty,
relevance masks, explanation metrics, feature layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn

from madistill.common.divergences import DIVERGENCES, divergence
from madistill.distill.digr import igr_penalty, relevance_mask
from madistill.envs.features import FeatureLayout, feature_layouts
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.explain.metrics import agreement, gini, spearman, topk_overlap
from madistill.explain.saliency import gradient_saliency, perturbation_saliency
from madistill.policies.base import Policy
from madistill.policies.mlp import MLPPolicy

LN3 = math.log(3.0)


def _group(obs_dim: int = 4, n_actions: int = 2, box: bool = False) -> AgentGroup:
    act = spaces.Box(-1, 1, (n_actions,), np.float32) if box else spaces.Discrete(n_actions)
    return AgentGroup("g", ("a_0",), spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32), act)


class Linear(Policy):
    """logits = W x, with a forward-call counter."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.group = _group(w.shape[1], w.shape[0])
        self.w = nn.Parameter(w.clone())
        self.calls = 0

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return obs @ self.w.T


# ---------------------------------------------------------------- divergences
# Teacher logits [0, ln 3] -> p_T = [1/4, 3/4]; student logits [0, 0] -> p_S = [1/2, 1/2].
CASES = {
    # name: (value, gradient w.r.t. the student logits)
    "kl": (0.25 * math.log(0.5) + 0.75 * math.log(1.5), [0.25, -0.25]),  # grad = p_S - p_T
    "reverse_kl": (0.5 * math.log(2) + 0.5 * math.log(2 / 3), None),
    "prob_l2": (2 * 0.25**2, [0.25, -0.25]),  # J_softmax^T 2 (p_S - p_T)
    "logit_mse": (LN3**2 / 2, [0.0, -LN3]),
    "nll": (math.log(2), [0.5, -0.5]),  # teacher's greedy action is 1
}


@pytest.mark.parametrize("name", list(CASES))
def test_discrete_divergences_match_hand_computation(name):
    value, grad = CASES[name]
    t = torch.tensor([[0.0, LN3]])
    s = torch.zeros(1, 2, requires_grad=True)
    d = divergence(name, t, s, discrete=True)
    assert d.shape == (1,)
    assert float(d.detach()) == pytest.approx(value, abs=1e-6)
    d.sum().backward()
    if name == "reverse_kl":  # grad_z KL(p_S || q) = p_S * (log p_S - log q - KL)
        kl = value
        grad = [0.5 * (math.log(2) - kl), 0.5 * (math.log(2 / 3) - kl)]
    np.testing.assert_allclose(s.grad[0].numpy(), grad, atol=1e-6)


def test_temperature_softens_the_teacher():
    t = torch.tensor([[0.0, LN3]])
    s = torch.zeros(1, 2)
    p = torch.softmax(t / 2, -1)[0]  # = [1, sqrt 3] / (1 + sqrt 3)
    assert float(p[1]) == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)))
    want = float((p * (p.log() - math.log(0.5))).sum())
    assert float(divergence("kl", t, s, discrete=True, temperature=2.0)) == pytest.approx(want, abs=1e-6)
    # a perfect student has zero divergence under every choice
    for name in CASES:
        assert float(divergence(name, t, t.clone(), discrete=True)) == pytest.approx(0.0 if name != "nll" else -math.log(0.75), abs=1e-6)


def test_gaussian_divergences():
    mu_t, mu_s = torch.zeros(1, 2), torch.ones(1, 2, requires_grad=True)
    zeros = torch.zeros(2)
    kl = divergence("kl", mu_t, mu_s, discrete=False, teacher_log_std=zeros, student_log_std=zeros)
    assert float(kl) == pytest.approx(1.0)  # 0.5 per dimension
    kl.sum().backward()
    np.testing.assert_allclose(mu_s.grad.numpy(), [[1.0, 1.0]])
    rkl = divergence("reverse_kl", mu_t, mu_s, discrete=False, teacher_log_std=zeros, student_log_std=zeros)
    assert float(rkl) == pytest.approx(1.0)
    nll = divergence("nll", mu_t, mu_s, discrete=False, teacher_log_std=zeros, student_log_std=zeros)
    assert float(nll) == pytest.approx(2 * (0.5 * math.log(2 * math.pi) + 0.5))
    # different stds: KL(N(0, 1) || N(0, e^2)) = 1 + (1 / (2 e^2)) - 0.5 per dimension
    kl2 = divergence("kl", mu_t, torch.zeros(1, 2), discrete=False, teacher_log_std=zeros, student_log_std=torch.ones(2))
    assert float(kl2) == pytest.approx(2 * (1 + 1 / (2 * math.e**2) - 0.5))
    mse = divergence("logit_mse", mu_t, mu_s, discrete=False, teacher_log_std=zeros, student_log_std=zeros)
    assert float(mse) == pytest.approx(1.0)


@pytest.mark.parametrize("discrete", [True, False])
def test_divergence_rejects_unknown_names_listing_the_valid_ones(discrete):
    """Discrete and Box heads alike: a name without its own formula is an error, never another divergence."""
    zeros = torch.zeros(2)
    with pytest.raises(MadistillError) as e:
        divergence("bogus", torch.zeros(1, 2), torch.zeros(1, 2), discrete=discrete, teacher_log_std=zeros,
                   student_log_std=zeros)
    assert str(e.value) == f"unknown divergence 'bogus': use distill.divergence=<one of {', '.join(DIVERGENCES)}>"
    assert {"kl", "reverse_kl", "prob_l2", "logit_mse", "nll"} <= set(DIVERGENCES)


def test_every_divergence_has_a_discrete_and_a_box_form():
    from madistill.common.divergences import _DISCRETE, _GAUSSIAN
    from madistill.config import Divergence

    assert list(_DISCRETE) == list(_GAUSSIAN) == [d.value for d in Divergence]


# ---------------------------------------------------------------- saliency
def test_perturbation_saliency_is_half_squared_logit_change_in_one_forward():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 3.0]])
    policy = Linear(w)
    layout = FeatureLayout.build(4, {"pair": [2, 3]})  # groups: f0, f1, pair
    assert layout.names == ("f0", "f1", "pair")
    x = torch.tensor([[1.0, 5.0, 1.0, 1.0]])
    s = perturbation_saliency(policy, x, layout)  # baseline 0 (the normaliser mean)
    assert policy.calls == 1
    raw = torch.tensor([0.5 * 1.0, 0.0, 0.5 * (2.0**2 + 4.0**2)])  # x_i -> 0 removes W[:, i] x_i
    torch.testing.assert_close(s[0], raw / raw.max())


def test_saliency_of_an_ignored_feature_is_zero():
    torch.manual_seed(0)
    policy = MLPPolicy(_group(5, 3), {"hidden_sizes": [16], "activation": "tanh"})
    with torch.no_grad():
        policy.net[0].weight[:, 3] = 0.0  # feature 3 never reaches the output
    x = torch.randn(64, 5)
    layout = FeatureLayout.build(5)
    pert = perturbation_saliency(policy, x, layout, baselines=torch.randn(4, 64, 5))
    grad = gradient_saliency(policy, x)
    assert torch.all(pert[:, 3] == 0) and torch.all(grad[:, 3] == 0)
    assert torch.all(pert[:, [0, 1, 2, 4]].amax(1) == 1) and torch.all(grad.amax(1) == 1)


def test_gradient_saliency_of_a_linear_policy():
    w = torch.tensor([[1.0, -2.0, 0.0], [0.0, 4.0, 1.0]])
    policy = Linear(w)
    x = torch.zeros(1, 3)
    g = gradient_saliency(policy, x, actions=torch.tensor([1]), target="logit")
    torch.testing.assert_close(g[0], torch.tensor([0.0, 1.0, 0.25]))
    # log-prob at x = 0 (uniform): d log p_1 / dx = W_1 - mean_k W_k = [-0.5, 3, 0.5]
    g = gradient_saliency(policy, x, actions=torch.tensor([1]))
    torch.testing.assert_close(g[0], torch.tensor([0.5, 3.0, 0.5]) / 3)
    pair = FeatureLayout.build(3, {"p": [1, 2]})  # group norms: |0.5|, ||(3, 0.5)||
    torch.testing.assert_close(
        gradient_saliency(policy, x, torch.tensor([1]), layout=pair)[0], torch.tensor([0.5, math.hypot(3, 0.5)]) / math.hypot(3, 0.5)
    )


def test_feature_layout_checks_config():
    with pytest.raises(MadistillError, match="fix env.features"):
        FeatureLayout.build(3, {"a": [0, 3]})
    with pytest.raises(MadistillError, match="in groups 'a' and 'b'"):
        FeatureLayout.build(3, {"a": [0, 1], "b": [1, 2]})
    lay = FeatureLayout.build(4, {"xy": [2, 3]}, feature_names=["vx", "vy", "x", "y"])
    assert lay.names == ("vx", "vy", "xy") and lay.indices == ((0,), (1,), (2, 3))
    with pytest.raises(MadistillError, match="lacks"):
        feature_layouts([_group(4)], {"nope": {"a": [0]}})


# ---------------------------------------------------------------- DIGR penalty and masks
def test_relevance_masks():
    s = torch.tensor([[1.0, 0.05, 0.5]])
    lay = FeatureLayout.build(4, {"pair": [2, 3]})
    torch.testing.assert_close(relevance_mask(s, lay, "soft"), torch.tensor([[1.0, 0.05, 0.5, 0.5]]))
    torch.testing.assert_close(relevance_mask(s, lay, "topk", topk=2), torch.tensor([[1.0, 0.0, 1.0, 1.0]]))
    torch.testing.assert_close(relevance_mask(s, lay, "threshold", threshold=0.6), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(MadistillError, match="distill.mask"):
        relevance_mask(s, lay, "hard")


def test_igr_penalty_matches_hand_computation_and_vanishes_under_a_full_mask():
    w = torch.tensor([[1.0, -2.0, 0.0], [0.0, 4.0, 1.0]])
    policy = Linear(w)
    x = torch.zeros(2, 3, requires_grad=True)
    head = policy(x)
    actions = torch.tensor([1, 1])
    ones = torch.ones(2, 3)
    assert float(igr_penalty(policy, x, head, actions, ones, "logit")) == 0.0
    # relevance 0 on features 0 and 1: penalty = 0^2 + 4^2 per sample for the logit target
    rel = torch.tensor([[0.0, 0.0, 1.0]]).expand(2, 3)
    pen = igr_penalty(policy, x, head, actions, rel, "logit")
    assert float(pen) == pytest.approx(16.0)
    pen.backward()  # differentiable in the parameters (double backward)
    np.testing.assert_allclose(policy.w.grad.numpy(), [[0, 0, 0], [0, 8.0, 0]])


# ---------------------------------------------------------------- metrics
def test_explanation_metrics():
    a = np.array([[0.1, 0.5, 0.9, 0.0], [1.0, 0.0, 0.0, 0.0]])
    b = np.array([[0.0, 0.4, 1.0, 0.2], [0.0, 0.0, 0.0, 0.0]])
    rho = spearman(a, b)
    assert rho[0] == pytest.approx(0.8) and np.isnan(rho[1])  # ranks [2,3,4,1] vs [1,3,4,2]; constant row
    np.testing.assert_allclose(topk_overlap(a[:1], b[:1], 2), [1.0])
    np.testing.assert_allclose(topk_overlap(a[:1], b[:1], 1), [1.0])
    np.testing.assert_allclose(gini(np.array([[1, 1, 1, 1], [0, 0, 0, 1]])), [0.0, 0.75])
    out = agreement(a, b, 2)
    assert out["spearman"] == pytest.approx(0.8)  # the undefined row is skipped
    assert math.isnan(agreement(a[:, :1], b[:, :1], 2)["spearman"])
