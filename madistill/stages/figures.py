"""The figures the stages draw themselves (the attack curves are ``madistill.attacks.robustness``'s)."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import numpy as np

from madistill.evaluate.report import side_stats, sides_of
from madistill.tb import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def return_figure(summaries: dict[str, dict], env_id: str) -> Figure:
    """Team return IQM per policy; with several teams, one bar per team side by side."""
    names, sides = list(summaries), sides_of(summaries)
    fig, ax = pyplot().subplots(figsize=(1.6 + 1.2 * len(names) * len(sides), 3.2))
    width, x = 0.8 / len(sides), np.arange(len(names))
    for k, side in enumerate(sides):
        iqm = np.array([side_stats(summaries[n], side)["iqm"] for n in names])
        ci = np.array([side_stats(summaries[n], side)["iqm_ci"] for n in names])
        ax.bar(x + (k - (len(sides) - 1) / 2) * width, iqm, width, yerr=np.abs(ci.T - iqm), capsize=4, alpha=0.8,
               label=side)
    # a row label can be a sweep's overrides: wrapped and cut to fit its bar, so the layout keeps the plot
    ax.set_xticks(x, [textwrap.fill(n, 24, max_lines=4, placeholder=" ...") for n in names], fontsize=8)
    if sides != [None]:
        ax.legend(fontsize=8)
    ax.set_ylabel("team return (IQM, 95% CI)")
    ax.set_title(env_id)
    fig.tight_layout()
    return fig
