"""Seed-pooled table of a robust-recipe sweep (the third round of ``experiments/robust_tradeoff.sh``).

Reads ``<root>/candidates/<recipe>_s<seed>`` (distill runs: clean retention over their evaluation episodes)
and ``<root>/<prefix><recipe>_s<seed>`` (attack runs: clean retention and worst case over their attacks per eps, and the teacher's clean return and worst case on the same episodes), and prints one markdown row per recipe and victim
set: mean over seeds [95% t-interval].

    python experiments/tradeoff_summary.py runs/experiments/tradeoff3                  # FGSM + PGD runs
    python experiments/tradeoff_summary.py runs/experiments/tradeoff3 --prefix suite_  # whole-suite runs
    python experiments/tradeoff_summary.py runs/experiments/finetune --prefix suite_ --seeds 0 1 2
    python experiments/tradeoff_summary.py runs/experiments/finetune --prefix budgets_  # attack runs of any eps
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


def seed_rows(run: Path, attacked: Path) -> dict[tuple[str, float], dict[str, float]]:
    """Per victim set and eps of the attack run: retention, worst case and recovery of one seed's student."""
    reports = run / "reports"
    teacher, random = team_mean(reports, "teacher"), team_mean(reports, "random")
    report = json.loads((attacked / "reports" / "robustness.json").read_text())
    budgets = list(map(str, report["meta"]["attack"]["eps"]))  # the checks add a larger eps of their own
    results = report["results"]
    t = results.pop("teacher@teacher")
    (s,) = results.values()
    clean = {"retention": (team_mean(reports, "student") - random) / (teacher - random),
             "retention_here": (s["clean"] - s["random"]) / (t["clean"] - s["random"])}
    rows = {}
    for victims, by_eps in t["worst_case"].items():
        for eps in budgets:
            t_worst, s_worst = by_eps[eps][1], s["worst_case"][victims][eps][1]
            rows[victims, float(eps)] = {**clean, "worst": s_worst, "teacher_worst": t_worst,
                                         "recovery": (s_worst - t_worst) / (t["clean"] - t_worst)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--prefix", default="eval_", help="attack runs are <root>/<prefix><recipe>_s<seed>")
    ap.add_argument("--seeds", type=int, nargs="*", help="only these seeds (default: every seed found)")
    args = ap.parse_args()
    recipes: dict[tuple[str, str, float], list[dict[str, float]]] = defaultdict(list)
    for run in sorted((args.root / "candidates").iterdir()):
        match = re.fullmatch(r"(.+)_s(\d+)", run.name)
        attacked = args.root / f"{args.prefix}{run.name}"
        if args.seeds is not None and match and int(match[2]) not in args.seeds:
            continue
        if match and (attacked / "reports" / "robustness.json").exists():
            for (victims, eps), row in seed_rows(run, attacked).items():
                recipes[match[1], victims, eps].append(row)
    print("| recipe | victims | seeds | clean retention (distill run) | clean retention (attack run) | eps | "
          "teacher's worst | worst | recovery |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, victims, eps), rows in recipes.items():
        ret, here, worst, rec = (t_interval([r[k] for r in rows])
                                 for k in ("retention", "retention_here", "worst", "recovery"))
        print(f"| {name} | {victims} | {len(rows)} | {fmt(ret, pct=True)} | {fmt(here, pct=True)} | {eps:g} | "
              f"{rows[0]['teacher_worst']:.2f} | {fmt(worst)} | {fmt(rec, pct=True)} |")


if __name__ == "__main__":
    main()
