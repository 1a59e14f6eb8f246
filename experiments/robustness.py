"""Robustness of a teacher and its students over several distillation seeds, against the whole attack suite.

For one saved teacher: distils a plain, a DIGR and a DIGR + adversarial student per seed (the ``distill``
stage, run as a command), evaluates all of them and the teacher with one ``madistill attack`` run (every
attack, every eps, victims = all agents and one agent; same episode seeds everywhere; gradient-masking checks
on), and summarises per variant: clean return and clean retention, the worst case over the suite per eps,
and the share of the teacher's loss the student recovers, as means over seeds with 95% t-intervals over the
seeds (the teacher is one policy: its CI is the bootstrap over episodes). Optionally trains the learned
adversary (SB3 PPO, no victim gradients) against the teacher and the seed-0 robust student at the middle eps.

    python experiments/robustness.py runs/teachers/simple_speaker_listener_v4 --victim listener_0 --seeds 0 1 2
    python experiments/robustness.py runs/teachers/simple_spread_v3 --victim agent_0 --seeds 0 1 2 \\
        --eps 0.1 0.2 0.3 --robust distill.rounds=8

Students already distilled (``<out>/<variant>_s<seed>/policies/student``) are reused. Writes
``experiments/results/robustness_<env>.{json,md,png}`` and keeps the attack stage's full report beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from scipy import stats  # noqa: E402

from madistill.policies.store import read_manifest  # noqa: E402
from madistill.stages.policies import teacher_dir  # noqa: E402
from madistill.stages.results import recovery  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"plain": ["distill=plain"], "digr": ["distill=digr"], "robust": ["distill=robust"]}
LABELS = {"teacher": "teacher", "plain": "plain student", "digr": "DIGR student", "robust": "DIGR + adversarial student"}


def madistill(*args: str) -> None:
    """Run one ``madistill`` stage as a user would; stop on its error."""
    cmd = ["madistill", *args, "logger.progress=false"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def distil(teacher: Path, out: Path, variant: str, seed: int, extra: list[str], env: str) -> Path:
    run = out / f"{variant}_s{seed}"
    overrides = [*VARIANTS[variant], *extra, f"distill.teacher={teacher}", f"seed={seed}", "eval.episodes=100"]
    student = run / "policies" / "student"
    if not _made_with(run, student, overrides, env):
        madistill("distill", *overrides, f"hydra.run.dir={run}")
    return student


def _made_with(run: Path, student: Path, overrides: list[str], env: str) -> bool:
    """Whether ``run`` already holds a student distilled with these overrides (Hydra records them) in this
    env's config (the manifest records it: the CLI once fell back to the default env's DIGR weight)."""
    recorded = run / ".hydra" / "overrides.yaml"
    if not ((student / "manifest.json").is_file() and recorded.is_file()):
        return False
    given = set(OmegaConf.load(recorded)) - {f"env={env}", "logger.progress=false"}  # the CLI and madistill() add these
    return given == set(overrides) and read_manifest(student)["config"]["env"]["name"] == env


def candidates(root: Path, policies: dict[str, Path]) -> Path:
    """A directory the attack stage reads as one run per policy (``<name>/policies/<role>``)."""
    shutil.rmtree(root, ignore_errors=True)
    for name, path in policies.items():
        shutil.copytree(path, root / name / "policies" / path.name)
    return root


def t_interval(values: list[float]) -> list[float]:
    """Mean and 95% t-interval over seeds (from one seed: the value three times)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return [float(x.mean())] * 3
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return [float(x.mean()), float(x.mean() - half), float(x.mean() + half)]


def summarise(report: dict, variants: list[str], seeds: list[int], eps: list[float], victims: list[str]) -> dict:
    res = report["results"]
    teacher = res["teacher@teacher"]
    random = teacher["random"]
    out: dict = {"teacher": {"clean": teacher["clean"], "random": random, "worst": {}, "flags": teacher["flags"]}}
    t_worst: dict[tuple[str, float], float] = {}
    for v in victims:
        out["teacher"]["worst"][v] = {}
        for e in eps:
            name, value = teacher["worst_case"][v][str(e)]
            # a set's worst case may come from an attack on a subset of it ("<attack> on <subset>"): its CI is there
            subset = teacher["worst_case_from"][v][str(e)]
            ci = teacher["ci"][subset][name.removesuffix(f" on {subset}")][str(e)]
            out["teacher"]["worst"][v][str(e)] = {"attack": name, "mean": value, "ci": ci}
            t_worst[v, e] = value
    gain = teacher["clean"] - random
    for variant in variants:
        runs = [res[f"student@{variant}_s{s}"] for s in seeds]
        row: dict = {
            "clean": t_interval([r["clean"] for r in runs]),
            "retention": t_interval([(r["clean"] - random) / gain for r in runs]),
            "worst": {}, "recovery": {}, "worst_attacks": {},
            "flags": {f"s{s}": r["flags"] for s, r in zip(seeds, runs, strict=True) if any(r["flags"].values())},
        }
        for v in victims:
            row["worst"][v], row["recovery"][v], row["worst_attacks"][v] = {}, {}, {}
            for e in eps:
                worst = [r["worst_case"][v][str(e)] for r in runs]
                row["worst"][v][str(e)] = t_interval([w[1] for w in worst])
                row["recovery"][v][str(e)] = t_interval([recovery(w[1], teacher["clean"], t_worst[v, e])
                                                      for w in worst])
                row["worst_attacks"][v][str(e)] = [w[0] for w in worst]
        out[variant] = row
    return out


def fmt(m: list[float], pct: bool = False, seeds: int = 2) -> str:
    """``mean [low, high]``, or ``mean (one seed)`` where one seed gives no interval; ``n/a`` for an undefined
    mean (a share of a teacher no better than random)."""
    if not np.isfinite(m[0]):
        return "n/a"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.2f}")
    return f"{f(m[0])} (one seed)" if seeds < 2 else f"{f(m[0])} [{f(m[1])}, {f(m[2])}]"


def markdown(summary: dict, env: str, seeds: list[int], eps: list[float], victims: list[str], episodes: int,
             learned: dict | None) -> str:
    t = summary["teacher"]
    lines = [f"# Robustness over seeds: {env}", "",
             f"Students distilled with seeds {seeds}; {episodes} episodes per cell (same seeds everywhere), greedy "
             f"actions; eps in normalised units (standard deviations). Worst case over the attack suite; students: "
             f"mean over seeds [95% t-interval over seeds]; teacher: mean [95% bootstrap CI over episodes]. "
             f"Random policy: {t['random']:.2f}. Recovery = (student's worst case - teacher's worst case) / (teacher's clean - teacher's worst case): the share of the teacher's loss the student's worst-case return gets back.", ""]
    for v in victims:
        lines += [f"## victims: {v}", "",
                  "| policy | clean | retention | " + " | ".join(f"worst, eps {e:g}" for e in eps) + " | "
                  + " | ".join(f"recovery, eps {e:g}" for e in eps) + " |",
                  "|---" * (3 + 2 * len(eps)) + "|"]
        cells = [f"{t['worst'][v][str(e)]['mean']:.2f} [{t['worst'][v][str(e)]['ci'][0]:.2f}, {t['worst'][v][str(e)]['ci'][1]:.2f}]"
                 f" ({t['worst'][v][str(e)]['attack']})" for e in eps]
        lines.append(f"| teacher | {t['clean']:.2f} | 100% | " + " | ".join(cells) + " |" + " |" * len(eps))
        for variant, row in summary.items():
            if variant == "teacher":
                continue
            lines.append(f"| {LABELS[variant]} | {fmt(row['clean'])} | {fmt(row['retention'], True)} | "
                         + " | ".join(fmt(row["worst"][v][str(e)]) for e in eps) + " | "
                         + " | ".join(fmt(row["recovery"][v][str(e)], True) for e in eps) + " |")
        lines.append("")
    lines += ["## Gradient-masking flags", ""]
    flagged = [(n, s, fl) for n, r in summary.items()
               for s, fl in ([("", r["flags"])] if n == "teacher" else r["flags"].items()) if any(fl.values())]
    lines += [f"- {LABELS[n]} {s}: " + "; ".join(f"{f['name']} ({v}): {f['detail']}" for v, fs in fl.items() for f in fs)
              for n, s, fl in flagged] or ["- none"]
    if learned:
        lines += ["", "## Learned adversary (SB3 PPO, no victim gradients) vs PGD, middle eps", "",
                  "| policy | victims | clean | PGD | learned |", "|---|---|---|---|---|"]
        lines += [f"| {p} | {v} | {r['clean']:.2f} | {r['pgd']:.2f} | {r['learned']:.2f} |" for p, vs in learned.items() for v, r in vs.items()]
    return "\n".join(lines) + "\n"


def figure(summary: dict, eps: list[float], victims: list[str], env: str) -> plt.Figure:
    fig, axes = plt.subplots(1, len(victims), figsize=(5.5 * len(victims), 4), squeeze=False)
    for ax, v in zip(axes[0], victims, strict=True):
        xs = [0.0, *eps]
        t = summary["teacher"]
        ax.plot(xs, [t["clean"]] + [t["worst"][v][str(e)]["mean"] for e in eps], "k-o", label="teacher")
        for variant, row in summary.items():
            if variant == "teacher":
                continue
            m = np.array([row["clean"]] + [row["worst"][v][str(e)] for e in eps])
            ax.plot(xs, m[:, 0], "-o", label=LABELS[variant])
            ax.fill_between(xs, m[:, 1], m[:, 2], alpha=0.2)
        ax.axhline(t["random"], color="grey", ls="--", label="random policy")
        ax.set_xscale("symlog", linthresh=min(eps))
        ax.set(xlabel="eps (std units)", ylabel="worst-case team return", title=f"{env}, victims: {v}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def learned_vs_pgd(out: Path, robust: Path, eps: float, victims: list[str], episodes: int, steps: int,
                   reuse: bool) -> dict:
    """PGD vs the learned adversary at ``eps`` on the ``robust`` student and its teacher (the attack stage adds
    the teacher recorded in the student's manifest)."""
    if not (reuse and (out / "learned_eval" / "reports" / "robustness.json").is_file()):
        madistill("attack", f"attack.policy={robust}", "attack.methods=[pgd,learned]", f"attack.eps=[{eps}]",
                  f"attack.victims=[{','.join(victims)}]", f"attack.episodes={episodes}", f"attack.learned_steps={steps}",
                  "attack.checks=false", f"hydra.run.dir={out / 'learned_eval'}")
    res = json.loads((out / "learned_eval" / "reports" / "robustness.json").read_text())["results"]
    return {name: {v: {"clean": r["clean"], "pgd": r["returns"][v]["pgd"][str(eps)], "learned": r["returns"][v]["learned"][str(eps)]}
                   for v in victims} for name, r in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", type=Path, help="teacher run or policy directory")
    ap.add_argument("--victim", required=True, help="the one-agent victim set (e.g. listener_0)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--robust", nargs="*", default=[], help="extra overrides for the robust student")
    ap.add_argument("--learned-steps", type=int, default=0, help="train the learned adversary this long (0: skip)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="summarise the attack reports already in --out again")
    args = ap.parse_args()

    tdir = teacher_dir(args.teacher)
    env = read_manifest(tdir)["env"]["name"]
    out = args.out or Path("runs/experiments/robustness") / env
    students = {f"{v}_s{s}": distil(args.teacher, out, v, s, args.robust if v == "robust" else [], env)
                for s in args.seeds for v in VARIANTS}
    victims = ["all", args.victim]
    if not (args.reuse and (out / "eval" / "reports" / "robustness.json").is_file()):
        root = candidates(out / "candidates", {"teacher": tdir, **students})
        madistill("attack", f"attack.policy={root}", f"attack.eps=[{','.join(map(str, args.eps))}]",
                  f"attack.victims=[{','.join(victims)}]", f"attack.episodes={args.episodes}", f"hydra.run.dir={out / 'eval'}")
    report = json.loads((out / "eval" / "reports" / "robustness.json").read_text())
    summary = summarise(report, list(VARIANTS), args.seeds, args.eps, victims)
    learned = None
    if args.learned_steps:
        mid = args.eps[len(args.eps) // 2]
        learned = learned_vs_pgd(out, students["robust_s0"], mid, victims, args.episodes, args.learned_steps,
                                 args.reuse)

    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"robustness_{env}"
    meta = {"teacher": str(args.teacher), "seeds": args.seeds, "eps": args.eps, "victims": victims,
            "episodes": args.episodes, "robust_overrides": args.robust, "command": " ".join(sys.argv)}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "learned": learned}, indent=1))
    text = markdown(summary, env, args.seeds, args.eps, victims, args.episodes, learned)
    stem.with_suffix(".md").write_text(text)
    shutil.copy(out / "eval" / "reports" / "robustness.md", RESULTS / f"robustness_{env}_full_report.md")
    figure(summary, args.eps, victims, env).savefig(stem.with_suffix(".png"), dpi=120)
    print(text)


if __name__ == "__main__":
    main()
