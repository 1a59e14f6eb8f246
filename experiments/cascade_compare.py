"""Do robust students contain cascades? A teacher vs its plain, DIGR and robust students on the same faults and
episodes, pooled over seeds (issue 20, item 7).

For each seed and fault, one ``madistill cascade`` run studies the seed's teacher and its students (``distill=plain``,
DIGR, ``distill=robust``) together (a directory of links to the policies, so the stage plays them all on the same
faults and episodes): the fault hits one agent (``victim``) from step ``--onset`` to the episode's end,
with greedy actions (``cascade.deterministic=true``: twins act alike until the fault, and every policy is judged
against the same failure threshold, ``cascade.threshold``, with no noise floor). Faults: ``random`` and ``dead``
actions, and the attack suite's ``pgd`` on the victim's observation at the env's middle budget (``fault=attack``;
``--eps`` another budget).

Per fault and policy, pooled over seeds: the cascade size (non-faulted agents that fail per episode) and the
non-faulted agents' return delta (faulted - clean twin), and each student's paired difference from its own
seed's teacher, episode by episode. CIs: a percentile bootstrap over the (seed, episode) samples that resamples
the episodes within each seed (the seeds' policies held fixed); beside it, the mean over seeds with a 95%
t-interval over the per-seed means (the seeds as a sample of training runs). Writes
``experiments/results/cascade_compare_<env>.{json,md}``; each (seed, fault) run stays under ``--work`` and is
reused when rerun with the same settings.

    bash experiments/zoo.sh runs/zoo             # the teachers and students, 3 seeds per env
    python experiments/cascade_compare.py speaker_listener --seeds 0 1 2 --zoo runs/zoo
    python experiments/cascade_compare.py spread --seeds 0 1 2 --zoo runs/zoo
    # other policies: a path template per role, {seed} filled in
    python experiments/cascade_compare.py speaker_listener --policy teacher=<dir>/teacher_s{seed}/policies/teacher \\
        --policy digr=<dir>/digr_s{seed}/policies/student --policy robust=<dir>/robust_s{seed}/policies/student
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from robustness import t_interval

from madistill.cascade.report import PER_EPISODE, compare, comparison
from madistill.cli import compose_config
from madistill.common.io import atomic_write_text
from madistill.stages import cascade as cascade_stage

RESULTS = Path(__file__).parent / "results"
ENVS: dict[str, dict[str, Any]] = {
    "speaker_listener": {"env": "simple_speaker_listener_v4", "victim": "speaker_0", "eps": 0.3, "policies": {
        "teacher": "{zoo}/sl/s{seed}/policies/teacher", "plain": "{zoo}/sl/plain/s{seed}/policies/student",
        "digr": "{zoo}/sl/s{seed}/policies/student", "robust": "{zoo}/sl/robust/s{seed}/policies/student"}},
    "spread": {"env": "simple_spread_v3", "victim": "agent_0", "eps": 0.2, "policies": {
        "teacher": "{zoo}/spread/teacher/s{seed}/policies/teacher",
        "plain": "{zoo}/spread/plain/s{seed}/policies/student",
        "digr": "{zoo}/spread/digr/s{seed}/policies/student",
        "robust": "{zoo}/spread/robust/s{seed}/policies/student"}},
}
FAULTS = {"random": ["fault=random"], "dead": ["fault=dead"], "attack": ["fault=attack", "fault.method=pgd"]}
FAULTS_SAID = {"random": "random actions", "dead": "dead (no-op) actions", "attack": "pgd at eps {eps} on its observation"}


def linked_policies(root: Path, policies: dict[str, Path]) -> Path:
    """A run directory whose ``policies/<role>`` link to the given policy directories, and nothing else: the stage
    labels them by role."""
    (root / "policies").mkdir(parents=True, exist_ok=True)
    for link in (root / "policies").iterdir():
        link.unlink()
    for role, path in policies.items():
        (root / "policies" / role).symlink_to(path.resolve(), target_is_directory=True)
    return root


def study(env: dict[str, Any], policies: dict[str, Path], fault: str, seed_dir: Path, episodes: int,
          onset: int, extra: Sequence[str]) -> dict[str, Any]:
    """One cascade run of the policies under ``fault``: ``reports/cascade.json``'s body (reused when its
    run directory holds one made with the same overrides of the same policies)."""
    run = seed_dir / fault
    overrides = [f"env={env['env']}", "logger=quiet", "logger.figures=false", "env.num_workers=0",
                 f"cascade.policy={linked_policies(seed_dir / 'links', policies)}", f"cascade.episodes={episodes}",
                 "cascade.deterministic=true", "cascade.onsets=[3]", *FAULTS[fault], f"fault.victims=[{env['victim']}]",
                 f"fault.onset={onset}", "fault.duration=null", f"fault.eps={env['eps']}", *extra]
    made = {"overrides": overrides, "policies": {role: str(path.resolve()) for role, path in policies.items()}}
    record, report = run / "made.json", run / "reports" / "cascade.json"
    if record.is_file() and report.is_file() and json.loads(record.read_text()) == made:
        return json.loads(report.read_text())
    payload = cascade_stage.run(compose_config(overrides), run)
    atomic_write_text(record, json.dumps(made))
    return payload


def pooled(by_seed: dict[int, dict[str, Any]], n_boot: int) -> dict[str, Any]:
    """Per fault and policy, the seeds' cascade runs pooled: ``compare`` over all (seed, episode) samples with the
    episodes resampled within each seed, and ``seeds``: per measure (and paired difference), the per-seed means
    with their mean and 95% t-interval over seeds. ``by_seed``: seed -> a cascade run's ``policies``, each the same
    policies and faults."""
    seeds = sorted(by_seed)
    first = by_seed[seeds[0]]
    for s in seeds:
        if list(by_seed[s]) != list(first) or any(by_seed[s][p]["seeds"] != first[p]["seeds"] for p in first):
            raise ValueError(f"seed {s}'s runs study other policies or episodes than seed {seeds[0]}'s")
    episodes = len(first[next(iter(first))]["seeds"])
    faults = list(first[next(iter(first))]["faults"])
    results = {p: {"faults": {f: {"cascade": {k: np.concatenate([by_seed[s][p]["faults"][f]["cascade"][k] for s in seeds])
                                             for k in PER_EPISODE}} for f in faults}} for p in first}
    compared = compare(results, n_boot, 0.95, strata=np.repeat(seeds, episodes))
    per_seed = {s: compare(by_seed[s], n_boot, 0.95) for s in seeds}
    for f, rows in compared.items():
        for p, row in rows.items():
            keys = [k for k in row if k != "baseline"]
            row["seeds"] = {k: dict(zip(["mean", "lo", "hi"], t_interval([per_seed[s][f][p][k]["mean"] for s in seeds]),
                                        strict=True)) | {"per_seed": [per_seed[s][f][p][k]["mean"] for s in seeds]}
                            for k in keys}
    return compared


def verdicts(compared: dict[str, Any]) -> list[str]:
    """Per fault and student against its teacher: is its cascade smaller, does the fault cost the others less
    return, and do they fare better under the fault; by the pooled paired CI and by the t-interval over seeds."""
    def said(m: dict[str, float], s: dict[str, float], below: str, above: str, digits: int) -> str:
        def word(x: dict[str, float]) -> str:
            return below if x["hi"] < 0 else above if x["lo"] > 0 else "no clear difference"

        return (f"{m['mean']:+.{digits}f} [{m['lo']:+.{digits}f}, {m['hi']:+.{digits}f}] ({word(m)}; over seeds "
                f"{s['mean']:+.{digits}f} [{s['lo']:+.{digits}f}, {s['hi']:+.{digits}f}]: {word(s)})")

    lines = []
    for f, rows in compared.items():
        for p, r in rows.items():
            if r["baseline"] is None:
                continue
            seeds = r["seeds"]
            lines.append(f"- {f}, {p} - {r['baseline']}: cascade size "
                         f"{said(r['size_diff'], seeds['size_diff'], 'smaller', 'larger', 2)}; others' return loss "
                         f"{said(r['others_return_delta_diff'], seeds['others_return_delta_diff'], 'larger', 'smaller', 3)}; "
                         f"others' faulted return {said(r['others_faulted_return_diff'], seeds['others_faulted_return_diff'], 'lower', 'higher', 3)}")
    return lines


def seeds_table(compared: dict[str, Any]) -> str:
    """Per fault and policy, the per-seed means of the cascade size, the others' return delta and every paired
    difference, and their mean with a 95% t-interval over seeds."""
    lines = ["## Over seeds (mean of the per-seed means, 95% t-interval)", "",
             "| fault | policy | measure | per seed | mean [95% t-interval] |", "|---|---|---|---|---|"]
    for f, rows in compared.items():
        for p, r in rows.items():
            for k, m in r["seeds"].items():
                if k not in ("size", "others_return_delta") and not k.endswith("_diff"):
                    continue
                per = ", ".join(f"{v:+.3f}" for v in m["per_seed"])
                lines.append(f"| {f} | {p} | {k} | {per} | {m['mean']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}] |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("env", choices=list(ENVS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    p.add_argument("--policy", action="append", default=[], metavar="ROLE=TEMPLATE",
                   help="a role's policy directory, {seed} filled in (default: the zoo's)")
    p.add_argument("--zoo", default="runs/zoo", help="root of the policies experiments/zoo.sh trains (default runs/zoo)")
    p.add_argument("--episodes", type=int, default=200, help="paired episodes per seed and fault (cascade.episodes)")
    p.add_argument("--onset", type=int, default=5, help="episode step at which the faults begin")
    p.add_argument("--eps", type=float, default=None, help="the attack fault's budget (default: the env's middle one)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--work", type=Path, default=Path("/tmp/cascade_compare"), help="where the cascade runs go")
    p.add_argument("--out", type=Path, default=None, help="results stem (default experiments/results/cascade_compare_<env>)")
    p.add_argument("overrides", nargs="*", help="more overrides for every cascade run (cascade.*, attack.*)")
    args = p.parse_args(argv)
    env = ENVS[args.env] | ({} if args.eps is None else {"eps": args.eps})
    templates = env["policies"] | dict(item.split("=", 1) for item in args.policy)
    by_seed: dict[int, dict[str, Any]] = {}
    for s in args.seeds:
        policies = {role: Path(t.format(seed=s, zoo=args.zoo)) for role, t in templates.items()}
        missing = [str(path) for path in policies.values() if not path.is_dir()]
        if missing:
            sys.exit(f"cascade_compare: no policy at {', '.join(missing)}: train the zoo first "
                     f"(bash experiments/zoo.sh {args.zoo}) or leave seed {s} out")
        runs = [study(env, policies, f, args.work / args.env / f"s{s}", args.episodes, args.onset, args.overrides)
                for f in args.faults]
        by_seed[s] = {label: {"seeds": r["seeds"], "faults": {k: {"cascade": v["cascade"]} for run in runs
                                                              for k, v in run["policies"][label]["faults"].items()}}
                      for label, r in runs[0]["policies"].items()}
    compared = pooled(by_seed, args.n_boot)
    command = " ".join(["python", *sys.argv])
    stem = args.out or RESULTS / f"cascade_compare_{args.env}"
    meta = {"command": command, "env": env["env"], "victim": env["victim"], "eps": env["eps"], "seeds": args.seeds,
            "episodes": args.episodes, "onset": args.onset, "faults": {f: FAULTS[f] for f in args.faults},
            "policies": {role: [t.format(seed=s, zoo=args.zoo) for s in args.seeds] for role, t in templates.items()},
            "overrides": args.overrides, "n_boot": args.n_boot}
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"meta": meta, "pooled": compared, "per_seed": by_seed}))
    text = "\n".join([
        f"# Cascades of a teacher and its students: {env['env']}", "", f"`{command}`", "",
        f"Seeds {args.seeds}, {args.episodes} paired episodes each; faults on {env['victim']} from step {args.onset} to "
        f"the episode's end: {', '.join(FAULTS_SAID[f].format(eps=env['eps']) for f in args.faults)}; greedy actions.", "",
        comparison(compared, f"Pooled over seeds ({len(args.seeds)} x {args.episodes} episodes; bootstrap over "
                   "episodes within seeds)"),
        seeds_table(compared), "## Robust students contain cascades?", "", *verdicts(compared), ""])
    atomic_write_text(stem.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
