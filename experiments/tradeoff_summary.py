"""Seed-pooled table of a robust-recipe sweep (the third round of ``experiments/robust_tradeoff.sh``).

Reads ``<root>/candidates/<recipe>_s<seed>`` (distill runs: clean retention over their evaluation episodes)
and ``<root>/<prefix><recipe>_s<seed>`` (attack runs of one eps: clean retention and worst case over their
attacks, and the teacher's clean return and worst case on the same episodes), and prints one markdown row per recipe and victim
set: mean over seeds [95% t-interval].

    python experiments/tradeoff_summary.py runs/experiments/tradeoff3                  # FGSM + PGD runs
    python experiments/tradeoff_summary.py runs/experiments/tradeoff3 --prefix suite_  # whole-suite runs
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from robustness import fmt, t_interval


def team_mean(report: Path, policy: str) -> float:
    return json.loads((report / f"eval_{policy}.json").read_text())["summary"]["team"]["mean"]


def seed_rows(run: Path, attacked: Path) -> dict[str, dict[str, float]]:
    """Per victim set: retention, worst case and recovery of one seed's student (the attack run's only eps)."""
    reports = run / "reports"
    teacher, random = team_mean(reports, "teacher"), team_mean(reports, "random")
    report = json.loads((attacked / "reports" / "robustness.json").read_text())
    (eps,) = map(str, report["meta"]["attack"]["eps"])  # the checks add a larger eps of their own
    results = report["results"]
    t = results.pop("teacher@teacher")
    (s,) = results.values()
    clean = {"retention": (team_mean(reports, "student") - random) / (teacher - random),
             "retention_here": (s["clean"] - s["random"]) / (t["clean"] - s["random"]), "eps": float(eps)}
    rows = {}
    for victims, by_eps in t["worst_case"].items():
        t_worst, s_worst = by_eps[eps][1], s["worst_case"][victims][eps][1]
        rows[victims] = {**clean, "worst": s_worst, "recovery": (s_worst - t_worst) / (t["clean"] - t_worst),
                         "teacher_worst": t_worst}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--prefix", default="eval_", help="attack runs are <root>/<prefix><recipe>_s<seed>")
    args = ap.parse_args()
    recipes: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for run in sorted((args.root / "candidates").iterdir()):
        match = re.fullmatch(r"(.+)_s(\d+)", run.name)
        attacked = args.root / f"{args.prefix}{run.name}"
        if match and (attacked / "reports" / "robustness.json").exists():
            for victims, row in seed_rows(run, attacked).items():
                recipes[match[1], victims].append(row)
    print("| recipe | victims | seeds | clean retention (distill run) | clean retention (attack run) | eps | "
          "teacher's worst | worst | recovery |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, victims), rows in recipes.items():
        ret, here, worst, rec = (t_interval([r[k] for r in rows])
                                 for k in ("retention", "retention_here", "worst", "recovery"))
        print(f"| {name} | {victims} | {len(rows)} | {fmt(ret, pct=True)} | {fmt(here, pct=True)} | {rows[0]['eps']:g} | "
              f"{rows[0]['teacher_worst']:.2f} | {fmt(worst)} | {fmt(rec, pct=True)} |")


if __name__ == "__main__":
    main()
