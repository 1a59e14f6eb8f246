"""Retention and explainability of distilled students: plain distillation (lambda = 0) vs DIGR, same size.

For a saved teacher, distils students for every seed and variant with the `distill` stage's own code, then
on held-out data (episode seeds 10000+, never used for training):

- retention = (R_student - R_random) / (R_teacher - R_random), team-return means over the same 100
  evaluation episodes for all three (greedy actions), students averaged over seeds; the 95% CI is a paired
  bootstrap over the episode seeds (every policy played the same ones); per-seed values are listed too;
- saliency agreement: each student's gradient saliency vs the teacher's perturbation saliency on
  observations from greedy teacher episodes (Spearman rank correlation and top-k overlap per observation,
  Gini sparsity), averaged over observations, with a bootstrap CI over observations and seeds.

    python experiments/distill_quality.py runs/teachers/simple_speaker_listener_v4 --seeds 0 1 2 \
        --variants plain=distill=plain digr=distill=digr

Every variant is a name and Hydra overrides (comma-free, separated by '+'), e.g. ``digr1=distill.lambda_igr=1``.
Writes ``experiments/results/distill_quality_<env>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from madistill.cli import compose_config  # noqa: E402
from madistill.common.collect import collect_round  # noqa: E402
from madistill.envs.features import feature_layouts  # noqa: E402
from madistill.evaluate.evaluator import run_episodes, uniform_team  # noqa: E402
from madistill.evaluate.stats import bootstrap_ci  # noqa: E402
from madistill.explain.metrics import gini, spearman, topk_overlap  # noqa: E402
from madistill.explain.saliency import SaliencyLabeller, gradient_saliency  # noqa: E402
from madistill.policies.store import load_team, read_manifest  # noqa: E402
from madistill.runtime import make_vec_env  # noqa: E402
from madistill.stages.distill import distill_students  # noqa: E402
from madistill.stages.policies import teacher_dir  # noqa: E402
from madistill.tb import TBLogger  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", help="teacher run directory (with policies/teacher)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["plain=distill=plain", "digr=distill=digr"])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--saliency-episodes", type=int, default=20)
    ap.add_argument("--out", default="runs/experiments/distill_quality", help="where student runs go")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. distill.rounds=6)")
    args = ap.parse_args()

    tdir = teacher_dir(args.teacher)
    env_name = read_manifest(tdir)["env"]["name"]
    base = [f"env={env_name}", "logger.progress=false", *args.overrides]
    variants = {v.split("=", 1)[0]: [o for o in v.split("=", 1)[1].split("+") if o] for v in args.variants}
    cfg = compose_config(base)
    torch.set_num_threads(1)
    eval_seed, k = cfg.eval.seed, cfg.saliency.topk

    with make_vec_env(cfg.env) as venv:
        teacher, _ = load_team(tdir, venv.groups)
        layouts = feature_layouts(venv.groups, OmegaConf.to_container(cfg.env.features), venv.feature_names)
        teacher_recs = run_episodes(venv, teacher, args.episodes, eval_seed)
        random_recs = run_episodes(venv, uniform_team(venv), args.episodes, eval_seed, deterministic=False)
        raw, _ = collect_round(venv, teacher, eval_seed, True, episodes=args.saliency_episodes)
    labeller = SaliencyLabeller(layouts, cfg.saliency.baseline, cfg.saliency.baseline_samples)
    x = {g: teacher.normalizers[g].normalize(o) for g, o in raw.items()}
    ref_sal = {g: labeller(teacher[g], g, x[g]) for g in x}
    t_ret = np.array([r.team_return for r in teacher_recs])
    r_ret = np.array([r.team_return for r in random_recs])
    print(f"{env_name}: teacher {t_ret.mean():.2f}, random {r_ret.mean():.2f} over {args.episodes} episodes", flush=True)

    results: dict = {"env": env_name, "teacher": str(tdir), "seeds": args.seeds, "episodes": args.episodes,
                     "teacher_return": float(t_ret.mean()), "random_return": float(r_ret.mean()),
                     "saliency_observations": {g: len(v) for g, v in x.items()}, "variants": {}}
    for name, overrides in variants.items():
        returns, sal_rows = [], {g: {"spearman": [], "topk": [], "gini": []} for g in x}
        for seed in args.seeds:
            run = Path(args.out) / env_name / f"{name}_s{seed}"
            cfg = compose_config([*base, *overrides, f"seed={seed}"])
            distill_students(cfg, run, tdir, TBLogger(run / "tb", enabled=False))
            with make_vec_env(cfg.env) as venv:
                student, _ = load_team(run / "policies" / "student", venv.groups)
                recs = run_episodes(venv, student, args.episodes, eval_seed)
            returns.append(np.array([r.team_return for r in recs]))
            for g in x:
                sal = gradient_saliency(student[g], x[g], None, cfg.saliency.target, layouts[g])
                if len(layouts[g]) > 1:
                    sal_rows[g]["spearman"].append(spearman(sal, ref_sal[g]))
                    sal_rows[g]["topk"].append(topk_overlap(sal, ref_sal[g], k))
                    sal_rows[g]["gini"].append(gini(sal))
            ret = (returns[-1].mean() - r_ret.mean()) / (t_ret.mean() - r_ret.mean())
            print(f"  {name} seed {seed}: student {returns[-1].mean():.2f}, retention {ret:.4f}", flush=True)

        def retention(i: np.ndarray | None = None, returns: list[np.ndarray] = returns) -> float:
            # All policies played the same episode seeds, so one resample of episode indices serves all
            # (a paired bootstrap).
            i = np.arange(args.episodes) if i is None else i.astype(int)
            s = np.mean([r[i].mean() for r in returns])
            return float((s - r_ret[i].mean()) / (t_ret[i].mean() - r_ret[i].mean()))

        entry = {
            "overrides": overrides,
            "student_return": [float(r.mean()) for r in returns],
            "retention": retention(),
            "retention_per_seed": [float((r.mean() - r_ret.mean()) / (t_ret.mean() - r_ret.mean())) for r in returns],
            "retention_ci": bootstrap_ci(np.arange(args.episodes), retention),
            "saliency": {},
        }
        for g, rows in sal_rows.items():
            if not rows["spearman"]:
                continue
            entry["saliency"][g] = {}
            for metric, per_seed in rows.items():
                pooled = np.concatenate(per_seed)
                pooled = pooled[np.isfinite(pooled)]
                entry["saliency"][g][metric] = {
                    "mean": float(pooled.mean()),
                    "ci": bootstrap_ci(pooled, np.mean),
                    "per_seed": [float(np.nanmean(v)) for v in per_seed],
                }
        results["variants"][name] = entry
        lo, hi = entry["retention_ci"]
        print(f"{name}: retention {entry['retention']:.4f} [{lo:.4f}, {hi:.4f}]", flush=True)

    print_table(results)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"distill_quality_{env_name}.json"
    out.write_text(json.dumps(results, indent=2))
    figure(results).savefig(out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    print(f"written: {out} and {out.with_suffix('.png')}")


def print_table(results: dict) -> None:
    groups = sorted({g for v in results["variants"].values() for g in v["saliency"]})
    head = "| variant | retention [95% CI] | " + " | ".join(f"{g} Spearman | {g} top-k | {g} Gini" for g in groups) + " |"
    print("\n" + head + "\n|" + "---|" * (2 + 3 * len(groups)))
    for name, v in results["variants"].items():
        cells = [f"{v['retention']:.3f} [{v['retention_ci'][0]:.3f}, {v['retention_ci'][1]:.3f}]"]
        for g in groups:
            for m in ("spearman", "topk", "gini"):
                s = v["saliency"].get(g, {}).get(m)
                cells.append(f"{s['mean']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]" if s else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


def figure(results: dict) -> plt.Figure:
    names = list(results["variants"])
    groups = sorted({g for v in results["variants"].values() for g in v["saliency"]})
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(3.2 * (1 + len(groups)), 3.2), squeeze=False)
    ax = axes[0][0]
    ret = np.array([results["variants"][n]["retention"] for n in names])
    ci = np.array([results["variants"][n]["retention_ci"] for n in names])
    ax.bar(names, ret, yerr=np.abs(ci.T - ret), capsize=4, color="tab:blue")
    ax.axhline(0.98, color="k", ls="--", lw=1)
    ax.set_ylim(min(0.9, ret.min() - 0.02), max(1.02, ci.max() + 0.01))
    ax.set_title("retention of the teacher's gain")
    for ax, g in zip(axes[0][1:], groups):
        vals = [results["variants"][n]["saliency"][g]["spearman"] for n in names]
        m = np.array([v["mean"] for v in vals])
        c = np.array([v["ci"] for v in vals])
        ax.bar(names, m, yerr=np.abs(c.T - m), capsize=4, color="tab:green")
        ax.set_title(f"{g}: Spearman vs teacher saliency")
    fig.suptitle(results["env"])
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
