"""Attribution methods: why a policy (or any differentiable scalar objective of its inputs) outputs what it does.

One registry, :data:`METHODS`, every method returning a map per feature group ``[B, G]``:

- ``gradient``: ``d f / d x`` (captum ``Saliency``); ``smoothgrad``: its mean over Gaussian copies of ``x``
  (captum ``NoiseTunnel``). Sensitivities: a group's score is the L2 norm of its features' values (as the
  gradient saliency DIGR trains), so these maps are non-negative.
- ``input_x_gradient``, ``integrated_gradients`` (captum): contributions ``(x - b) * ...`` relative to the
  baseline ``b``; a group's score is the sum over its features (signed).
- ``kernel_shap``, ``lime``: weighted linear regressions of ``f`` on which groups keep their value and which
  take the baseline's; written here, batched over observations (captum's fit one sklearn model per observation).
- ``lrp``: relevance propagation, LRP-epsilon through the Linear + activation layers of an MLP policy (students
  without a CNN, SB3 teachers); it explains the chosen action's logit (Discrete) or the mean (Box).
- ``perturbation``: the existing perturbation saliency (:func:`~madistill.explain.saliency.perturbation_saliency`).

The generic methods take ``forward(inputs, *args) -> [B]`` and per-row ``args``: a policy's chosen-action
objective (:func:`chosen_action_objective`) or any other scalar of any differentiable input, e.g. a layer's
activations. ``lrp`` and ``perturbation`` need the policy itself (:func:`policy_attributions`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import comb

import torch
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from madistill.config import ExplainConfig
from madistill.envs.features import FeatureLayout
from madistill.errors import MadistillError
from madistill.explain.saliency import perturbation_saliency
from madistill.policies.base import Policy, greedy_actions
from madistill.policies.path import acting_path

Forward = Callable[..., torch.Tensor]
TARGETS = ("prob", "logit")


def chosen_action_objective(policy: Policy, target: str = "prob") -> Forward:
    """``f(x, actions) -> [B]``: the probability (``target="prob"``) or logit (``"logit"``) of ``actions`` for a
    Discrete policy; the mean summed over action components for a Box policy (either target)."""
    if target not in TARGETS:
        raise MadistillError(f"unknown explain.target {target!r}: use one of {TARGETS}")

    def objective(x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        head = policy(x)
        if not policy.group.discrete:
            return head.sum(-1)
        out = torch.softmax(head, -1) if target == "prob" else head
        return out.gather(-1, actions.long().reshape(-1, 1)).squeeze(-1)

    return objective


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a leaf that requires gradients (captum warns, and sets it itself, otherwise)."""
    return x.detach().requires_grad_(True)


def _grouped(per_feature: torch.Tensor, layout: FeatureLayout, sensitivity: bool) -> torch.Tensor:
    member = layout.membership(per_feature.device)
    if sensitivity:
        return (per_feature.pow(2) @ member.T).sqrt()
    return per_feature @ member.T


def _baseline(x: torch.Tensor, baseline: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(x) if baseline is None else baseline.to(x).expand_as(x)


@dataclass(frozen=True)
class Problem:
    """What a generic method explains: ``forward(inputs, *args)`` at ``inputs [B, d]`` relative to ``baseline``
    (``[d]``; None: 0, the normaliser mean in normalised units), grouped by ``layout``; ``settings``: the
    methods' (``explain.*``)."""

    forward: Forward
    inputs: torch.Tensor
    args: tuple[torch.Tensor, ...]
    layout: FeatureLayout
    baseline: torch.Tensor | None = None
    settings: ExplainConfig = field(default_factory=ExplainConfig)
    seed: int = 0


def gradient(p: Problem) -> torch.Tensor:
    a = Saliency(p.forward).attribute(_leaf(p.inputs), additional_forward_args=p.args, abs=False)
    return _grouped(a, p.layout, sensitivity=True)


def smoothgrad(p: Problem) -> torch.Tensor:
    # captum draws the noise from torch's global generator: seed it in a forked state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        a = NoiseTunnel(Saliency(p.forward)).attribute(
            _leaf(p.inputs), nt_type="smoothgrad", nt_samples=p.settings.smoothgrad_samples,
            stdevs=p.settings.smoothgrad_sigma, additional_forward_args=p.args, abs=False)
    return _grouped(a, p.layout, sensitivity=True)


def input_x_gradient(p: Problem) -> torch.Tensor:
    # captum's InputXGradient multiplies by x itself: shift so that the contribution is relative to the baseline
    b = _baseline(p.inputs, p.baseline)
    a = InputXGradient(lambda d, *args: p.forward(d + b, *args)).attribute(_leaf(p.inputs - b), additional_forward_args=p.args)
    return _grouped(a, p.layout, sensitivity=False)


def integrated_gradients(p: Problem) -> torch.Tensor:
    a = IntegratedGradients(p.forward).attribute(_leaf(p.inputs), baselines=_baseline(p.inputs, p.baseline),
                                                 additional_forward_args=p.args, n_steps=p.settings.ig_steps)
    return _grouped(a, p.layout, sensitivity=False)


def _coalition_fit(p: Problem, coalitions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per observation, the weighted least-squares coefficients ``[B, G]`` of ``f(z) ~ c + sum_g phi_g z_g``
    over ``coalitions [S, G]`` (1: group g keeps its value, 0: takes the baseline's). The coalitions are shared
    by every observation, so one solve serves the batch."""
    x, b = p.inputs, _baseline(p.inputs, p.baseline)
    s, d = coalitions.shape[0], x.shape[1]
    keep = (coalitions.to(x) @ p.layout.membership(x.device)).bool()  # [S, d]
    z = torch.where(keep[:, None], x[None], b[None]).reshape(-1, d)  # [S * B, d], coalition-major
    args = tuple(a.repeat(s, *([1] * (a.dim() - 1))) for a in p.args)
    with torch.no_grad():
        y = p.forward(z, *args).reshape(s, -1).double()  # [S, B]
    design = torch.cat([torch.ones(s, 1, dtype=torch.float64), coalitions.double()], 1)
    root = weights.double().sqrt()[:, None]
    coef = torch.linalg.lstsq(root * design, root * y).solution  # [G + 1, B]
    return coef[1:].T.to(x.dtype)


def kernel_shap(p: Problem) -> torch.Tensor:
    """KernelSHAP (Lundberg and Lee 2017): every coalition with its Shapley kernel weight where there are at most
    ``shap_samples`` of them (exact Shapley values), else coalitions drawn from the kernel with weight 1. The
    empty and full coalitions get a large weight, which enforces ``sum phi = f(x) - f(b)``."""
    g = len(p.layout)
    full = torch.ones(1, g)
    ends = torch.cat([torch.zeros(1, g), full])
    if 2**g - 2 <= p.settings.shap_samples:
        grid = torch.arange(1, 2**g - 1)[:, None].bitwise_and(2 ** torch.arange(g)).ne(0).float()
        size = grid.sum(1)
        w = (g - 1) / (torch.tensor([comb(g, int(k)) for k in size]) * size * (g - size))
    else:
        gen = torch.Generator().manual_seed(p.seed)
        sizes = torch.arange(1, g, dtype=torch.float64)
        size = sizes[torch.multinomial((g - 1) / (sizes * (g - sizes)), p.settings.shap_samples, True, generator=gen)]
        order = torch.rand(p.settings.shap_samples, g, generator=gen).argsort(1)
        grid = (order < size[:, None]).float()
        w = torch.ones(len(grid))
    return _coalition_fit(p, torch.cat([grid, ends]), torch.cat([w.float(), torch.full((2,), 1e6)]))


def lime(p: Problem) -> torch.Tensor:
    """LIME (Ribeiro et al. 2016) over feature groups: uniform random coalitions, weighted by
    ``exp(-dist^2 / width^2)`` with ``dist`` the cosine distance to the full coalition; least squares (no
    Lasso: with a handful of groups there is nothing to select)."""
    g = len(p.layout)
    gen = torch.Generator().manual_seed(p.seed)
    grid = torch.cat([(torch.rand(p.settings.lime_samples, g, generator=gen) < 0.5).float(), torch.ones(1, g)])
    dist = 1 - (grid.sum(1) / g).sqrt()
    return _coalition_fit(p, grid, torch.exp(-dist.pow(2) / p.settings.lime_width**2))


@dataclass(frozen=True)
class Method:
    """A registered method: ``sensitivity`` maps are non-negative magnitudes, the others signed contributions."""

    name: str
    sensitivity: bool
    generic: bool  # takes any Problem; False: needs the policy (policy_attributions)
    fn: Callable[[Problem], torch.Tensor] | None = None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("gradient", True, True, gradient),
    Method("input_x_gradient", False, True, input_x_gradient),
    Method("integrated_gradients", False, True, integrated_gradients),
    Method("smoothgrad", True, True, smoothgrad),
    Method("lrp", False, False),
    Method("kernel_shap", False, True, kernel_shap),
    Method("lime", False, True, lime),
    Method("perturbation", True, False),
)}


def check_methods(names: Sequence[str]) -> list[str]:
    """``names`` if every one is registered, else a MadistillError naming the known ones."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise MadistillError(f"unknown explain.methods {unknown}: use any of {list(METHODS)}")
    if not names:
        raise MadistillError(f"explain.methods is empty: name at least one of {list(METHODS)}")
    return list(names)


def attribute(method: str, problem: Problem) -> torch.Tensor:
    """A generic method's map ``[B, G]`` of ``problem``."""
    m = METHODS[method]
    if not m.generic:
        raise MadistillError(f"{method!r} needs the policy: use policy_attributions")
    return m.fn(problem).detach()  # type: ignore[misc]


def lrp_epsilon(policy: Policy, x: torch.Tensor, actions: torch.Tensor, epsilon: float) -> torch.Tensor:
    """LRP-epsilon relevance per input feature ``[B, d]`` of the chosen action's logit (Discrete) or of every
    mean component (Box).

    The output relevance is that logit (the other outputs 0). Backwards through each Linear layer
    ``z = W a + b``, ``R_in = a * (W^T (R_out / (z + epsilon * sign(z))))``; activations pass relevance on
    unchanged. With ``epsilon -> 0`` each layer conserves ``sum R_in = sum R_out * (z - b) / z``: relevances
    sum to the output minus what the biases absorb (exactly the output without biases).
    """
    layers = acting_path(policy, "relevance propagation (lrp)", "drop lrp from explain.methods").modules
    inputs = []
    a = x.detach()
    with torch.no_grad():
        for layer in layers:
            inputs.append(a)
            a = layer(a)
        relevance = a if not policy.group.discrete else torch.zeros_like(a).scatter(
            -1, actions.long().reshape(-1, 1), a.gather(-1, actions.long().reshape(-1, 1)))
        for layer, a_in in zip(reversed(layers), reversed(inputs)):
            if isinstance(layer, nn.Linear):
                z = layer(a_in)
                s = relevance / (z + epsilon * torch.where(z >= 0, 1.0, -1.0))
                relevance = a_in * (s @ layer.weight)
    return relevance


def policy_attributions(
    policy: Policy,
    x: torch.Tensor,
    layout: FeatureLayout,
    methods: Sequence[str],
    settings: ExplainConfig | None = None,
    target: str = "prob",
    actions: torch.Tensor | None = None,
    baseline: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Every method's map ``[B, G]`` of ``policy`` at normalised observations ``x``, explaining ``actions`` (by
    default its greedy actions) relative to ``baseline`` (default 0: the normaliser mean); ``settings``: the
    methods' (``explain.*``, default ExplainConfig's)."""
    actions = greedy_actions(policy, x) if actions is None else actions
    settings = settings or ExplainConfig()
    problem = Problem(chosen_action_objective(policy, target), x.detach(), (actions,), layout, baseline, settings, seed)
    out = {}
    for name in methods:
        if name == "lrp":
            out[name] = _grouped(lrp_epsilon(policy, x, actions, settings.lrp_epsilon), layout, sensitivity=False)
        elif name == "perturbation":
            out[name] = perturbation_saliency(policy, x, layout, baseline)
        else:
            out[name] = attribute(name, problem)
    return out
