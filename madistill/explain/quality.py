"""Explanation quality: is a map faithful to the policy, sensitive to its weights, stable under attack?

Every metric returns one value per observation (arrays ``[B]``), so that :func:`summary` can put a bootstrap CI
over observations (stratified by seed when several policies' values are pooled) on it:

- **deletion / insertion** (Petsiuk et al. 2018): feature groups removed from the observation (deletion) or
  restored into the baseline (insertion) in the map's order, most important first, replaced by an
  in-distribution baseline (the normaliser mean: 0 in normalised units); the curve is the probability of the
  originally chosen action after each step, its AUC the mean over the steps (trapezoid on [0, 1]). A faithful
  map gives a low deletion AUC and a high insertion AUC; a random order gives the floor. Next to each, the share
  of the masked inputs that lie outside ``k`` normaliser standard deviations on some feature.
- **infidelity** (Yeh et al. 2019, captum): expected squared error between the map's linear prediction of a
  random group-wise perturbation's effect and the actual change of the output (maps rescaled optimally first,
  so methods of different scales compare). Lower is better.
- **max-sensitivity** (Yeh et al. 2019, captum): the largest relative change of the map under uniform input
  noise of a small radius. Lower is more stable.
- **randomisation** (Adebayo et al. 2018): Spearman correlation, per observation and over single features,
  between the map's magnitudes (and its signed values) and those of the same network with its layers
  re-initialised cumulatively from the output layer down, over several independent re-initialisations; a method
  that reads the weights must drop to 0 (:func:`randomisation_verdict`).
- **stability under attack**: Spearman correlation between the map at ``x`` and at the attack's ``x'`` at each
  budget, with the share of observations whose greedy action the attack flipped.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max
from torch import nn

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.common.bootstrap import crossed_resample
from madistill.envs.features import FeatureLayout
from madistill.evaluate.stats import summarize_scores
from madistill.explain.attribution import Forward
from madistill.explain.metrics import spearman
from madistill.policies.base import Policy, greedy_actions
from madistill.policies.path import acting_path

# explain(x, actions) -> map [B, G] of one method for one policy
Explainer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _spread(scores: torch.Tensor, layout: FeatureLayout) -> torch.Tensor:
    """Group scores ``[B, G]`` as per-feature values ``[B, d]`` that sum back to them (each feature of group g
    holds ``score_g / |g|``): what captum's metrics, written per feature, take."""
    member = layout.membership(scores.device)
    return scores @ (member / member.sum(1, keepdim=True))


def order_curves(
    forward: Forward,
    x: torch.Tensor,
    actions: torch.Tensor,
    scores: torch.Tensor,
    layout: FeatureLayout,
    baseline: torch.Tensor | None = None,
    ood_k: float = 3.0,
) -> dict[str, np.ndarray]:
    """Deletion and insertion curves ``[B, G + 1]`` of ``forward`` (the chosen action's probability) along the
    groups in descending ``scores`` order (ties: lower index first), their AUCs ``[B]``, and the share ``[B]``
    of each curve's masked inputs (steps 1 .. G - 1, neither the clean input nor the full baseline) that have a
    feature beyond ``ood_k`` normaliser stds (``|x| > ood_k`` in normalised units)."""
    b, d = x.shape
    g = len(layout)
    base = torch.zeros(d, device=x.device) if baseline is None else baseline.to(x)
    rank = torch.empty_like(scores, dtype=torch.long)
    rank.scatter_(1, torch.argsort(-scores, dim=1, stable=True), torch.arange(g, device=x.device).expand(b, g))
    steps = torch.arange(g + 1, device=x.device)
    masked_groups = rank[None] < steps[:, None, None]  # [G + 1, B, G]: group removed at step k
    masked = (masked_groups.float() @ layout.membership(x.device)).bool()  # [G + 1, B, d]
    out: dict[str, np.ndarray] = {}
    for name, inputs in (("deletion", torch.where(masked, base, x)), ("insertion", torch.where(masked, x, base))):
        with torch.no_grad():
            curve = forward(inputs.reshape(-1, d), actions.repeat(g + 1, *[1] * (actions.dim() - 1))).reshape(g + 1, b).T
        out[f"{name}_curve"] = curve.cpu().numpy()
        out[f"{name}_auc"] = torch.trapezoid(curve, dx=1.0 / g, dim=1).cpu().numpy()
        inner = inputs[1:g] if g > 1 else inputs[:0]
        out[f"{name}_ood"] = (inner.abs() > ood_k).any(-1).float().mean(0).cpu().numpy() if g > 1 else np.zeros(b)
    return out


def random_order_curves(
    forward: Forward,
    x: torch.Tensor,
    actions: torch.Tensor,
    layout: FeatureLayout,
    orders: int,
    seed: int,
    baseline: torch.Tensor | None = None,
    ood_k: float = 3.0,
) -> dict[str, np.ndarray]:
    """:func:`order_curves` of random group orders, averaged over ``orders`` draws: the floor a map must beat."""
    gen = torch.Generator().manual_seed(seed)
    draws = [order_curves(forward, x, actions, torch.rand(len(x), len(layout), generator=gen).to(x), layout,
                          baseline, ood_k) for _ in range(orders)]
    return {k: np.mean([dr[k] for dr in draws], axis=0) for k in draws[0]}


def infidelity(
    forward: Forward,
    x: torch.Tensor,
    actions: torch.Tensor,
    scores: torch.Tensor,
    layout: FeatureLayout,
    samples: int,
    sigma: float,
    seed: int,
) -> np.ndarray:
    """captum's infidelity ``[B]`` of group maps under Gaussian perturbations of std ``sigma`` (normalised
    units) that move all features of a group by the same amount, with the maps rescaled optimally."""
    member = layout.membership(x.device)

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = (torch.randn(len(inputs), len(layout), device=inputs.device) * sigma) @ member
        return noise, inputs - noise

    # captum draws the perturbations from torch's global generator: seed it in a forked state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = captum_infidelity(forward, perturb, x.detach(), _spread(scores, layout), additional_forward_args=(actions,),
                                n_perturb_samples=samples, normalize=True)
    return out.detach().cpu().numpy()


def max_sensitivity(
    explain: Explainer, x: torch.Tensor, actions: torch.Tensor, layout: FeatureLayout, samples: int, radius: float,
    seed: int,
) -> np.ndarray:
    """captum's max-sensitivity ``[B]``: the largest ``||map(x + u) - map(x)|| / ||map(x)||`` over ``samples``
    draws of ``u`` uniform in the l_inf ball of ``radius`` (normalised units), explaining the same actions."""
    # captum hands the inputs over as a tensor or a 1-tuple, expands only ``additional_forward_args`` to the
    # perturbed batch, and needs the explanation as a tuple
    def spread_map(inputs: torch.Tensor | tuple[torch.Tensor],
                   additional_forward_args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        return (_spread(explain(x.detach(), additional_forward_args[0]), layout),)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = sensitivity_max(spread_map, x.detach(), perturb_radius=radius, n_perturb_samples=samples,
                              additional_forward_args=(actions,))
    return out.detach().cpu().numpy()


def randomisation_curve(
    policy: Policy, explainer: Callable[[Policy], Explainer], x: torch.Tensor, actions: torch.Tensor, seed: int,
    draws: int = 1,
) -> dict[str, Any]:
    """The randomisation check's correlations: for each of ``draws`` independent copies of ``policy`` whose
    Linear layers (every layer of the acting path, output layer included) are re-initialised (their default
    initialisation, seeded) cumulatively from the output layer down, the per-observation Spearman correlation
    between the copy's map and the policy's, one ``[draws, B]`` array per step named by the layers re-initialised
    so far (``top``, ``top-1``, ...): of ``|map|`` under ``"abs"``, of the signed maps under ``"signed"``. Under
    ``"input"``, ``[B]``: the correlation of the policy's ``|map|`` with ``|x|``, the distance of each feature
    from the baseline, which a map that multiplies by the input keeps whatever the weights.

    ``explainer(p)`` gives a policy's map function over single features (``[B, d]``, as ``x``: Adebayo et al.
    compare pixels; a group's score also carries its size, an L2 norm over three features outweighs one over two
    whatever the weights); every copy explains the original ``actions``. Draws matter: a
    re-initialised MLP is close to linear, so its maps rank features almost alike on every observation and one
    draw's correlation, averaged over observations, is one sample of the draw's luck, not a mean near 0."""
    reference = explainer(policy)(x, actions)
    out: dict[str, Any] = {"abs": {}, "signed": {}, "input": spearman(reference.abs(), x.abs())}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(draws):
            twin = copy.deepcopy(policy)
            layers = acting_path(twin, "the randomisation check", "set explain.randomisation=false").modules
            for i, layer in enumerate([m for m in layers if isinstance(m, nn.Linear)][::-1]):
                layer.reset_parameters()
                name = "top" if i == 0 else f"top-{i}"
                randomised = explainer(twin)(x, actions)
                out["abs"].setdefault(name, []).append(spearman(randomised.abs(), reference.abs()))
                out["signed"].setdefault(name, []).append(spearman(randomised, reference))
    for kind in ("abs", "signed"):
        out[kind] = {name: np.stack(rows) for name, rows in out[kind].items()}
    return out


def crossed_summary(blocks: Sequence[np.ndarray], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean of the ``[draws, B]`` blocks (one per policy seed, pooled) with its bootstrap CI over draws and
    observations, resampled independently within each block (:func:`~madistill.common.bootstrap.crossed_resample`),
    ignoring NaNs; ``n``: the finite values, ``draws``: the draws over all blocks, ``draw_range``: the lowest and
    highest mean of one draw over its observations (how far one draw alone can be from the mean)."""
    rng = np.random.default_rng(seed)
    total, count = np.zeros(n_boot), np.zeros(n_boot)
    for block in blocks:
        boot = crossed_resample(np.asarray(block, dtype=np.float64), n_boot, rng)
        total += np.nansum(boot, axis=(1, 2))
        count += np.isfinite(boot).sum((1, 2))
    values = np.concatenate([np.asarray(b, dtype=np.float64).ravel() for b in blocks])
    if not np.isfinite(values).any():
        return {"mean": float("nan"), "mean_ci": [float("nan"), float("nan")], "n": 0, "draws": 0,
                "draw_range": [float("nan"), float("nan")]}
    with np.errstate(invalid="ignore", divide="ignore"):
        means = total / count
    lo, hi = np.nanpercentile(means, [2.5, 97.5])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw whose every correlation is undefined
        per_draw = np.concatenate([np.nanmean(np.asarray(b, dtype=np.float64), axis=1) for b in blocks])
    return {"mean": float(np.nanmean(values)), "mean_ci": [float(lo), float(hi)], "n": int(np.isfinite(values).sum()),
            "draws": int(sum(len(b) for b in blocks)),
            "draw_range": [float(np.nanmin(per_draw)), float(np.nanmax(per_draw))]}


def randomisation_verdict(s: Mapping[str, Any], tolerance: float) -> str:
    """``"passes"`` where the CI of the correlation with every layer re-initialised lies within
    ``[-tolerance, tolerance]`` (the maps no longer rank like the trained network's), ``"fails"`` where it lies
    wholly outside, ``"inconclusive"`` otherwise (too few draws or observations to tell)."""
    lo, hi = s["mean_ci"]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive"
    if -tolerance <= lo and hi <= tolerance:
        return "passes"
    return "fails" if lo > tolerance or hi < -tolerance else "inconclusive"


def attack_stability(
    policy: Policy, explain: Explainer, x: torch.Tensor, attack: Attack, budgets: Mapping[float, Budget], seed: int
) -> dict[float, dict[str, np.ndarray]]:
    """Per budget ``eps``: Spearman correlation ``[B]`` between the map at ``x`` and at the attacked ``x'`` (each
    explaining the policy's greedy action there, which is what a user would see) and whether that action
    differs from the clean one (``flipped``, 0/1; NaN for Box actions, whose mean moves under any attack)."""
    clean_actions = greedy_actions(policy, x)
    clean = explain(x, clean_actions)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = {}
    for eps, budget in budgets.items():
        x_adv = attack(policy, x, budget, gen)
        adv_actions = greedy_actions(policy, x_adv)
        flipped = (adv_actions != clean_actions).float().cpu().numpy()
        out[eps] = {"spearman": spearman(explain(x_adv, adv_actions), clean),
                    "flipped": flipped if policy.group.discrete else np.full(len(x), np.nan)}
    return out


def summary(values: np.ndarray | Sequence[float], n_boot: int, seed: int = 0,
            strata: Sequence[Any] | None = None) -> dict[str, Any]:
    """Mean with its bootstrap CI over observations (stratified by ``strata``, e.g. the policy seed each value
    comes from), ignoring NaNs (a constant map has no rank correlation); NaN when nothing is left."""
    v = np.asarray(values, dtype=np.float64).ravel()
    keep = np.isfinite(v)
    if not keep.any():
        return {"mean": float("nan"), "mean_ci": [float("nan"), float("nan")], "n": 0}
    s = summarize_scores(v[keep], n_boot=n_boot, seed=seed, strata=None if strata is None else np.asarray(strata)[keep])
    return {"mean": s["mean"], "mean_ci": s["mean_ci"], "n": s["n"]}
