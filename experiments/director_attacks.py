"""The PA-AD director next to the learned adversary, PGD and the targeted attacks on one saved team.

One `madistill attack` run per victim set (they run side by side, in parallel: the victim sets share nothing), each with
director, learned, pgd, targeted_lowest and targeted_lookahead at every eps, on `--episodes` episodes from the
attack seed 20000. The summary merges them: mean team return with its 95% bootstrap CI per cell, the worst case
of a set over it and its evaluated subsets (the suite's monotone rule, across the runs), the under_trained
flags, the last point of each learned attack's training curve, and the wall time of each evaluation and of all
evaluations of a run (training included). Writes <out>.json and <out>.md; --merge-only summarises finished runs.

    python experiments/director_attacks.py --policy runs/zoo/sl/s0/policies/teacher \\
        --out experiments/results/director_attacks_sl_s0 attack.director_reachable=false
    python experiments/director_attacks.py --policy runs/zoo/sl/s0/policies/teacher --victims listener_0 \
        --methods pgd,targeted_lowest,director --director-steps 196608 \
        --out experiments/results/director_attacks_sl_s0_listener_196k attack.director_reachable=false
    python experiments/director_attacks.py --policy runs/zoo/sl/s0/policies/teacher --methods pgd,targeted_lowest,director \
        --eps 1.0 --director-steps 49152 --out experiments/results/director_attacks_sl_s0_reachable_eps1 \
        attack.director_reachable=true
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

METHODS = "pgd,targeted_lowest,targeted_lookahead,learned,director"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True, help="run or policy directory to attack")
    ap.add_argument("--out", required=True, help="results path without suffix")
    ap.add_argument("--methods", default=METHODS, help="attack.methods of every run")
    ap.add_argument("--victims", default="all,listener_0", help="victim sets, one run each (a set's subsets too)")
    ap.add_argument("--eps", default="0.3,1.0")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--director-steps", type=int, default=98304)
    ap.add_argument("--learned-steps", type=int, default=49152)
    ap.add_argument("--run-dir", default="runs/experiments/director_attacks")
    ap.add_argument("--merge-only", action="store_true", help="summarise the runs already under --run-dir")
    ap.add_argument("overrides", nargs="*", help="more madistill overrides for every run, e.g. attack.director_reachable=false")
    args = ap.parse_args()
    victims = args.victims.split(",")
    if not args.merge_only:
        runs = {v: subprocess.Popen(["madistill", "attack", f"attack.policy={args.policy}", f"attack.methods=[{args.methods}]",
                                     f"attack.eps=[{args.eps}]", f"attack.victims=[{v}]", f"attack.episodes={args.episodes}",
                                     "attack.checks=false", f"attack.director_steps={args.director_steps}",
                                     f"attack.learned_steps={args.learned_steps}", "env.num_workers=0",
                                     "logger.progress=false", f"hydra.run.dir={args.run_dir}/{v}", *args.overrides])
                for v in victims}
        for v, proc in runs.items():
            if proc.wait() != 0:
                raise SystemExit(f"the attack run on victims {v} failed (exit {proc.returncode})")
    results = {v: json.loads(Path(f"{args.run_dir}/{v}/reports/robustness.json").read_text()) for v in victims}
    summary = summarise(results, args)
    Path(f"{args.out}.json").write_text(json.dumps(summary, indent=2))
    Path(f"{args.out}.md").write_text(markdown(summary))
    print(markdown(summary))


def summarise(results: dict[str, dict], args: argparse.Namespace) -> dict:
    """Per victim set and eps: every attack's mean and CI, the monotone worst case, the under_trained flags,
    the learned attacks' last training point; per run the seconds per evaluation (a mean over its eps) and
    their total over the run's evaluations (training included)."""
    teacher = {v: next(iter(r["results"].values())) for v, r in results.items()}
    members = {v: set(next(iter(t["victim_sets"].values()))) for v, t in teacher.items()}
    out: dict = {"policy": args.policy, "methods": args.methods.split(","), "overrides": args.overrides, "episodes": args.episodes, "seed": next(iter(results.values()))["meta"]["seed"],
                 "director_steps": args.director_steps, "learned_steps": args.learned_steps,
                 "clean": next(iter(teacher.values()))["clean"], "random": next(iter(teacher.values()))["random"],
                 "run_seconds": {v: t["seconds_per_evaluation"]["clean"] + sum(
                     secs * sum(len(r[a]) for r in t["returns"].values() if a in r)
                     for a, secs in t["seconds_per_evaluation"].items() if a != "clean") for v, t in teacher.items()},
                 "cells": {}}
    for v, t in teacher.items():
        subsets = [u for u in teacher if members[u] <= members[v]]
        out["cells"][v] = {}
        for eps in args.eps.split(","):
            key = str(float(eps))
            cells = {a: {"mean": r[key], "ci": t["ci"][v][a][key]} for a, r in t["returns"][v].items() if key in r}
            pool = [(teacher[u]["returns"][u][a][key], a if u == v else f"{a} on {u}") for u in subsets
                    for a in teacher[u]["returns"][u] if key in teacher[u]["returns"][u][a]]
            worst = min(pool)
            out["cells"][v][key] = {
                "returns": cells, "worst_case": {"attack": worst[1], "return": worst[0]},
                "under_trained": [f["detail"] for f in t["training_checks"].get(v, []) if f["detail"].startswith(f"eps {float(eps):g}:")],
                "last_training_return": {a: c[key][-1] for a, c in t["training_curves"].get(v, {}).items() if key in c},
            }
        out["cells"][v]["seconds_per_evaluation"] = t["seconds_per_evaluation"]
    return out


def markdown(s: dict) -> str:
    lines = [f"# Director vs learned vs gradient attacks: {s['policy']}", "",
             f"{s['episodes']} episodes (seeds {s['seed']}..{s['seed'] + s['episodes'] - 1}), greedy actions, mean team "
             f"return [95% bootstrap CI]; clean {s['clean']:.2f}, uniform random {s['random']:.2f}. Training per cell: "
             + ", ".join(f"{a} {s[f'{a}_steps']} env steps" for a in ("director", "learned") if a in s["methods"]) + "."
             + (f" Overrides: {' '.join(s['overrides'])}." if s["overrides"] else ""), ""]
    for v, by_eps in s["cells"].items():
        for eps, c in by_eps.items():
            if eps == "seconds_per_evaluation":
                continue
            lines += [f"## victims {v}, eps {float(eps):g}", "", "| attack | return | 95% CI |", "|---|---|---|"]
            lines += [f"| {a} | {r['mean']:.2f} | [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] |" for a, r in c["returns"].items()]
            lines += ["", f"worst case (monotone): {c['worst_case']['return']:.2f} ({c['worst_case']['attack']})"]
            lines += [f"- training: {a} last rollout, steps {p[0]}: attacker's episode return {p[1]:.2f}"
                      for a, p in c["last_training_return"].items()]
            lines += [f"- **under_trained**: {d}" for d in c["under_trained"]] or ["- no learned attack under-trained"]
            lines.append("")
        secs = by_eps["seconds_per_evaluation"]
        lines += [f"seconds per evaluation on victims {v} (training included for learned and director): "
                  + ", ".join(f"{a} {t:.1f}" for a, t in secs.items())
                  + f"; all evaluations of the run {s['run_seconds'][v]:.0f} s", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
