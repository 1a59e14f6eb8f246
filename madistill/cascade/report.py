"""The cascade study's markdown report and figures: influence heatmaps per lag, the influence graph, and the
timeline of a representative faulted episode."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from madistill.cascade.monitor import CascadeStudy
from madistill.tb import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def markdown(result: dict[str, Any], env_id: str, policy: str, episodes: int) -> str:
    """``reports/cascade.md`` from ``reports/cascade.json``'s body for one policy."""
    agents, first = result["agents"], result["first_lag"]
    lines = [f"# Cascade study: {policy} on {env_id}", "",
             f"{episodes} paired episodes (clean and faulted twins of each seed, the same sampling streams).", "",
             "## Influence (first significant lag of an impulse on the row agent's action, on the column agent)", "",
             "| src \\ dst | " + " | ".join(agents) + " |", "|---" * (len(agents) + 1) + "|"]
    for s in agents:
        cells = ["-" if d == s else ("none" if first[s][d] is None else str(first[s][d])) for d in agents]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    edges = ", ".join(f"{s} -> {d}" for s, d, _ in result["edges"]) or "none"
    lines += ["", f"Lag-1 influence graph: {edges}.", "",
              f"Failure threshold: TV > {result['threshold']:.3g} from the clean twin (clean twins of the replay check "
              f"differed by at most {result['replay_deviation']:.3g}; noise floor of independently sampling clean twins "
              f"{result['noise_floor']:.3g}).", "", "## Cascades", "",
              "| fault | cascade size (mean, 95% CI) | agent | fail rate | median delay | hop depth | return delta (95% CI) |",
              "|---|---|---|---|---|---|---|"]
    for label, f in result["faults"].items():
        c = f["cascade"]
        size = f"{c['size_mean']:.2f} [{c['size_ci'][0]:.2f}, {c['size_ci'][1]:.2f}]"
        for k, (a, s) in enumerate(c["agents"].items()):
            delay = "-" if s["median_delay"] is None else f"{s['median_delay']:g}"
            depth = "unreached" if s["hop_depth"] is None else str(s["hop_depth"])
            ret = f"{s['return_delta']:+.3f} [{s['return_delta_ci'][0]:+.3f}, {s['return_delta_ci'][1]:+.3f}]"
            lines.append(f"| {label if k == 0 else ''} | {size if k == 0 else ''} | {a} | {s['fail_rate']:.2f} | {delay} "
                         f"| {depth} | {ret} |")
    lines += ["", "Fail rate: share of episodes in which the agent's action distribution left its clean twin's by more "
              "than the threshold at or after the onset; delay: steps from the onset to that; hop depth: edges of the "
              "lag-1 influence graph from the victim."]
    return "\n".join(lines) + "\n"


def comparison(results: dict[str, dict[str, Any]]) -> str:
    """The policies side by side on the same faults and episodes: cascade size and the non-faulted agents' mean
    return delta (faulted - clean), each with its 95% CI over episodes."""
    lines = ["## Comparison (same faults, same episodes)", "",
             "| fault | policy | cascade size (95% CI) | non-faulted agents' return delta (95% CI) |", "|---|---|---|---|"]
    for label in next(iter(results.values()))["faults"]:
        for policy, r in results.items():
            c = r["faults"][label]["cascade"]
            lines.append(f"| {label} | {policy} | {c['size_mean']:.2f} [{c['size_ci'][0]:.2f}, {c['size_ci'][1]:.2f}] | "
                         f"{c['others_return_delta']:+.3f} [{c['others_return_delta_ci'][0]:+.3f}, "
                         f"{c['others_return_delta_ci'][1]:+.3f}] |")
    return "\n".join(lines) + "\n"


def heatmaps(study: CascadeStudy) -> Figure:
    """The influence matrix (mean TV of dst's action distribution k steps after src's impulse), one panel per lag."""
    inf = study.influence
    k, n = inf.lags, len(inf.agents)
    fig, axes = pyplot().subplots(1, k, figsize=(2.2 * k + 1, 2.4 + 0.15 * n), squeeze=False)
    top = float(np.nanmax(inf.effect, initial=0.0)) or 1.0
    for lag, ax in enumerate(axes[0]):
        im = ax.imshow(np.nan_to_num(inf.effect[:, :, lag]), vmin=0, vmax=top, cmap="viridis")
        ax.set_title(f"lag {lag + 1}", fontsize=9)
        ax.set_xticks(range(n), inf.agents, rotation=90, fontsize=7)
        ax.set_yticks(range(n), inf.agents if lag == 0 else [], fontsize=7)
    axes[0][0].set_ylabel("impulse on (src)")
    fig.supxlabel("effect on (dst)", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="TV")
    return fig


def graph(study: CascadeStudy) -> Figure:
    """The lag-1 influence graph: agents on a circle, an arrow per edge, its width by the lag-1 effect."""
    inf = study.influence
    n = len(inf.agents)
    angle = 2 * np.pi * np.arange(n) / n
    pos = np.stack([np.cos(angle), np.sin(angle)], 1)
    fig, ax = pyplot().subplots(figsize=(4, 4))
    top = float(np.nanmax(inf.effect[:, :, 0], initial=0.0)) or 1.0
    for s, d, _ in inf.edges():
        i, j = inf.agents.index(s), inf.agents.index(d)
        ax.annotate("", pos[j] * 0.85, pos[i] * 0.85,
                    arrowprops={"arrowstyle": "-|>", "lw": 0.5 + 3 * inf.effect[i, j, 0] / top, "color": "tab:blue",
                                "connectionstyle": "arc3,rad=0.1"})
    for name, (x, y) in zip(inf.agents, pos):
        ax.text(x, y, name, ha="center", va="center", fontsize=8, bbox={"boxstyle": "round", "fc": "w"})
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_axis_off()
    ax.set_title("lag-1 influence graph", fontsize=9)
    return fig


def timeline(study: CascadeStudy, i: int) -> Figure:
    """Studied fault i's representative episode: each agent's TV from its clean twin over the episode, the onset
    marked, each failure marked where it happened."""
    c, f = study.cascades[i], study.block(i)
    e = c.representative()
    tv = study.run.tv[f, e]  # [T, A]
    agents = study.run.agents
    fig, ax = pyplot().subplots(figsize=(7, 0.5 + 0.35 * len(agents)))
    im = ax.imshow(np.nan_to_num(tv.T), aspect="auto", vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    onset = int(study.run.onsets[f, e])
    ax.axvline(onset - 0.5, color="cyan", lw=1.5, label="onset")
    for col, a in enumerate(c.agents):
        if c.failed[e, col]:
            ax.plot(onset + c.delays[e, col], agents.index(a), "x", color="lime", ms=8)
    ax.set_yticks(range(len(agents)), [f"{a} (victim)" if a in c.victims else a for a in agents], fontsize=8)
    ax.set_xlabel("episode step")
    ax.set_title(f"{study.faults[i].label}, episode seed {int(study.run.seeds[e])} (x: failure)", fontsize=9)
    fig.colorbar(im, ax=ax, label="TV from clean twin")
    ax.legend(loc="upper right", fontsize=7)
    return fig
