"""Is the lookahead's damage repairable by a few neurons? Full, masked and random-mask fine-tuning of a teacher's
group on the data robust distillation against the lookahead trains on (issue 22).

``madistill repair`` fits the failures of a PGD flip, and no variant of it raises the worst case under the suite's
lookahead (docs/repair.md). Robust distillation does, when its DAgger rounds run under the lookahead and its
adversarial term forces the lookahead's targets (docs/results.md, "Collecting under the lookahead"). This script
fine-tunes the teacher itself on that data instead of a student:

- ``--episodes`` episodes of the teacher under the lookahead (every step, its targets recorded per observation,
  the ``distill.adv_collect_targets`` data) and as many clean ones, at ``--eps``;
- the robust-distillation loss of ``distill=robust`` (KL to the original's clean head, on clean and adversarial
  points, plus smoothness), the adversarial point per sample the worse of PGD on the KL and the recorded target
  forced on the policy being tuned;
- five variants from the same seed, steps and rate: ``full`` (every acting parameter), ``masked`` (the repair's
  neurons: ``repair.neurons`` of them by activation x gradient on the lookahead's reached targets, at most
  ``repair.max_parameters``), ``random`` (as many random neurons per layer), ``fisher`` (``repair.mask=fisher``:
  the ``repair.max_parameters`` share of the acting parameters with the largest squared gradients of this loss
  at the original, over ``repair.fisher_batches`` minibatches) and ``random_fisher`` (as many random acting
  parameters), each fine-tuned by the repair's loop (:func:`madistill.repair.masked.masked_finetune` on the
  lookahead's :class:`~madistill.repair.objectives.ForcedTargets`, Adam, no separate anchor term), so the
  masked-out parameters stay bit-identical;
- each evaluated clean and under the lookahead on ``<group>_0`` at ``--eps`` (``--eval-episodes`` episodes, the
  suite's seeds), with paired bootstrap CIs over episodes (resampled within each teacher), and the share of the
  original's clean gain over the uniform random team each keeps.

    python experiments/repair_lookahead.py runs/zoo/sl/s0 runs/zoo/sl/s1 runs/zoo/sl/s2 --group listener --eps 0.3

Writes ``experiments/results/repair_lookahead_<env><--name>.{json,md}``; ``--summarise <that .json>`` rewrites
its summary and markdown from the saved per-episode returns.
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
from madistill.attacks.collection import collection_transforms
from madistill.attacks.methods import force_targets
from madistill.attacks.robustness import evaluate_robustness
from madistill.branching import Branching
from madistill.cli import compose_config
from madistill.common.collect import collect_labelled
from madistill.common.divergences import divergence
from madistill.common.episodes import team_returns
from madistill.common.io import atomic_write_text
from madistill.distill.loss import DistillLoss
from madistill.envs.features import feature_layouts
from madistill.evaluate.evaluator import run_episodes, uniform_team
from madistill.evaluate.stats import bootstrap_ci
from madistill.policies.base import greedy_actions
from madistill.policies.store import find_policy_dir, load_team, read_manifest
from madistill.repair.masked import (
    FinetuneSettings,
    changed_count,
    fisher_mask,
    mask_size,
    masked_finetune,
    neuron_mask,
    parameter_delta,
    random_entries,
)
from madistill.repair.neurons import neuron_scores, random_like, repair_path
from madistill.repair.objectives import ForcedTargets, targeted_data
from madistill.repair.plan import acting_mask, choose_neurons, term_batches
from madistill.runtime import env_spec, make_vec_env
from madistill.stages.policies import configured_features, teacher_dir
from madistill.stages.repair import _with_policy

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("full", "masked", "random", "fisher", "random_fisher")
PAIRS = (("masked", "random"), ("fisher", "random_fisher"))  # each mask and its random baseline of the same size
BATCH = 256  # minibatch of the fine-tune and of the Fisher score


def one_teacher(path: Path, group: str, eps: float, args: argparse.Namespace, seed: int) -> dict:
    tdir = teacher_dir(path)
    env = read_manifest(tdir)["env"]["name"]
    victim = f"{group}_0"
    cfg = compose_config([f"env={env}", "attack.methods=[targeted_lookahead]", f"attack.victims=[{victim}]",
                          f"attack.episodes={args.eval_episodes}", f"attack.eps=[{eps}]", "attack.checks=false",
                          f"seed={seed}"])
    torch.manual_seed(seed)
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv:
        team, _ = load_team(find_policy_dir(tdir), venv.groups)
        layouts = feature_layouts(venv.groups, configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        unit = group_budgets(1.0, layouts, cfg.attack.exclude, team.device, cfg.attack.scale)
        lookahead = collection_transforms(venv.groups, unit, "targeted_lookahead", cfg.distill.adv_steps, 1.0, eps,
                                          cfg.attack, Branching(spec, venv.groups, venv.backend))
        attacked, targets, _ = collect_labelled(venv, team, 1 + 10 * seed, True, lambda: lookahead[0].targets,
                                                episodes=args.episodes, transforms=lookahead)
        clean_raw, _, _ = collect_labelled(venv, team, 2 + 10 * seed, True, None, episodes=args.episodes)
        policy, norm = team[group], team.normalizers[group]
        x = torch.cat([norm.normalize(attacked[group]), norm.normalize(clean_raw[group])])
        target = torch.cat([targets[group], torch.full((len(clean_raw[group]),), -1, dtype=torch.long)])
        budget = unit[group].scaled(eps)
        rows = (target >= 0).nonzero().flatten()
        forced = force_targets(policy, x[rows], target[rows], budget, cfg.distill.adv_steps,
                               torch.Generator().manual_seed(seed))
        reached = greedy_actions(policy, forced) == target[rows]
        layers = repair_path(policy).hidden
        rc = cfg.repair
        scores = neuron_scores("grad", policy, layers, forced[reached], greedy_actions(policy, x[rows][reached]), x,
                               rc.ig_steps, rc.probe_l1, rc.probe_steps, seed)
        chosen = choose_neurons(layers, scores, rc.neurons, int(rc.max_parameters * policy.acting_parameters))
        masks = {"full": acting_mask(policy), "masked": neuron_mask(layers, chosen),
                 "random": neuron_mask(layers, random_like(layers, chosen, 1, seed + 1)[0])}
        n = len(x)
        # distill=robust's terms (no DIGR penalty: the original's saliency is not what is repaired)
        loss = DistillLoss(adv_weight=1.0, smooth_weight=0.5, adv_steps=cfg.distill.adv_steps)
        term = ForcedTargets(targeted_data(policy, x, target), loss, layouts[group], budget)
        masks["fisher"] = fisher_mask(policy, masks["full"], term_batches(term, policy, BATCH, rc.fisher_batches, seed),
                                      int(rc.max_parameters * policy.acting_parameters))
        masks["random_fisher"] = random_entries(masks["full"], mask_size(masks["fisher"]), seed + 1)
        ac = OmegaConf.merge(cfg.attack, {"checks": False})
        random_return = team_returns(run_episodes(venv, uniform_team(venv, team.device), ac.episodes, ac.seed, False))
        out = {"teacher": str(path), "env": env, "group": group, "eps": eps, "collected": n,
               "targets": len(rows), "reached": int(reached.sum()), "neurons": len(chosen), "random_team": random_return, "variants": {}}
        teams = {"original": (team, policy)}
        # the repair's fine-tune (madistill.repair.masked), Adam without an anchor term: the loss's KL to the
        # original's clean head on the clean states is the anchor
        settings = FinetuneSettings(args.steps, BATCH, args.lr, weight_decay=0.0, anchor=0.0, divergence="kl")
        for name, mask in masks.items():
            tuned = masked_finetune(policy, mask, term, x, settings, seed)
            out["variants"].setdefault(name, {})["layers"] = {k: int(m.sum()) for k, m in mask.items() if m.any()}
            teams[name] = (_with_policy(team, group, tuned), tuned)
        for name, (t, p) in teams.items():
            res = evaluate_robustness(venv, t, layouts, ac, float("nan"), ac.seed)
            changed = changed_count(parameter_delta(policy, p))
            with torch.no_grad():
                div = float(divergence("kl", term.data.teacher_head, p(x), discrete=True).mean())
            out["variants"].setdefault(name, {}).update({
                "changed": changed, "share": changed / policy.acting_parameters, "clean_divergence": div,
                "clean": res.clean, "worst": float(np.mean(res.episodes[victim]["targeted_lookahead"][eps])),
                "clean_episodes": res.clean_episodes.tolist(),
                "worst_episodes": list(map(float, res.episodes[victim]["targeted_lookahead"][eps]))})
            print(f"  {path} {name}: changed {changed}, clean {res.clean:.2f}, worst {out['variants'][name]['worst']:.2f}",
                  flush=True)
    return out


def summary(runs: list[dict]) -> dict:
    """Per variant: clean and worst means, recovery (worst minus the original's), with paired CIs over episodes
    resampled within each teacher; the masked recovery as a share of full's."""
    strata = np.concatenate([np.full(len(r["variants"]["original"]["worst_episodes"]), i) for i, r in enumerate(runs)])

    def col(v: str, key: str) -> np.ndarray:
        return np.concatenate([r["variants"][v][key] for r in runs])

    def ci(d: np.ndarray) -> list[float]:
        return [float(d.mean()), *map(float, bootstrap_ci(d, np.mean, n_boot=2000, seed=0, strata=strata))]

    random_return = float(np.mean([r["random_team"] for r in runs]))
    index = np.arange(len(strata))

    def ratio_ci(num: np.ndarray, den: np.ndarray) -> list[float]:
        """mean(num) / mean(den) over the paired episodes, with its bootstrap CI."""
        def ratio(i: np.ndarray) -> float:  # the bootstrap resamples episode indices (as floats)
            i = i.astype(int)
            return float(num[i].mean() / den[i].mean())

        return [ratio(index), *map(float, bootstrap_ci(index, ratio, n_boot=2000, seed=0, strata=strata))]

    def gain(v: str) -> np.ndarray:
        return col(v, "clean_episodes") - random_return

    def recovery(v: str) -> np.ndarray:
        return col(v, "worst_episodes") - col("original", "worst_episodes")

    out = {"random_team": random_return}
    for v in ("original", *VARIANTS):
        out[v] = {"clean": float(col(v, "clean_episodes").mean()), "worst": float(col(v, "worst_episodes").mean()),
                  "recovery": ci(recovery(v)), "share": float(np.mean([r["variants"][v]["share"] for r in runs])),
                  "clean_gain_kept": ratio_ci(gain(v), gain("original"))}
    for mask, baseline in PAIRS:
        out[mask]["minus_random"] = ci(col(mask, "worst_episodes") - col(baseline, "worst_episodes"))
        out[mask]["share_of_full"] = ratio_ci(recovery(mask), recovery("full")) if recovery("full").mean() > 0 else None
    return out


def write_results(runs: list[dict], command: str, name: str) -> str:
    """Summarise ``runs`` into ``experiments/results/repair_lookahead_<env><name>.{json,md}``; the markdown."""
    s = summary(runs)
    env, group, eps = runs[0]["env"], runs[0]["group"], runs[0]["eps"]
    episodes = len(runs[0]["variants"]["original"]["worst_episodes"])
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"repair_lookahead_{env}{name}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"command": command, "summary": s, "runs": runs}))
    lines = [f"# Fine-tuning {group} of {env} on the lookahead's data: full, neuron and Fisher masks, random masks", "",
             f"`{command}`", "",
             f"Lookahead on {group}_0 at eps {eps}, {episodes} episodes per teacher; recovery = worst minus the "
             "original's worst; means [95% paired bootstrap CIs, episodes resampled within each teacher].", "",
             "| variant | parameters changed (share) | clean | clean gain kept over random | worst under the lookahead "
             "| recovery |", "|---|---|---|---|---|---|"]
    for v in ("original", *VARIANTS):
        r = s[v]
        k = r["clean_gain_kept"]
        lines.append(f"| {v} | {100 * r['share']:.2f}% | {r['clean']:.2f} | {k[0]:.3f} [{k[1]:.3f}, {k[2]:.3f}] | "
                     f"{r['worst']:.2f} | {r['recovery'][0]:+.2f} [{r['recovery'][1]:+.2f}, {r['recovery'][2]:+.2f}] |")
    lines.append("")
    for mask, baseline in PAIRS:
        m, share = s[mask]["minus_random"], s[mask]["share_of_full"]
        of_full = "n/a (full does not recover)" if share is None else f"{share[0]:.2f} [{share[1]:.2f}, {share[2]:.2f}]"
        lines.append(f"- {mask} minus {baseline}, worst case: {m[0]:+.2f} [{m[1]:+.2f}, {m[2]:+.2f}]; {mask}'s recovery "
                     f"as a share of full's: {of_full}.")
    lines.append(f"- uniform random team: {s['random_team']:.2f}.")
    text = "\n".join(lines) + "\n"
    atomic_write_text(stem.with_suffix(".md"), text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teachers", type=Path, nargs="*", help="teacher runs (teacher i uses seed i)")
    ap.add_argument("--group")
    ap.add_argument("--eps", type=float)
    ap.add_argument("--episodes", type=int, default=100, help="episodes under the lookahead, and as many clean")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--name", default="", help="suffix of the results files")
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--summarise", type=Path, help="a results .json of this script: rewrite its summary and markdown")
    args = ap.parse_args()
    if args.summarise is not None:
        saved = json.loads(args.summarise.read_text())
        name = args.summarise.stem.removeprefix(f"repair_lookahead_{saved['runs'][0]['env']}")
        print(write_results(saved["runs"], saved["command"], name))
        return
    if not args.teachers or args.group is None or args.eps is None:
        ap.error("give teacher runs, --group and --eps (or --summarise <results.json>)")
    runs = [one_teacher(t, args.group, args.eps, args, i) for i, t in enumerate(args.teachers)]
    print(write_results(runs, f"python {' '.join(sys.argv)}", args.name))


if __name__ == "__main__":
    main()
