"""How much of an attack's damage no policy can avoid: a consistent translation of the perceived world.

Every agent sees the named 2-D position features (e.g. spread's landmarks, relative to the agent) shifted by
the same raw vector c, chosen inside the l_inf budget (|c_x| <= eps * the smallest std among the x features,
likewise y) and held for the whole episode. The agents then see a world that could be real (landmarks at
l + c; the landmarks are drawn at random, so nothing in the observations tells the two apart), and a policy
that keeps its clean behaviour covers l + c instead of l. The return lost to this attack is therefore a
floor under the worst-case loss of any policy with the teacher's clean behaviour, and

    recovery <= 1 - (loss under translation) / (teacher's worst-case loss over the suite)

bounds what robust distillation can achieve at that eps. Worst case over the four diagonal directions;
100 episodes with the attack stage's seeds (those of ``experiments/robustness.py``); greedy actions.

    python experiments/translation_bound.py runs/teachers/simple_spread_v3 --features landmark_0 landmark_1 landmark_2 \\
        --students runs/experiments/robustness/simple_spread_v3/robust_s{0,1,2}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from madistill.cli import compose_config
from madistill.envs.factory import EnvSpec
from madistill.evaluate.evaluator import run_episodes
from madistill.evaluate.stats import bootstrap_ci
from madistill.explain.saliency import feature_layouts
from madistill.policies.base import TeamPolicy
from madistill.policies.store import load_team, read_manifest
from madistill.runtime import make_vec_env
from madistill.stages import teacher_dir
from madistill.transforms import GroupTensors, ObsTransform, StepContext

RESULTS = Path(__file__).parent / "results"


class Translation(ObsTransform):
    """Adds a fixed normalised offset to every agent's observation (all groups share the layout here)."""

    def __init__(self, offsets: dict[str, torch.Tensor]):
        self.offsets = offsets

    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors:
        return {g: x + self.offsets[g] if g in self.offsets else x for g, x in obs.items()}


def offsets_for(team: TeamPolicy, dims: dict[str, tuple[list[int], list[int]]], eps: float, sign: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Normalised offsets that shift every named position by the same raw vector, the largest in the budget."""
    out = {}
    for g, (xs, ys) in dims.items():
        std = torch.as_tensor(team.normalizers[g].std, dtype=torch.float32)
        off = torch.zeros_like(std)
        for axis, s in zip((xs, ys), sign, strict=True):
            raw = s * eps * float(std[axis].min())  # the same raw shift on every feature of this axis
            off[axis] = raw / std[axis]
        out[g] = off.to(team.device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", type=Path)
    ap.add_argument("--features", nargs="+", required=True, help="2-D position feature groups of env.features")
    ap.add_argument("--students", nargs="*", type=Path, default=[], help="run or policy dirs evaluated the same way")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--episodes", type=int, default=100)
    args = ap.parse_args()

    tdir = teacher_dir(args.teacher)
    manifest = read_manifest(tdir)
    env = manifest["env"]["name"]
    cfg = compose_config([f"env={env}", "logger.progress=false"])
    torch.set_num_threads(1)
    worst_suite = json.loads((RESULTS / f"robustness_{env}.json").read_text())["summary"]["teacher"]["worst"]["all"]
    results: dict = {"teacher": str(args.teacher), "features": args.features, "episodes": args.episodes, "policies": {}}
    with make_vec_env(cfg.env, EnvSpec.from_dict(manifest["env"])) as venv:
        layouts = feature_layouts(venv.groups, cfg.env.features, venv.feature_names)
        policies = {"teacher": load_team(tdir, venv.groups)[0]}
        policies.update({p.name: load_team(p, venv.groups)[0] for p in args.students})
        for name, team in policies.items():
            dims = {}
            for g, lay in layouts.items():
                idx = [lay.indices[lay.names.index(f)] for f in args.features]
                dims[g] = ([i[0] for i in idx], [i[1] for i in idx])
            clean = np.array([r.team_return for r in run_episodes(venv, team, args.episodes, cfg.attack.seed)])
            row = {"clean": float(clean.mean()), "translated": {}}
            for eps in args.eps:
                per_sign = {}
                for sign in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                    recs = run_episodes(venv, team, args.episodes, cfg.attack.seed,
                                        transforms=[Translation(offsets_for(team, dims, eps, sign))])
                    per_sign[sign] = np.array([r.team_return for r in recs])
                sign, ret = min(per_sign.items(), key=lambda kv: kv[1].mean())
                loss = clean - ret  # paired: same episode seeds
                row["translated"][str(eps)] = {"return": float(ret.mean()), "direction": list(sign),
                                               "loss": float(loss.mean()), "loss_ci": bootstrap_ci(loss, np.mean)}
            results["policies"][name] = row

    t = results["policies"]["teacher"]
    print(f"{env}: consistent translation of {', '.join(args.features)} (worst of 4 diagonals, {args.episodes} episodes)")
    for eps in args.eps:
        e = str(eps)
        suite_loss = t["clean"] - worst_suite[e]["mean"] if e in worst_suite else None
        tr = t["translated"][e]
        line = f"  eps {eps:g}: teacher loses {tr['loss']:.2f} [{tr['loss_ci'][0]:.2f}, {tr['loss_ci'][1]:.2f}]"
        if suite_loss:
            bound = 1 - tr["loss"] / suite_loss
            results.setdefault("recovery_bound", {})[e] = bound
            line += f" of the {suite_loss:.2f} the suite takes: recovery at most {100 * bound:.0f}%"
        print(line)
        for name, row in results["policies"].items():
            if name != "teacher":
                r = row["translated"][e]
                print(f"    {name}: clean {row['clean']:.2f}, translated {r['return']:.2f} (loss {r['loss']:.2f})")
    out = RESULTS / f"translation_bound_{env}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
