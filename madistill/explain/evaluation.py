"""Every explain method scored by every quality metric, for one policy and group, then summarised with CIs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.config import ExplainConfig
from madistill.envs.features import FeatureLayout
from madistill.explain.attribution import chosen_action_objective, policy_attributions
from madistill.explain.quality import (
    Explainer,
    attack_stability,
    crossed_summary,
    infidelity,
    max_sensitivity,
    order_curves,
    random_order_curves,
    randomisation_curve,
    randomisation_verdict,
    summary,
)
from madistill.policies.base import Policy, greedy_actions
from madistill.tb import pyplot

# per-observation values: scores[method][metric] = [B] array; "curves" hold [B, G + 1] arrays

if TYPE_CHECKING:
    from matplotlib.figure import Figure
Scores = dict[str, dict[str, Any]]
FLOOR = "random order"  # the pseudo-method holding the random-order floor


def explainer(policy: Policy, method: str, layout: FeatureLayout, settings: ExplainConfig, target: str,
              seed: int) -> Explainer:
    """``method``'s map function ``(x, actions) -> [B, G]`` for ``policy``."""
    return lambda x, actions: policy_attributions(policy, x, layout, [method], settings, target, actions,
                                                  seed=seed)[method]


def score_methods(
    policy: Policy,
    x: torch.Tensor,
    layout: FeatureLayout,
    methods: Sequence[str],
    settings: ExplainConfig,
    target: str = "prob",
    attack: Attack | None = None,
    budgets: Mapping[float, Budget] | None = None,
    seed: int = 0,
) -> tuple[Scores, dict[str, torch.Tensor]]:
    """Per-observation scores of every method on normalised observations ``x`` (see
    :mod:`madistill.explain.quality`), with the random-order floor under :data:`FLOOR`, and the maps;
    ``settings``: the methods' and metrics' (``explain.*``).

    Deletion and insertion read the chosen action's probability whatever ``target`` the maps explain; the
    attack stability runs where ``attack`` and ``budgets`` are given.
    """
    actions = greedy_actions(policy, x)
    prob = chosen_action_objective(policy, "prob")
    maps = policy_attributions(policy, x, layout, methods, settings, target, actions, seed=seed)
    features = FeatureLayout.build(layout.obs_dim)  # the randomisation check compares single features
    floor = random_order_curves(prob, x, actions, layout, settings.random_orders, seed, ood_k=settings.ood_k)
    scores: Scores = {FLOOR: floor}
    for m in methods:
        explain = explainer(policy, m, layout, settings, target, seed)
        s = order_curves(prob, x, actions, maps[m], layout, ood_k=settings.ood_k)
        s["infidelity"] = infidelity(prob, x, actions, maps[m], layout, settings.infidelity_samples,
                                     settings.infidelity_sigma, seed)
        s["max_sensitivity"] = max_sensitivity(explain, x, actions, layout, settings.sensitivity_samples,
                                               settings.sensitivity_radius, seed)
        if settings.randomisation:
            check = randomisation_curve(policy, lambda p, m=m: explainer(p, m, features, settings, target, seed), x,
                                        actions, seed, settings.randomisation_draws)
            s["randomisation"], s["randomisation_signed"], s["input_correlation"] = (
                check["abs"], check["signed"], check["input"])
        if attack is not None and budgets:
            s["attack"] = attack_stability(policy, explain, x, attack, budgets, seed)
        scores[m] = s
    return scores, {m: v.detach().cpu() for m, v in maps.items()}


def summarise(runs: Sequence[Scores], n_boot: int, seed: int = 0,
              tolerance: float = ExplainConfig.randomisation_tolerance) -> dict[str, dict[str, Any]]:
    """JSON summary of the scores of one or more runs (e.g. policies of several training seeds, pooled with a
    bootstrap stratified by run): each metric's mean and CI, the mean curves; the randomisation check's CIs over
    draws and observations, and its verdict with every layer re-initialised at ``tolerance``
    (:func:`~madistill.explain.quality.randomisation_verdict`)."""
    strata = None if len(runs) == 1 else np.concatenate(
        [np.full(len(next(iter(r[FLOOR].values()))), i) for i, r in enumerate(runs)])

    def pooled(values: list[np.ndarray]) -> dict[str, Any]:
        return summary(np.concatenate(values), n_boot, seed, strata)

    out: dict[str, dict[str, Any]] = {}
    for m, s in runs[0].items():
        entry: dict[str, Any] = {k: pooled([r[m][k] for r in runs]) for k in s if k.endswith(("_auc", "_ood"))
                                 or k in ("infidelity", "max_sensitivity", "input_correlation")}
        entry["curves"] = {c: np.concatenate([r[m][f"{c}_curve"] for r in runs]).mean(0).round(6).tolist()
                           for c in ("deletion", "insertion")}
        if "randomisation" in s:
            for kind in ("randomisation", "randomisation_signed"):
                entry[kind] = {layer: crossed_summary([r[m][kind][layer] for r in runs], n_boot, seed)
                               for layer in s[kind]}
            entry["randomisation_verdict"] = randomisation_verdict(entry["randomisation"][list(s["randomisation"])[-1]],
                                                                   tolerance)
        if "attack" in s:
            entry["attack"] = {str(eps): {k: pooled([r[m]["attack"][eps][k] for r in runs]) for k in v}
                               for eps, v in s["attack"].items()}
        out[m] = entry
    return out


def _cell(s: Mapping[str, Any] | None) -> str:
    if not s or not np.isfinite(s["mean"]):
        return "–"
    return f"{s['mean']:.3g} [{s['mean_ci'][0]:.3g}, {s['mean_ci'][1]:.3g}]"


def markdown_table(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], eps: float | None = None) -> str:
    """One row per policy x method of ``summaries[policy][method]``: deletion and insertion AUC (with the OOD
    share of their masked inputs), infidelity, max-sensitivity, the randomisation check with every layer
    re-initialised (with its verdict), and the map's rank correlation under attack at ``eps``."""
    lines = ["| policy | method | deletion AUC ↓ (OOD) | insertion AUC ↑ (OOD) | infidelity ↓ | max-sensitivity ↓ "
             "| randomised, all layers (→ 0): verdict "
             f"| Spearman under attack{f' (eps {eps})' if eps is not None else ''} ↑ |",
             "|---|---|---|---|---|---|---|---|"]
    for policy, methods in summaries.items():
        for m, s in methods.items():
            rand = s.get("randomisation")
            attack = s.get("attack", {}).get(str(eps), {}).get("spearman")
            lines.append(
                f"| {policy} | {m} | {_cell(s['deletion_auc'])} ({s['deletion_ood']['mean']:.2f}) "
                f"| {_cell(s['insertion_auc'])} ({s['insertion_ood']['mean']:.2f}) | {_cell(s.get('infidelity'))} "
                f"| {_cell(s.get('max_sensitivity'))} "
                f"| {_cell(rand[list(rand)[-1]]) + ': ' + s['randomisation_verdict'] if rand else '–'} | {_cell(attack)} |")
    return "\n".join(lines)


def curves_figure(summaries: Mapping[str, Mapping[str, Any]], title: str) -> Figure:
    """Mean deletion (left) and insertion (right) curves of each method of one policy and group, the random
    order dashed."""
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for m, s in summaries.items():
            curve = s["curves"][kind]
            steps = np.linspace(0, 1, len(curve))
            ax.plot(steps, curve, "k--" if m == FLOOR else "-", label=f"{m} (AUC {s[f'{kind}_auc']['mean']:.3f})")
        ax.set_xlabel("share of feature groups " + ("removed" if kind == "deletion" else "restored"))
        ax.set_title(kind)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("probability of the chosen action")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def display_maps(maps: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Maps as ``|map|`` scaled to max 1 per observation, so that methods of different scales share a heatmap."""
    return {m: (v.abs() / v.abs().amax(1, keepdim=True).clamp_min(1e-12)).numpy() for m, v in maps.items()}

