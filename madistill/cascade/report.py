"""The cascade study's markdown report and figures: influence heatmaps per lag, the influence graph, and the
timeline of a representative faulted episode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from madistill.cascade.alerts import mean_ci
from madistill.cascade.monitor import CascadeStudy
from madistill.evaluate.evaluator import teacher_of
from madistill.tb import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def markdown(result: dict[str, Any], env_id: str, policy: str, episodes: int, deterministic: bool = False) -> str:
    """``reports/cascade.md`` from ``reports/cascade.json``'s body for one policy (``deterministic``: greedy
    actions, ``cascade.deterministic``)."""
    agents, first = result["agents"], result["first_lag"]
    acting = "greedy actions" if deterministic else "the same sampling streams"
    lines = [f"# Cascade study: {policy} on {env_id}", "",
             f"{episodes} paired episodes (clean and faulted twins of each seed, {acting}).", "",
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
    sided = {label: f["cascade"]["others_return_delta_by_team"] for label, f in result["faults"].items()
             if "others_return_delta_by_team" in f["cascade"]}
    if sided:
        lines += ["", "Non-faulted agents' return delta per team (faulted - clean twin, mean with 95% CI; across "
                  "opposing teams the deltas partly cancel):", "", "| fault | team | agents | return delta |",
                  "|---|---|---|---|"]
        lines += [f"| {label} | {team} | {', '.join(t['agents'])} | {t['mean']:+.3f} [{t['ci'][0]:+.3f}, "
                  f"{t['ci'][1]:+.3f}] |" for label, teams in sided.items() for team, t in teams.items()]
    return "\n".join(lines) + "\n"


# the per-episode lists of a cascade that policies are compared by
PER_EPISODE = ("sizes", "others_return_deltas", "others_clean_returns")


def _measures(cascade: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A cascade's compared measures per episode: its size, the non-faulted agents' return delta (faulted - clean),
    their clean return (what the delta is taken from) and their faulted return (clean + delta)."""
    size, delta, clean = (np.asarray(cascade[k], dtype=np.float64) for k in PER_EPISODE)
    return {"size": size, "others_return_delta": delta, "others_clean_return": clean, "others_faulted_return": clean + delta}


def baseline(label: str, labels: Sequence[str]) -> str:
    """The policy ``label`` is compared with: its teacher (``teacher_of``), else the first of ``labels``."""
    return teacher_of(label, labels) or labels[0]


def compare(results: Mapping[str, Mapping[str, Any]], n_boot: int, confidence: float,
            strata: Sequence[Any] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """The policies side by side on the same faults and episodes: per fault and policy, each measure of
    :func:`_measures` as ``{mean, lo, hi, n}`` with its bootstrap CI, and (``<measure>_diff``) its paired difference
    policy - ``baseline``, episode by episode, with its CI. ``results``: per policy, its study's results
    (``reports/cascade.json``'s body), their per-episode lists over the same episodes in the same order;
    ``strata``: one label per episode (e.g. the seed of the policies that played it), resampled within each label."""
    labels = list(results)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for fault in results[labels[0]]["faults"]:
        measures = {label: _measures(results[label]["faults"][fault]["cascade"]) for label in labels}
        out[fault] = {}
        for label in labels:
            base = baseline(label, labels)
            row: dict[str, Any] = {"baseline": None if base == label else base}
            for key, x in measures[label].items():
                row[key] = mean_ci(x, n_boot, confidence, strata)
                if base != label:
                    row[f"{key}_diff"] = mean_ci(x - measures[base][key], n_boot, confidence, strata)
            out[fault][label] = row
    return out


def comparison(compared: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str = "Comparison (same faults, same "
               "episodes)") -> str:
    """:func:`compare`'s result as a markdown section: per fault and policy, the cascade size, the non-faulted
    agents' return delta and their clean return with 95% CIs, and the paired differences from the policy each is
    compared with (of the size, the return delta and the faulted return)."""
    def ci(m: Mapping[str, float], fmt: str) -> str:
        return f"{m['mean']:{fmt}} [{m['lo']:{fmt}}, {m['hi']:{fmt}}]"

    lines = [f"## {title}", "",
             "| fault | policy | cascade size | others' return delta | others' clean return | compared with | "
             "size difference | return delta difference | faulted return difference |", "|---|---|---|---|---|---|---|---|---|"]
    for fault, rows in compared.items():
        for policy, r in rows.items():
            diffs = ["-"] * 4 if r["baseline"] is None else [
                r["baseline"], ci(r["size_diff"], "+.2f"), ci(r["others_return_delta_diff"], "+.3f"),
                ci(r["others_faulted_return_diff"], "+.3f")]
            lines.append(f"| {fault} | {policy} | {ci(r['size'], '.2f')} | {ci(r['others_return_delta'], '+.3f')} | "
                         f"{ci(r['others_clean_return'], '.2f')} | " + " | ".join(diffs) + " |")
    lines += ["", "Means with 95% bootstrap CIs. Cascade size: non-faulted agents that fail per episode; others' return "
              "delta: the non-faulted agents' mean return, faulted - clean twin (negative: the fault costs them return); "
              "differences: the policy's minus the compared policy's on the same episode (negative size difference: a "
              "smaller cascade; positive faulted return difference: the others fare better under the fault)."]
    return "\n".join(lines) + "\n"


def heatmaps(study: CascadeStudy, policy: str) -> Figure:
    """``policy``'s influence matrix (mean TV of dst's action distribution k steps after src's impulse), one panel
    per lag."""
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
    fig.supxlabel("effect on (dst)", fontsize=9, y=-0.02)
    fig.suptitle(f"{policy}: influence of an impulse on src on dst's action distribution", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="TV")
    return fig


def graph(study: CascadeStudy, policy: str) -> Figure:
    """``policy``'s lag-1 influence graph: agents on a circle, an arrow per edge from box to box (so its head is
    never under a name), its width by the lag-1 effect."""
    inf = study.influence
    n = len(inf.agents)
    angle = 2 * np.pi * np.arange(n) / n
    pos = np.stack([np.cos(angle), np.sin(angle)], 1)
    fig, ax = pyplot().subplots(figsize=(4, 4))
    top = float(np.nanmax(inf.effect[:, :, 0], initial=0.0)) or 1.0
    boxes = [ax.text(x, y, name, ha="center", va="center", fontsize=8, bbox={"boxstyle": "round", "fc": "w"})
             for name, (x, y) in zip(inf.agents, pos)]
    fig.canvas.draw()  # lays the boxes out, so the arrows can end at their edges
    for s, d, _ in inf.edges():
        i, j = inf.agents.index(s), inf.agents.index(d)
        ax.annotate("", pos[j], pos[i], arrowprops={
            "arrowstyle": "-|>", "lw": 0.5 + 3 * inf.effect[i, j, 0] / top, "color": "tab:blue",
            "connectionstyle": "arc3,rad=0.1", "patchA": boxes[i].get_bbox_patch(),
            "patchB": boxes[j].get_bbox_patch(), "shrinkA": 2, "shrinkB": 2, "mutation_scale": 14})
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_axis_off()
    ax.set_title(f"{policy}: lag-1 influence graph", fontsize=9)
    return fig


def timeline(study: CascadeStudy, i: int, policy: str) -> Figure:
    """``policy``'s representative episode under studied fault i: each agent's TV from its clean twin over the
    episode, the onset marked, each failure marked where it happened."""
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
    ax.set_title(f"{policy} under {study.faults[i].label}, episode seed {int(study.run.seeds[e])} (x: failure)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="TV from clean twin")
    ax.legend(loc="upper right", fontsize=7)
    return fig
