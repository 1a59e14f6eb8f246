"""Summarise experiments/purification.sh: the teacher alone, teacher + purifier under attacks that ignore it, go
through it or use BPDA, and the robust student, side by side (clean return, worst case over the suite per victim
set and eps with its 95% CI, every attack's return, the gradient-masking flags).

    python experiments/purification_table.py runs/experiments/purification/sl_s0 experiments/results/purification_sl_s0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# column -> (attack run, policy in it)
COLUMNS = {
    "teacher": ("attack_robust", "teacher"),
    "teacher + purifier, attacks ignore it": ("attack_ignore", "teacher"),
    "teacher + purifier, adaptive (through it)": ("attack_through", "teacher"),
    "teacher + purifier, BPDA": ("attack_bpda", "teacher"),
    "teacher + randomised purifier, adaptive with EOT": ("attack_eot", "teacher"),
    "robust student": ("attack_robust", "student"),
}


def main(run: Path, out: Path) -> None:
    results, episodes = {}, set()
    for column, (attack_run, policy) in COLUMNS.items():
        path = run / attack_run / "reports" / "robustness.json"
        if path.is_file():
            data = json.loads(path.read_text())
            # labelled <name>@<run> when the run attacked policies of several runs
            results[column] = next(r for k, r in data["results"].items() if k.split("@")[0] == policy)
            episodes.add(f"{data['meta']['episodes']} episodes per cell (attack seeds {data['meta']['seed']}..)")
    if not results:
        raise SystemExit(f"no attack runs under {run}")
    first = next(iter(results.values()))
    cells = [(v, e) for v in first["worst_case"] for e in first["worst_case"][v]]
    lines = ["# Purification on speaker-listener", "",
             f"Runs under `{run}` (experiments/purification.sh); {', '.join(sorted(episodes))}, greedy actions, mean team return [95% bootstrap CI]. Worst case: the lowest return over random, fgsm, "
             "pgd, targeted_lowest (and pgd_strong at eps 1.0) on the victim set or its subset listener_0.", "",
             "| | " + " | ".join(results) + " |", "|---|" + "---|" * len(results),
             "| clean | " + " | ".join(f"{r['clean']:.2f}" for r in results.values()) + " |"]
    table: dict = {c: {"clean": r["clean"], "worst_case": {}, "returns": r["returns"], "ci": r["ci"],
                       "flags": r["flags"]} for c, r in results.items()}
    for v, e in cells:
        row = []
        for column, r in results.items():
            name, value = r["worst_case"][v][e]
            subset = r["worst_case_from"][v][e]
            lo, hi = r["ci"][subset][name.split(" on ")[0]][e]
            row.append(f"{value:.2f} [{lo:.2f}, {hi:.2f}] ({name})")
            table[column]["worst_case"][f"{v} eps {e}"] = {"attack": name, "return": value, "ci": [lo, hi]}
        lines.append(f"| worst case, victims {v}, eps {float(e):g} | " + " | ".join(row) + " |")
    lines += ["", "Every attack (victims all, then listener_0):", ""]
    attacks = list(dict.fromkeys(a for r in results.values() for a in r["returns"]["all"]))
    lines += ["| victims | attack | eps | " + " | ".join(results) + " |", "|---|---|---|" + "---|" * len(results)]
    for v in first["returns"]:
        for a in attacks:
            for e in sorted({e for r in results.values() for e in r["returns"][v].get(a, {})}, key=float):
                lines.append(f"| {v} | {a} | {float(e):g} | " + " | ".join(
                    f"{r['returns'][v][a][e]:.2f}" if e in r["returns"][v].get(a, {}) else "" for r in results.values()) + " |")
    checks = sorted(run.glob("attack_eotcheck_*/reports/robustness.json"))
    if checks:
        lines += ["", "The randomised purifier, `targeted_lowest` at eps 1.0 on listener_0, by attack view:", "",
                  "| purify.gradient | purify.eot_samples | return [95% CI] |", "|---|---|---|"]
        for path in checks:
            data = json.loads(path.read_text())
            r, p = next(iter(data["results"].values())), data["meta"]["purifier"]
            value, (lo, hi) = r["returns"]["listener_0"]["targeted_lowest"]["1.0"], r["ci"]["listener_0"]["targeted_lowest"]["1.0"]
            lines.append(f"| {p['gradient']} | {p['eot_samples']} | {value:.2f} [{lo:.2f}, {hi:.2f}] |")
            table[f"randomised purifier, {p['gradient']}, eot {p['eot_samples']}"] = {"return": value, "ci": [lo, hi]}
    lines += ["", "Gradient-masking flags:", ""]
    for column, r in results.items():
        flags = [f"{k}: {f['name']} ({f['detail']})" for k, fl in r["flags"].items() for f in fl]
        lines.append(f"- {column}: " + ("; ".join(flags) if flags else "none"))
    for name in ("purifier", "purifier_randomized"):
        purify = run / name / "reports" / "purify.md"
        if purify.is_file():
            lines += ["", f"## {name} (reports/purify.md)", "", *purify.read_text().splitlines()[2:]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(table, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
