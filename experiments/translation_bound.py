"""How much of an attack's damage no policy can avoid: constant offsets of the perceived positions.

Every agent sees the named 2-D position features (e.g. spread's landmarks, relative to the agent) shifted by
a constant offset inside the l_inf budget, held for the whole episode. Each view is then a world that could
be real (landmarks at l + c; landmarks are drawn at random, so nothing in the observations tells the two
apart), and a policy that keeps its clean behaviour acts as in that world: it covers l + c instead of l.
The return lost to such offsets is therefore a floor under the worst-case loss of any policy that behaves
like the teacher on clean inputs, and

    recovery <= 1 - (loss under offsets) / (teacher's worst-case loss over the suite)

bounds what robust distillation can achieve at that eps. Two offset families: ``translation``, the same raw
shift for every named feature (|c_x| <= eps * the smallest std among the x features, likewise y; worst of
the four diagonals), and ``offsets``, per episode the worst of those and of the suite's ``offsets`` attack
(``attacks.robustness.worst_offsets``: ``--corners`` random corners of the budget per agent, here on the named
features only; the attacker may simulate each episode, as a worst case over a fixed set of perturbations).
100 episodes with the attack stage's seeds (those of ``experiments/robustness.py``); greedy actions. The bound is heuristic: a robust policy need not act like the teacher in every plausible world.

    python experiments/translation_bound.py runs/zoo/spread/teacher/s0 --features landmark_0 landmark_1 landmark_2 \\
        other_0 other_1 --eps 0.2 --corners 1000 --students runs/zoo/spread/robust/s0

The teacher's worst case over the suite comes from ``experiments/results/robustness_<env>.json``
(``experiments/robustness.py`` on the same teacher); students are named by the path given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from madistill.attacks.budget import group_budgets
from madistill.attacks.robustness import worst_offsets
from madistill.cli import compose_config
from madistill.envs.factory import EnvSpec
from madistill.envs.features import feature_layouts
from madistill.evaluate.evaluator import run_episodes
from madistill.evaluate.stats import bootstrap_ci
from madistill.policies.base import TeamPolicy
from madistill.policies.store import load_team, read_manifest
from madistill.runtime import make_vec_env
from madistill.stages.policies import teacher_dir
from madistill.transforms import GroupTensors, ObsTransform, StepContext

RESULTS = Path(__file__).parent / "results"


class Translation(ObsTransform):
    """Adds a fixed normalised offset to every agent's observation (all groups share the layout here)."""

    def __init__(self, offsets: dict[str, torch.Tensor]):
        self.offsets = offsets

    def __call__(self, obs: GroupTensors, ctx: StepContext) -> GroupTensors:
        return {g: x + self.offsets[g] if g in self.offsets else x for g, x in obs.items()}


def translation(team: TeamPolicy, dims: dict[str, tuple[list[int], list[int]]], eps: float, sign: tuple[int, int]) -> dict[str, torch.Tensor]:
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


def returns_under(venv, team: TeamPolicy, offsets: dict[str, torch.Tensor] | None, episodes: int, seed: int) -> np.ndarray:
    transforms = [] if offsets is None else [Translation(offsets)]
    return team_returns(run_episodes(venv, team, episodes, seed, transforms=transforms))


def team_returns(records: list) -> np.ndarray:
    return np.array([r.team_return for r in records])


def position_budgets(layouts: dict, features: list[str], eps: float, device: torch.device) -> dict:
    """Budgets of radius eps on the named features only (other features, and groups without them, fixed)."""
    exclude = {g: [n for n in lay.names if n not in features] for g, lay in layouts.items()}
    return group_budgets(eps, layouts, exclude, device)


def loss_row(clean: np.ndarray, attacked: np.ndarray) -> dict:
    loss = clean - attacked  # paired: same episode seeds
    return {"return": float(attacked.mean()), "loss": float(loss.mean()), "loss_ci": bootstrap_ci(loss, np.mean)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", type=Path)
    ap.add_argument("--features", nargs="+", required=True, help="2-D position feature groups of env.features")
    ap.add_argument("--students", nargs="*", type=Path, default=[], help="run or policy dirs evaluated the same way")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--corners", type=int, default=20, help="random budget corners tried per episode (attack.offset_candidates)")
    args = ap.parse_args()

    tdir = teacher_dir(args.teacher)
    manifest = read_manifest(tdir)
    env = manifest["env"]["name"]
    cfg = compose_config([f"env={env}", "logger.progress=false"])
    torch.set_num_threads(1)
    seed = cfg.attack.seed
    worst_suite = json.loads((RESULTS / f"robustness_{env}.json").read_text())["summary"]["teacher"]["worst"]["all"]
    results: dict = {"teacher": str(args.teacher), "features": args.features, "episodes": args.episodes,
                     "corners": args.corners, "policies": {}}
    with make_vec_env(cfg.env, EnvSpec.from_dict(manifest["env"])) as venv:
        layouts = feature_layouts(venv.groups, cfg.env.features, venv.feature_names)
        dims = {}
        for g, lay in layouts.items():
            if not set(args.features) <= set(lay.names):
                continue  # groups without these positions (e.g. speaker-listener's speaker) see them unshifted
            idx = [lay.indices[lay.names.index(f)] for f in args.features]
            dims[g] = ([i[0] for i in idx], [i[1] for i in idx])
        agents = [a for g in venv.groups for a in g.agents]
        policies = {"teacher": load_team(tdir, venv.groups)[0]}
        policies.update({str(p): load_team(p, venv.groups)[0] for p in args.students})
        for name, team in tqdm(policies.items(), desc="policies"):
            clean = returns_under(venv, team, None, args.episodes, seed)
            row: dict = {"clean": float(clean.mean()), "translation": {}, "offsets": {}}
            for eps in args.eps:
                shifted = np.stack([returns_under(venv, team, translation(team, dims, eps, sign), args.episodes, seed)
                                    for sign in ((1, 1), (1, -1), (-1, 1), (-1, -1))])
                # the same corners for every policy: ConstantOffset seeds depend on the suite seed only
                corners = team_returns(worst_offsets(venv, team, agents, position_budgets(layouts, args.features, eps, team.device),
                                                     args.corners, args.episodes, seed))
                row["translation"][str(eps)] = loss_row(clean, shifted[shifted.mean(1).argmin()])
                row["offsets"][str(eps)] = loss_row(clean, np.minimum(shifted.min(0), corners))
            results["policies"][name] = row

    t = results["policies"]["teacher"]
    print(f"{env}: constant offsets of {', '.join(args.features)} ({args.episodes} episodes)")
    for eps in args.eps:
        e = str(eps)
        suite_loss = t["clean"] - worst_suite[e]["mean"] if e in worst_suite else None
        print(f"  eps {eps:g}: the suite's worst case takes {suite_loss:.2f} from the teacher" if suite_loss else f"  eps {eps:g}:")
        for family in ("translation", "offsets"):
            tr = t[family][e]
            line = f"    {family}: teacher loses {tr['loss']:.2f} [{tr['loss_ci'][0]:.2f}, {tr['loss_ci'][1]:.2f}]"
            if suite_loss:
                bound = 1 - tr["loss"] / suite_loss
                results.setdefault("recovery_bound", {}).setdefault(family, {})[e] = bound
                line += f": recovery at most {100 * bound:.0f}%"
            print(line + "".join(f"; {n} loses {r[family][e]['loss']:.2f}" for n, r in results["policies"].items() if n != "teacher"))
    out = RESULTS / f"translation_bound_{env}_eps{'_'.join(map(str, args.eps))}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
