"""Writers for evaluation results: JSON, marl-eval raw-data JSON and Markdown.

All writers go through :func:`atomic_write_text`, so a reader (or a crash)
never observes a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from madistill.common.io import atomic_write_text
from madistill.envs.teams import several_teams, team_arrays
from madistill.errors import MadistillError
from madistill.evaluate.stats import EpisodeRecord, record_from_dict, record_to_dict

__all__ = [
    "markdown_table",
    "read_json",
    "side_stats",
    "sides_of",
    "write_json",
    "write_markdown",
    "write_marl_eval_json",
]

_STEP_KEY = re.compile(r"^step_(\d+)$")


def _dumps(obj: Any) -> str:
    # NaN/inf are allowed (Python's json reads them back) rather than crashing
    # a long evaluation at the very end.
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_json(
    path: str | os.PathLike[str],
    summary: Mapping[str, Any],
    records: Sequence[EpisodeRecord],
    meta: Mapping[str, Any],
) -> Path:
    """Write one self-contained JSON result file.

    Layout::

        {
          "meta": {...whatever the caller passes: policy, env id, attack, ...},
          "summary": {...output of madistill.evaluate.stats.summarize...},
          "episodes": [{"seed", "length", "team_return", "agent_returns"}, ...]
        }

    Read it back with :func:`read_json`.
    """
    payload = {
        "meta": dict(meta),
        "summary": dict(summary),
        "episodes": [record_to_dict(r) for r in records],
    }
    return atomic_write_text(path, _dumps(payload))


def read_json(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any], list[EpisodeRecord]]:
    """Load a file written by :func:`write_json` as ``(meta, summary, records)``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    records = [record_from_dict(row) for row in data.get("episodes", [])]
    return dict(data.get("meta", {})), dict(data.get("summary", {})), records


def _marl_eval_metrics(
    records: Sequence[EpisodeRecord], include_agent_returns: bool, teams: Mapping[str, Sequence[str]] | None = None
) -> dict[str, list[float]]:
    metrics: dict[str, list[float]] = {"episode_return": [r.team_return for r in records]}
    if several_teams(teams):
        for team, members in teams.items():  # type: ignore[union-attr]
            metrics[f"{team}_team_return"] = team_arrays(records, members).tolist()
    if include_agent_returns:
        agent_ids: list[str] = []
        for r in records:
            for aid in r.agent_returns:
                if aid not in agent_ids:
                    agent_ids.append(aid)
        for aid in agent_ids:
            key = f"{aid}_return"
            if key in metrics:
                raise ValueError(f"agent id {aid!r} gives metric name {key!r}, which clashes")
            # marl-eval needs equal-length metric lists; an agent absent from an
            # episode is recorded as NaN to keep the lists aligned.
            metrics[key] = [r.agent_returns.get(aid, math.nan) for r in records]
    return metrics


def write_marl_eval_json(
    path: str | os.PathLike[str],
    records: Sequence[EpisodeRecord],
    env_name: str,
    task_name: str,
    algo_name: str,
    run_name: str,
    step: int = 0,
    *,
    step_count: int | None = None,
    include_agent_returns: bool = True,
    teams: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write (or merge into) a raw-data JSON file readable by InstaDeep's ``marl-eval``.

    ``marl-eval`` (``marl_eval.utils.data_processing_utils.data_process_pipeline``)
    expects this nesting::

        {
          "<env_name>": {
            "<task_name>": {
              "<algo_name>": {
                "<run_name>": {                      # one independent run / training seed
                  "step_0": {                        # one entry per logging step "step_<k>"
                    "step_count": <int>,             # env steps taken when logged
                    "<metric>": [<float>, ...],      # one value per evaluation episode
                    ...
                  },
                  ...
                  "step_k": {...},
                  "absolute_metrics": {              # metrics of the final/best policy
                    "<metric>": [<float>, ...]
                  }
                }
              }
            }
          }
        }

    Metrics written here: ``episode_return`` (team return of every episode,
    i.e. the mean over agents) and, unless ``include_agent_returns=False``,
    ``<agent_id>_return`` for each agent; with several ``teams`` (team name ->
    agent ids) also ``<team>_team_return``, the mean over the team's agents
    (NaN in an episode without them). Every metric is a list of floats, one
    per episode. marl-eval requires every run/algorithm/task of an environment
    to have the same number of runs, steps and episodes; that is up to the
    caller. Pass ``metrics_to_normalize=["episode_return"]`` to marl-eval to
    normalise returns. marl-eval lower-cases every key when it loads the file.
    (Checked against ``id-marl-eval``: ``data_process_pipeline`` and
    ``create_matrices_for_rliable`` accept the files written here.)

    Merging: if ``path`` exists it is loaded and the new entry is merged in,
    so several algorithms / runs / steps accumulate in one file. The entry
    ``step_<step>`` of this run is replaced (re-running is idempotent); the
    run's ``absolute_metrics`` are set to this evaluation's metrics when
    ``step`` is the largest step index the run has. The read-merge-write is not
    locked, so do not write the same file from concurrent processes.

    Args:
        path: Destination JSON file.
        records: Evaluation episodes (non-empty).
        env_name, task_name, algo_name, run_name: Keys of the nesting above
            (e.g. ``run_name="seed_3"`` or ``"3"``).
        step: Logging-step index ``k`` used in the key ``"step_<k>"``.
        step_count: Value of ``"step_count"`` (training env steps at logging
            time); defaults to ``step``.
        include_agent_returns: Also write per-agent ``<agent_id>_return`` lists.
        teams: Team name -> agent ids; with several teams, per-team returns are written too.
    """
    records = list(records)
    if not records:
        raise ValueError("write_marl_eval_json needs at least one EpisodeRecord")
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    step = int(step)
    metrics = _marl_eval_metrics(records, include_agent_returns, teams)

    dest = Path(path)
    data: dict[str, Any] = {}
    if dest.exists():
        text = dest.read_text(encoding="utf-8")
        if text.strip():
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MadistillError(
                    f"{dest} exists but is not valid JSON ({exc}): delete it or pick another marl-eval output path"
                ) from exc
        if not isinstance(data, dict):
            raise MadistillError(
                f"{dest} exists but is not a marl-eval JSON object: delete it or pick another output path"
            )

    run = (
        data.setdefault(str(env_name), {})
        .setdefault(str(task_name), {})
        .setdefault(str(algo_name), {})
        .setdefault(str(run_name), {})
    )
    run[f"step_{step}"] = {
        "step_count": int(step if step_count is None else step_count),
        **{k: [float(v) for v in vals] for k, vals in metrics.items()},
    }
    step_indices = [int(m.group(1)) for key in run if (m := _STEP_KEY.match(key))]
    if step >= max(step_indices) or "absolute_metrics" not in run:
        run["absolute_metrics"] = {k: [float(v) for v in vals] for k, vals in metrics.items()}
    # Keep "absolute_metrics" after the step entries, as in marl-eval's examples.
    run["absolute_metrics"] = run.pop("absolute_metrics")
    return atomic_write_text(dest, _dumps(data))


def _fmt(x: Any) -> str:
    try:
        return f"{float(x):.2f}"
    except (TypeError, ValueError):
        return "–"


def _fmt_ci(stats: Mapping[str, Any], point: str) -> str:
    ci = stats.get(f"{point}_ci") or [math.nan, math.nan]
    return f"{_fmt(stats.get(point))} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table comparing several summaries (from :func:`summarize`).

    One row per key of ``summaries`` (policy / condition name), in the dict's
    order. Columns: team IQM [CI], team mean [CI], one mean column per agent
    id (union over all summaries, in order of first appearance; ``–`` where a
    summary lacks that agent), episode length ``mean ± std`` and the number of
    episodes. With several teams (summaries with ``teams``) each team's IQM and
    mean [CI] replace the team columns: the mean over opposing sides means little.
    Numbers have 2 decimals. The CI level in the header is taken from
    the summaries' ``confidence`` (95% if absent or if they disagree, the
    header says just "CI").
    """
    confidences = {float(s.get("confidence", 0.95)) for s in summaries.values()}
    ci_label = f"{confidences.pop() * 100:g}% CI" if len(confidences) == 1 else "CI"

    agent_ids: list[str] = []
    for s in summaries.values():
        for aid in s.get("agents", {}):
            if aid not in agent_ids:
                agent_ids.append(aid)

    sides = sides_of(summaries)
    header = (
        ["Policy"]
        + [f"{side or 'Team'} {point} [{ci_label}]" for side in sides for point in ("IQM", "mean")]
        + [f"{aid} mean" for aid in agent_ids]
        + ["Episode length", "Episodes"]
    )
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for name, s in summaries.items():
        team = s.get("team", {})
        agents = s.get("agents", {})
        length = s.get("episode_length", {})
        row = [
            _cell(name),
            *(_fmt_ci(side_stats(s, side), point) for side in sides for point in ("iqm", "mean")),
            *(_fmt(agents[aid].get("mean")) if aid in agents else "–" for aid in agent_ids),
            f"{_fmt(length.get('mean'))} ± {_fmt(length.get('std'))}",
            str(s.get("n_episodes", team.get("n", "–"))),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def sides_of(summaries: Mapping[str, Mapping[str, Any]]) -> list[str | None]:
    """Whose returns every report shows: None (the team of every agent) or, when the summaries have several
    teams, each team in order of first appearance."""
    teams: list[str | None] = []
    for s in summaries.values():
        for team in s.get("teams", {}):
            if team not in teams:
                teams.append(team)
    return teams or [None]


def side_stats(summary: Mapping[str, Any], side: str | None) -> Mapping[str, Any]:
    """The return statistics of ``side`` (see :func:`sides_of`) in ``summary`` (empty where it has none)."""
    return summary.get("team", {}) if side is None else summary.get("teams", {}).get(side, {})


def write_markdown(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write Markdown ``text`` to ``path`` (a trailing newline is ensured)."""
    return atomic_write_text(path, text if text.endswith("\n") else text + "\n")
