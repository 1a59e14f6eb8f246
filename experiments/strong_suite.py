"""The default attack suite on a speaker-listener pipeline run's teacher and DIGR student, against issue 23's
targeted-attack column (the strong suite's acceptance measurement).

    python experiments/strong_suite.py runs/zoo/sl/s0 --name sl_s0

Runs ``madistill attack`` (as a command, the two policies in two processes at once) with the default
``attack.methods`` at eps 0.3 and 1.0, victims all and listener_0, 100 episodes (seeds 20000..20099), greedy
actions, masking and objective checks on. Each run is given what a run of both policies would pair up: the
critic attack reads the teacher's value heads, the transfer attack crafts on the other policy. Extra Hydra
overrides (``key=value``) may follow. A policy whose run (under ``runs/experiments/strong_suite/<name>/``) has a
report already is not attacked again. Writes ``experiments/results/strong_suite_<name>.{json,md}``: both runs'
JSON with an ``acceptance`` section, and the comparison table followed by both reports. Per cell the comparison
gives the suite's worst case (over the attacks on the set and on its evaluated subsets) with its 95% bootstrap
CI, the issue's number, and both as a loss below each one's own clean return, since a fresh training of the
same config need not have the issue's clean return.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
EPS = (0.3, 1.0)
VICTIMS = ("all", "listener_0")
# issue 23's table: the targeted attack with targets from a one-step lookahead in the env, and the clean returns
ISSUE_TARGETED = {("teacher", "all", 0.3): -25.71, ("teacher", "all", 1.0): -104.91,
                  ("teacher", "listener_0", 1.0): -92.96, ("student", "all", 0.3): -19.59,
                  ("student", "all", 1.0): -104.07}
ISSUE_CLEAN = {"teacher": -10.79, "student": -10.53}


def acceptance(results: dict) -> list[dict]:
    """Per policy, victim set and eps: the suite's worst case, its CI and source, issue 23's number, and whether
    the worst case is at or below it (raw and as a loss below clean) and, for all, at or below listener_0's."""
    rows = []
    for policy, res in results.items():
        for victims in VICTIMS:
            for eps in EPS:
                key = str(eps)
                name, worst = res["worst_case"][victims][key]
                source = res["worst_case_from"][victims][key]
                attack = name.removesuffix(f" on {source}")
                issue = ISSUE_TARGETED.get((policy, victims, eps))
                row = {"policy": policy, "victims": victims, "eps": eps, "clean": res["clean"], "worst": worst,
                       "attack": name, "ci": res["ci"][source][attack][key], "issue": issue,
                       "at_or_below": None if issue is None else worst <= issue,
                       "loss": res["clean"] - worst,
                       "issue_loss": None if issue is None else ISSUE_CLEAN[policy] - issue}
                row["loss_at_least_issue"] = None if issue is None else row["loss"] >= row["issue_loss"]
                if victims == "all":
                    row["at_or_below_listener"] = worst <= res["worst_case"]["listener_0"][key][1]
                rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    """Markdown lines of the comparison."""
    yes = {True: "yes", False: "**no**", None: ""}
    lines = ["| policy | victims | eps | clean | suite worst case [95% CI] (attack) | issue 23 targeted | at or below "
             "| loss below clean: suite / issue | all at or below listener_0 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        issue = "" if r["issue"] is None else f"{r['issue']:.2f}"
        losses = f"{r['loss']:.2f}" + ("" if r["issue"] is None else f" / {r['issue_loss']:.2f}")
        lines.append(f"| {r['policy']} | {r['victims']} | {r['eps']:g} | {r['clean']:.2f} | {r['worst']:.2f} "
                     f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] ({r['attack']}) | {issue} | {yes[r['at_or_below']]} | "
                     f"{losses} | {yes[r.get('at_or_below_listener')]} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a speaker-listener pipeline run directory (policies/teacher and policies/student)")
    ap.add_argument("--name", required=True, help="results name: experiments/results/strong_suite_<name>.*")
    ap.add_argument("--episodes", type=int, default=100)
    args, overrides = ap.parse_known_args()  # the rest: Hydra overrides for the attack stage
    if any(o.startswith("-") for o in overrides):
        ap.error(f"unknown options {[o for o in overrides if o.startswith('-')]}")
    policies = Path(args.run) / "policies"
    runs, procs = {}, []
    for name, other in (("teacher", "student"), ("student", "teacher")):
        runs[name] = Path("runs/experiments/strong_suite") / args.name / name
        cmd = ["madistill", "attack", f"attack.policy={policies / name}", f"attack.critic={policies / 'teacher'}",
               f"attack.transfer_from={policies / other}", f"attack.eps=[{','.join(map(str, EPS))}]",
               f"attack.victims=[{','.join(VICTIMS)}]", f"attack.episodes={args.episodes}", "env.num_workers=0",
               "logger.progress=false", f"hydra.run.dir={runs[name]}", *overrides]
        if (runs[name] / "reports" / "robustness.json").is_file():  # an earlier run's report is reused
            continue
        print(" ".join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd))
    if any(p.wait() != 0 for p in procs):
        sys.exit("an attack run failed")
    loaded = {name: json.loads((out / "reports" / "robustness.json").read_text()) for name, out in runs.items()}
    payload = {"meta": {name: d["meta"] for name, d in loaded.items()},
               "results": {name: d["results"][name] for name, d in loaded.items()}}
    rows = acceptance(payload["results"])
    payload["acceptance"] = {"issue_23_targeted": {f"{p} {v} {e:g}": x for (p, v, e), x in ISSUE_TARGETED.items()},
                             "issue_23_clean": ISSUE_CLEAN, "cells": rows}
    reports = [(out / "reports" / "robustness.md").read_text() for out in runs.values()]
    command = " ".join(["python experiments/strong_suite.py", *sys.argv[1:]])
    text = "\n".join([f"# The strong suite against issue 23's targeted attacks ({args.name})", "", f"    {command}", "",
                      *table(rows), "", *reports])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"strong_suite_{args.name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"strong_suite_{args.name}.md").write_text(text)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
