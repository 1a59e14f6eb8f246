"""Saliency maps of saved policies on a set of observations: arrays, agreement tables and heatmaps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from madistill.envs.features import FeatureLayout
from madistill.explain.metrics import agreement
from madistill.explain.saliency import SaliencyLabeller, gradient_saliency
from madistill.policies.base import TeamPolicy
from madistill.tb import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = ("perturbation", "gradient")

# maps[policy][group][method] = [M, G] saliency in [0, 1]
SaliencyMaps = dict[str, dict[str, dict[str, np.ndarray]]]


def saliency_maps(
    teams: Mapping[str, TeamPolicy],
    raw_obs: Mapping[str, torch.Tensor],
    layouts: Mapping[str, FeatureLayout],
    labeller: SaliencyLabeller,
    target: str = "log_prob",
) -> SaliencyMaps:
    """Perturbation and gradient saliency of every team's policies on the same raw observations.

    Each team normalises the observations with its own normaliser; both methods explain the team's own
    greedy action.
    """
    maps: SaliencyMaps = {}
    for name, team in teams.items():
        maps[name] = {}
        for group, raw in raw_obs.items():
            policy = team[group]
            x = team.normalizers[group].normalize(raw.to(team.device))
            maps[name][group] = {
                "perturbation": labeller(policy, group, x).cpu().numpy(),
                "gradient": gradient_saliency(policy, x, None, target, layouts[group]).cpu().numpy(),
            }
    return maps


def agreement_table(
    maps: SaliencyMaps, reference: str | Mapping[str, str], k: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Agreement of each policy's gradient saliency with the ``reference`` policy's perturbation saliency
    (for a student: with its teacher's, which is what DIGR trains for), per group. ``reference``: one policy
    for all, or each policy's own (a sweep's students, each with its teacher)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, groups in maps.items():
        ref = reference if isinstance(reference, str) else reference[name]
        out[name] = {g: agreement(m["gradient"], maps[ref][g]["perturbation"], k) for g, m in groups.items()}
    return out


def mean_saliency(maps: SaliencyMaps, layouts: Mapping[str, FeatureLayout]) -> dict:
    """Mean saliency per feature group: ``{policy: {group: {method: {feature: value}}}}`` (for JSON)."""
    return {
        name: {
            g: {m: dict(zip(layouts[g].names, np.round(a.mean(0), 6).tolist())) for m, a in methods.items()}
            for g, methods in groups.items()
        }
        for name, groups in maps.items()
    }


def save_arrays(path: Path, maps: SaliencyMaps, raw_obs: Mapping[str, torch.Tensor]) -> Path:
    """All maps and the observations they explain, as ``.npz`` (keys ``obs/<group>``, ``<policy>/<group>/<method>``)."""
    arrays = {f"obs/{g}": x.cpu().numpy() for g, x in raw_obs.items()}
    for name, groups in maps.items():
        for g, methods in groups.items():
            for m, a in methods.items():
                arrays[f"{name}/{g}/{m}"] = a
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def mean_heatmap(
    maps: SaliencyMaps, group: str, layout: FeatureLayout, title: str, methods: Sequence[str] = METHODS
) -> Figure:
    """Rows: policy x method (of ``methods``); columns: feature groups; colour: mean saliency over the observations."""
    rows = [(n, m) for n in maps for m in methods]
    values = np.stack([maps[n][group][m].mean(0) for n, m in rows])
    # the width leaves room for the "policy · method" row labels left of the cells
    fig, ax = pyplot().subplots(figsize=(3.5 + 0.55 * len(layout), 0.9 + 0.42 * len(rows)))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=max(1e-9, values.max()), aspect="auto")
    ax.set_xticks(range(len(layout)), layout.names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [f"{n} · {m}" for n, m in rows])
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 * values.max() else "k", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.03, label="mean saliency")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def per_observation_heatmaps(maps: SaliencyMaps, group: str, layout: FeatureLayout, rows: int) -> Figure:
    """One panel per policy x method: the first ``rows`` observations (rows) over feature groups."""
    panels = [(n, m) for n in maps for m in METHODS]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(0.4 * len(layout) * len(panels) + 1.5, 4.5), squeeze=False)
    for ax, (n, m) in zip(axes[0], panels):
        a = maps[n][group][m][:rows]
        image = ax.imshow(a, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(layout)), layout.names, rotation=90, fontsize=7)
        ax.set_title(f"{n} · {m}", fontsize=8)
        ax.set_ylabel("observation")
    fig.suptitle(f"{group}: saliency per observation")
    fig.tight_layout()
    # every panel shares the 0-1 scale: each observation's map divided by its largest group's saliency
    fig.colorbar(image, ax=list(axes[0]), label="saliency (max of each row = 1)", fraction=0.03, pad=0.02)
    return fig
