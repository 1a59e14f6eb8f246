"""One table of an experiment's runs: retention and robustness per recipe, pooled over seeds.

Reads every run directory under the given roots (Hydra run or sweep directories of ``madistill`` stages):

- runs with ``reports/eval_{teacher,student,random}.json`` (``distill``, ``finetune``, ``pipeline``): the
  student's clean retention on the run's own evaluation episodes;
- runs with ``reports/robustness.json`` (``attack``, often of a whole sweep directory): for each student and
  its teacher on the same episodes, clean retention, the worst case over the suite per victim set and eps,
  and recovery (the share of the teacher's loss under attack the student gets back);
- runs with ``reports/cascade.json`` (``cascade``, e.g. ``madistill cascade -m fault=noise,random
  cascade.policy=<run s0>,<run s1>`` or one run over a sweep directory): per studied policy and fault, the cascade
  size (failed non-faulted agents per episode) and the non-faulted agents' return delta, pooled over the studied
  policies' seeds.

Retention and recovery come from the library (``madistill.stages.retention`` and ``recovery``). A run's
recipe is its Hydra overrides (``.hydra/overrides.yaml``) without the seed and the paths it read; runs of
one recipe pool into one row: mean over seeds [95% t-interval over seeds].

    madistill distill -m +experiment=spread_robust distill.teacher=<spread teacher run> seed=0,1,2
    madistill attack +experiment=spread_robust attack.policy=runs/experiments/spread_robust/distill \\
        hydra.run.dir=runs/experiments/spread_robust/attack
    python experiments/summarise.py runs/experiments/spread_robust --out experiments/results/spread_robust

``--out <stem>`` writes ``<stem>.md`` (the printed tables) and ``<stem>.json`` (every row with its seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from robustness import fmt, t_interval

from madistill.common.io import atomic_write_text
from madistill.evaluate.evaluator import teacher_of
from madistill.stages.results import recovery, retention
from madistill.stages.rundir import RUN_ONLY

_ROLES = ("teacher", "student", "random")


def run_dirs(roots: list[Path]) -> list[Path]:
    """Every run directory (one with a ``reports/`` directory) at or under ``roots``, sorted."""
    return sorted({r.parent for root in roots for r in [root / "reports", *root.glob("**/reports")] if r.is_dir()})


def recipe(run: Path) -> str:
    """A run's recipe: its Hydra overrides without seed, paths, logging and the like (``RUN_ONLY``; ``default``
    when none are left)."""
    record = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(record.read_text()) if record.is_file() else []
    kept = sorted(o for o in overrides or [] if not o.lstrip("+~").startswith(RUN_ONLY))
    return " ".join(kept) or "default"


def seed_of(run: Path) -> int | None:
    """The seed a run was made with (Hydra's record of its config), if it has one."""
    record = run / ".hydra" / "config.yaml"
    return yaml.safe_load(record.read_text()).get("seed") if record.is_file() else None


def clean_retention(student: float, teacher: float, random: float) -> float:
    """:func:`madistill.stages.retention` of three mean team returns."""
    return retention({name: {"team": {"mean": value}} for name, value in zip(_ROLES, (teacher, student, random))})


def eval_rows(run: Path) -> dict[str, float] | None:
    """The student's retention over a run's own evaluation (None for a run without teacher, student, random)."""
    reports = run / "reports"
    paths = {name: reports / f"eval_{name}.json" for name in _ROLES}
    present = [p.name for p in reports.glob("eval_*.json")]
    if present and not (reports / "eval.md").is_file():  # eval.md comes last: the evaluation did not finish
        print(f"summarise: note: skipped the retention of {run}: its evaluation did not finish (no eval.md beside "
              f"{', '.join(sorted(present))})", file=sys.stderr)
        return None
    if not all(p.is_file() for p in paths.values()):  # not a student's evaluation (no student or no random team)
        return None
    summaries = {name: json.loads(p.read_text())["summary"] for name, p in paths.items()}
    return {"retention": retention(summaries)}


def _student_run(meta: dict[str, Any], label: str) -> Path | None:
    """The run directory a ``<policy>@<run>`` label of an attack report refers to (None if it is gone): from the
    report's path of that policy, or (reports that keyed their paths by policy name) the label's run under the
    attacked directory."""
    path = meta.get("policies", {}).get(label)
    found = _policy_run(path) if isinstance(path, str) else None
    if found is not None:
        return found
    root = meta.get("attack", {}).get("policy")
    if not isinstance(root, str):
        return None
    path = Path(root) / label.split("@", 1)[1] if "@" in label else Path(root)
    for candidate in (path, path.parent.parent):  # a run directory, or a policy directory inside one
        if (candidate / "reports").is_dir() or (candidate / ".hydra").is_dir():
            return candidate
    return None


def _teacher_label(label: str, results: dict[str, Any]) -> str | None:
    """The label of the teacher a policy was evaluated beside (``teacher_of``), else the one added for the sweep."""
    return teacher_of(label, list(results)) or ("teacher@teacher" if "teacher@teacher" in results else None)


def attack_rows(run: Path) -> list[tuple[Path | None, str, str, float, dict[str, float]]]:
    """Per student of an attack run: (its run dir, policy name, victims, eps, clean retention, worst case and
    recovery against its teacher on the same episodes)."""
    report = json.loads((run / "reports" / "robustness.json").read_text())
    results, meta = report["results"], report["meta"]
    budgets = [float(e) for e in meta["attack"]["eps"]]  # the checks add a larger eps of their own
    rows = []
    for label, res in results.items():
        name = label.split("@", 1)[0]
        teacher = _teacher_label(label, results)
        if name == "teacher" or teacher is None:
            continue
        t = results[teacher]
        kept = clean_retention(res["clean"], t["clean"], res["random"])
        for victims, by_eps in res["worst_case"].items():
            for eps in budgets:
                worst, t_worst = by_eps[str(eps)][1], t["worst_case"][victims][str(eps)][1]
                rows.append((_student_run(meta, label), name, victims, eps, {
                    "retention": kept, "teacher_clean": t["clean"], "teacher_worst": t_worst, "worst": worst,
                    "recovery": recovery(worst, t["clean"], t_worst)}))
    return rows


def _policy_run(path: str) -> Path | None:
    """The run directory of a saved policy's directory (``<run>/policies/<name>``), or the run itself."""
    for candidate in (Path(path), Path(path).parent.parent):
        if (candidate / ".hydra").is_dir():
            return candidate
    return None


def cascade_rows(run: Path) -> list[tuple[Path | None, str, str, dict[str, float]]]:
    """Per studied policy and fault of a cascade run: (the policy's run dir, policy name, fault label, cascade
    size and the non-faulted agents' mean return delta)."""
    report = json.loads((run / "reports" / "cascade.json").read_text())
    paths = report["meta"]["policies"]
    return [(_policy_run(paths[label]) if label in paths else None, label.split("@", 1)[0], fault,
             {"size": f["cascade"]["size_mean"], "others_return_delta": f["cascade"]["others_return_delta"]})
            for label, result in report["policies"].items() for fault, f in result["faults"].items()]


def _add_run(run: Path, retained: dict, attacked: dict, cascaded: dict) -> None:
    """Add a run's rows to the tables, all of them or (a report that does not read) none."""
    row = eval_rows(run)
    reports = run / "reports"
    attacks = attack_rows(run) if (reports / "robustness.json").is_file() else []
    cascades = cascade_rows(run) if (reports / "cascade.json").is_file() else []
    if row is not None:
        retained[recipe(run)].append((seed_of(run), row))
    for student, name, victims, eps, values in attacks:
        key = (recipe(student) if student else "unknown run", name, victims, eps)
        attacked[key].append((seed_of(student) if student else None, values))
    for policy_run, name, fault, values in cascades:
        key = (recipe(policy_run) if policy_run else "unknown run", name, recipe(run), fault)
        cascaded[key].append((seed_of(policy_run) if policy_run else None, values))


def summarise(roots: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Rows pooled over seeds: ``retention`` (one per recipe), ``robustness`` (one per recipe, policy, victim set
    and eps) and ``cascade`` (one per policy recipe, policy, cascade settings and fault); each value a [mean, low,
    high] 95% t-interval over the runs' seeds (a cascade row's: the studied policies' seeds)."""
    retained: dict[str, list[tuple[int | None, dict[str, float]]]] = defaultdict(list)
    attacked: dict[tuple[str, str, str, float], list[tuple[int | None, dict[str, float]]]] = defaultdict(list)
    cascaded: dict[tuple[str, str, str, str], list[tuple[int | None, dict[str, float]]]] = defaultdict(list)
    for run in run_dirs(roots):
        try:
            _add_run(run, retained, attacked, cascaded)
        except (json.JSONDecodeError, KeyError) as e:
            print(f"summarise: note: skipped {run}: a report of it is not complete ({type(e).__name__}: {e})",
                  file=sys.stderr)
    return {
        "retention": [{"recipe": r, "seeds": [s for s, _ in rows], "retention": t_interval([v["retention"] for _, v in rows])}
                      for r, rows in retained.items()],
        "robustness": [{"recipe": r, "policy": name, "victims": victims, "eps": eps, "seeds": [s for s, _ in rows],
                        "teacher_clean": rows[0][1]["teacher_clean"], "teacher_worst": rows[0][1]["teacher_worst"],
                        **{k: t_interval([v[k] for _, v in rows]) for k in ("retention", "worst", "recovery")}}
                       for (r, name, victims, eps), rows in attacked.items()],
        "cascade": [{"recipe": r, "policy": name, "settings": settings, "fault": fault, "seeds": [s for s, _ in rows],
                     **{k: t_interval([v[k] for _, v in rows]) for k in ("size", "others_return_delta")}}
                    for (r, name, settings, fault), rows in sorted(cascaded.items())],
    }


def markdown(table: dict[str, list[dict[str, Any]]]) -> str:
    """The summary as Markdown tables (retention on each run's own episodes; robustness; cascades)."""
    lines = []
    if table["retention"]:
        lines += ["| recipe | seeds | clean retention |", "|---|---|---:|"]
        lines += [f"| {r['recipe']} | {_seeds(r['seeds'])} | {fmt(r['retention'], True, len(r['seeds']))} |" for r in table["retention"]]
    if table["robustness"]:
        lines += ["", "| recipe | policy | seeds | victims | eps | clean retention | teacher clean / worst | worst | "
                  "recovery |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['recipe']} | {r['policy']} | {_seeds(r['seeds'])} | {r['victims']} | {r['eps']:g} | "
                  f"{fmt(r['retention'], True, len(r['seeds']))} | {r['teacher_clean']:.2f} / {r['teacher_worst']:.2f} | "
                  f"{fmt(r['worst'], False, len(r['seeds']))} | {fmt(r['recovery'], True, len(r['seeds']))} |"
                  for r in table["robustness"]]
    if table["cascade"]:
        lines += ["", "| recipe | policy | cascade settings | fault | seeds | cascade size | non-faulted return delta |",
                  "|---|---|---|---|---|---:|---:|"]
        lines += [f"| {r['recipe']} | {r['policy']} | {r['settings']} | {r['fault']} | {_seeds(r['seeds'])} | "
                  f"{fmt(r['size'], False, len(r['seeds']))} | {fmt(r['others_return_delta'], False, len(r['seeds']))} |"
                  for r in table["cascade"]]
    return "\n".join(lines).lstrip("\n") + "\n"


def _seeds(seeds: list[int | None]) -> str:
    return ",".join("?" if s is None else str(s) for s in seeds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", type=Path, nargs="+", help="run or sweep directories (searched recursively)")
    ap.add_argument("--out", type=Path, help="write <out>.md and <out>.json as well")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.roots if not r.is_dir()]
    table = summarise(args.roots) if not missing else {}
    if missing or not (table["retention"] or table["robustness"] or table["cascade"]):
        what = f"no such directory: {', '.join(missing)}" if missing else "no run reports found"
        print(f"summarise: error: {what}; pass the run or sweep directories of distill, finetune, pipeline, "
              "attack or cascade runs", file=sys.stderr)
        return 2
    text = markdown(table)
    print(text, end="")
    if args.out:
        atomic_write_text(f"{args.out}.json", json.dumps(table, indent=2))
        atomic_write_text(f"{args.out}.md", text)
        print(f"wrote {args.out}.md and {args.out}.json", file=sys.stderr)  # stdout stays the tables
    return 0


if __name__ == "__main__":
    sys.exit(main())
