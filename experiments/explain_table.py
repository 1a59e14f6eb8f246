"""The explanation table: attribution methods x policies (teacher and its students) x quality metrics.

For every seed, the policies are either given (``--policy name=DIR``, ``{seed}`` in DIR replaced by the seed,
e.g. a shared set of trained runs) or trained here: a teacher (``--teacher-steps`` agent-steps) and a plain
(lambda = 0) and a DIGR student distilled from it with the ``distill`` stage's code. Observations come from greedy
episodes of the teacher (episode seeds ``eval.seed`` onwards, never trained on); every ``explain.methods`` map of
every policy is scored on them with the ``explain`` stage's code (docs/explain.md). Seeds are pooled with a
bootstrap stratified by seed. Two claims of issue 22 are tested with CIs:

- DIGR students' gradient maps are more faithful than plain students': deletion AUC (DIGR - plain) < 0, paired
  over the same observations, and the same on the AUC's gap below each policy's random-order floor
  (DIGR - plain > 0);
- gradient-based maps pass the randomisation check: with every layer re-initialised, the CI (over
  re-initialisations and observations) of their per-feature Spearman correlation with the trained network's
  maps lies within +- ``explain.randomisation_tolerance``.

    bash experiments/zoo.sh runs/zoo     # the trained teachers and students, 3 seeds per env
    python experiments/explain_table.py --seeds 0 1 2 \
        --policy teacher=runs/zoo/sl/s{seed}/policies/teacher --policy plain=runs/zoo/sl/plain/s{seed}/policies/student \
        --policy digr=runs/zoo/sl/s{seed}/policies/student --policy robust=runs/zoo/sl/robust/s{seed}/policies/student
    python experiments/explain_table.py --seeds 0 1 --teacher-steps 200000 distill.rounds=2 \
        distill.agent_steps_per_round=20000 distill.updates_per_round=500

Trailing arguments are Hydra overrides for every run. Trained runs go under ``--out`` (runs that exist are
reused); writes ``experiments/results/explain_table_<env>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from madistill.attacks.budget import group_budgets
from madistill.attacks.robustness import suite_attack
from madistill.cli import compose_config
from madistill.common.collect import collect_round
from madistill.envs.features import feature_layouts
from madistill.evaluate.evaluator import run_episodes
from madistill.explain.evaluation import FLOOR, markdown_table, score_methods, summarise
from madistill.explain.quality import randomisation_verdict, summary
from madistill.policies.store import load_team
from madistill.runtime import make_vec_env
from madistill.stages.distill import distill_students
from madistill.stages.train import train_teachers
from madistill.tb import TBLogger

RESULTS = Path(__file__).parent / "results"
GRADIENT_BASED = ("gradient", "smoothgrad", "input_x_gradient", "integrated_gradients")
POLICIES = {"teacher": ("teacher", []), "plain": ("student", ["distill=plain"]), "digr": ("student", ["distill=digr"])}


def train(run: Path, base: list[str], seed: int, teacher_steps: int) -> dict[str, Path]:
    """The seed's teacher and its plain and DIGR students (reused where their policy directories exist)."""
    teacher_run = run / "teacher"
    if not (teacher_run / "policies" / "teacher").is_dir():
        cfg = compose_config([*base, f"seed={seed}", f"teacher.total_agent_steps={teacher_steps}"])
        train_teachers(cfg, teacher_run, TBLogger(teacher_run / "tb", enabled=False))
    dirs = {"teacher": teacher_run / "policies" / "teacher"}
    for name, (_, overrides) in list(POLICIES.items())[1:]:
        student_run = run / name
        if not (student_run / "policies" / "student").is_dir():
            cfg = compose_config([*base, *overrides, f"seed={seed}", "eval.random_baseline=false"])
            distill_students(cfg, student_run, teacher_run, TBLogger(student_run / "tb", enabled=False))
        dirs[name] = student_run / "policies" / "student"
    return dirs


def _ci(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['mean_ci'][0]:.3f}, {s['mean_ci'][1]:.3f}]"


def given(specs: list[str], seed: int) -> dict[str, Path]:
    """``--policy name=DIR`` arguments as policy directories of ``seed``."""
    out = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            sys.exit(f"explain_table: error: --policy {spec!r} is not name=DIR")
        out[name] = Path(pattern.format(seed=seed))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="simple_speaker_listener_v4")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--teacher-steps", type=int, default=200_000)
    ap.add_argument("--return-episodes", type=int, default=50, help="evaluation episodes per policy for its return")
    ap.add_argument("--out", default="runs/experiments/explain_table", help="where the training runs go")
    ap.add_argument("--policy", action="append", default=[], metavar="NAME=DIR",
                    help="a policy directory to explain instead of training ({seed} is replaced by the seed; "
                         "repeat for each policy; observations come from the one named teacher, else the first)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. explain.max_observations=128)")
    args = ap.parse_args()
    base = [f"env={args.env}", "logger.progress=false", *args.overrides]
    cfg = compose_config(base)
    torch.set_num_threads(1)
    ec = cfg.explain
    settings = OmegaConf.to_object(ec)
    attack = None if ec.attack is None else suite_attack(ec.attack, cfg.attack)

    scores: dict[str, dict[str, list]] = {}  # scores[group][policy] = one Scores per seed
    names = list(given(args.policy, 0)) if args.policy else list(POLICIES)
    returns: dict[str, list[float]] = {p: [] for p in names}
    for seed in args.seeds:
        dirs = (given(args.policy, seed) if args.policy
                else train(Path(args.out) / args.env / f"s{seed}", base, seed, args.teacher_steps))
        with make_vec_env(cfg.env) as venv:
            teams = {p: load_team(d, venv.groups)[0] for p, d in dirs.items()}
            layouts = feature_layouts(venv.groups, OmegaConf.to_container(cfg.env.features), venv.feature_names)
            source = teams.get("teacher", next(iter(teams.values())))
            raw, _ = collect_round(venv, source, cfg.eval.seed, True, episodes=ec.episodes)
            for p, team in teams.items():
                recs = run_episodes(venv, team, args.return_episodes, cfg.eval.seed)
                returns[p].append(float(np.mean([r.team_return for r in recs])))
        raw = {g: x[np.unique(np.linspace(0, len(x) - 1, min(len(x), ec.max_observations)).round().astype(int))]
               for g, x in raw.items()}
        budgets = {eps: group_budgets(eps, layouts, cfg.attack.exclude, "cpu", cfg.attack.scale) for eps in cfg.attack.eps}
        for p, team in teams.items():
            for g, layout in layouts.items():
                x = team.normalizers[g].normalize(raw[g])
                s, _ = score_methods(team[g], x, layout, list(ec.methods), settings, ec.target, attack,
                                     {eps: b[g] for eps, b in budgets.items()}, seed)
                scores.setdefault(g, {}).setdefault(p, []).append(s)
        print(f"seed {seed}: returns " + ", ".join(f"{p} {r[-1]:.2f}" for p, r in returns.items()), flush=True)

    strata = {g: np.concatenate([np.full(len(s[FLOOR]["deletion_auc"]), i)
                                 for i, s in enumerate(scores[g][names[0]])]) for g in scores}

    def paired(g: str, a: str, b: str, method: str, floor: bool) -> dict:
        """Per-observation deletion AUC of policy a minus policy b (same observations, pooled over seeds); with
        ``floor``, of each AUC's gap below its own random-order floor instead (``floor - AUC``, higher is more
        faithful), which discounts how confident each policy is in its chosen actions; ``per_seed``: each seed's
        mean difference, whose spread the observation-level CI does not cover."""
        def value(s: dict) -> np.ndarray:
            return s[FLOOR]["deletion_auc"] - s[method]["deletion_auc"] if floor else s[method]["deletion_auc"]

        diffs = [value(sa) - value(sb) for sa, sb in zip(scores[g][a], scores[g][b])]
        return {**summary(np.concatenate(diffs), ec.n_boot, 0, strata[g]),
                "per_seed": [round(float(d.mean()), 4) for d in diffs]}

    table = {g: {p: summarise(runs, ec.n_boot, 0, ec.randomisation_tolerance) for p, runs in by_policy.items()}
             for g, by_policy in scores.items()}
    middle = sorted(cfg.attack.eps)[len(cfg.attack.eps) // 2]
    gradient_based = [m for m in GRADIENT_BASED if m in ec.methods]
    compared = "digr" in names and "plain" in names
    claims = {g: {f"deletion_{kind}_digr_minus_plain": {m: paired(g, "digr", "plain", m, kind == "gap")
                                                         for m in gradient_based} for kind in ("auc", "gap")}
              if compared else {} for g in scores}
    for g in scores:
        claims[g]["randomisation_verdicts"] = {m: {p: table[g][p][m]["randomisation_verdict"] for p in names}
                                               for m in gradient_based if "randomisation_verdict" in table[g][names[0]][m]}
    results = {"env": args.env, "seeds": args.seeds, "policies": {p: args.policy[i].partition("=")[2] for i, p in
                                                                  enumerate(names)} if args.policy else None,
               "teacher_steps": None if args.policy else args.teacher_steps, "overrides": args.overrides,
               "returns": returns, "observations": {g: int(len(strata[g])) for g in scores},
               "explain": OmegaConf.to_container(ec), "attack_eps": list(cfg.attack.eps), "table": table,
               "claims": claims}
    lines = [f"# Explanation table: {args.env}", "",
             f"Seeds {args.seeds}, " + (", ".join(f"{p} {d}" for p, d in results["policies"].items())
                                         if args.policy else f"teacher {args.teacher_steps} agent-steps")
             + "; mean team return over seeds "
             f"({args.return_episodes} episodes each): " + ", ".join(f"{p} {np.mean(r):.2f}" for p, r in returns.items()),
             ""]
    for g in scores:
        lines += [f"## {g} ({results['observations'][g]} observations over the seeds)", "",
                  markdown_table(table[g], middle), ""]
        if compared:
            lines += ["DIGR minus plain, paired over the same observations: deletion AUC (< 0: DIGR more faithful; "
                      "per seed in brackets) | its gap below the random-order floor (> 0: DIGR more faithful)", ""]
            lines += [f"- {m}: {c['mean']:.4f} [{c['mean_ci'][0]:.4f}, {c['mean_ci'][1]:.4f}] ({c['per_seed']}) | "
                      f"{d['mean']:.4f} [{d['mean_ci'][0]:.4f}, {d['mean_ci'][1]:.4f}]"
                      for (m, c), d in zip(claims[g]["deletion_auc_digr_minus_plain"].items(),
                                           claims[g]["deletion_gap_digr_minus_plain"].values())]
            lines.append("")
        lines += [f"Randomisation check, every layer re-initialised ({ec.randomisation_draws} re-initialisations per "
                  f"policy and seed; passes: CI within +-{ec.randomisation_tolerance}): |map| | signed map | "
                  "trained |map| vs |x|", ""]
        lines += [f"- {p} {m}: {_ci(s['randomisation'][last])} {s['randomisation_verdict']} | "
                  f"{_ci(s['randomisation_signed'][last])} "
                  f"{randomisation_verdict(s['randomisation_signed'][last], ec.randomisation_tolerance)} | "
                  f"{_ci(s['input_correlation'])}"
                  for p in names for m, s in table[g][p].items() if "randomisation" in s
                  for last in [list(s["randomisation"])[-1]]]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"explain_table_{args.env}.json"
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(text)
    print(f"written: {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
