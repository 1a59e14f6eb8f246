"""Cost of attacking: wall time of evaluating a saved policy clean vs under PGD on every agent, side by side.

Both sides play the same episodes (the attack stage's seeds) through the library's evaluation loop
(``run_episodes``; the attack is the attack stage's PGD transform), repeats are interleaved so both see the
same machine load, and the medians and their ratio are reported.

    python experiments/bench_attack_cost.py runs/teachers/simple_spread_v3 [--episodes 100] [--repeats 5]

The env and how it is stepped (copies, worker processes) come from the policy's manifest; the PGD settings
other than ``--steps`` (restarts, step size) and the episode seed are the ``attack`` config's defaults.
Writes ``experiments/results/attack_cost_<env>_<policy>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from madistill.attacks.budget import group_budgets
from madistill.attacks.robustness import suite_attack
from madistill.attacks.transform import AttackTransform
from madistill.config import AttackConfig, Config, EnvConfig
from madistill.envs.factory import EnvSpec
from madistill.envs.features import feature_layouts
from madistill.envs.vector import MultiAgentVecEnv
from madistill.evaluate.evaluator import run_episodes
from madistill.policies.base import TeamPolicy
from madistill.policies.store import find_policy_dir, load_team, read_manifest
from madistill.runtime import make_vec_env, resolve_device, seed_everything
from madistill.transforms import ObsTransform

RESULTS = Path(__file__).parent / "results"


def timed_evaluation(
    venv: MultiAgentVecEnv, team: TeamPolicy, episodes: int, seed: int, transforms: Sequence[ObsTransform] = ()
) -> tuple[float, float]:
    """Wall seconds of one greedy evaluation of ``episodes`` episodes (seeds ``seed..``) and its mean team return."""
    start = time.perf_counter()
    records = run_episodes(venv, team, episodes, seed, transforms=transforms)
    return time.perf_counter() - start, float(np.mean([r.team_return for r in records]))


def main() -> None:
    attack_defaults = AttackConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", help="policy directory, or a run directory holding one policy (else pass --name)")
    ap.add_argument("--name", help="which policy of a run directory (teacher, student, ...)")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=attack_defaults.steps, help="PGD iterations")
    ap.add_argument("--eps", type=float, default=sorted(attack_defaults.eps)[len(attack_defaults.eps) // 2],
                    help="l_inf radius in normalised units (default: the attack config's middle eps)")
    ap.add_argument("--device", default=Config.device)
    ap.add_argument("--threads", type=int, default=Config.torch_threads, help="torch threads")
    args = ap.parse_args()

    seed = attack_defaults.seed
    seed_everything(seed, args.threads)
    device = resolve_device(args.device)
    pdir = find_policy_dir(args.policy, args.name)
    manifest = read_manifest(pdir)
    spec = EnvSpec.from_dict(manifest["env"])
    env_cfg = OmegaConf.merge(OmegaConf.structured(EnvConfig), manifest["config"].get("env", {}))
    ac = OmegaConf.merge(OmegaConf.structured(AttackConfig), {"steps": args.steps})
    with make_vec_env(env_cfg, spec) as venv:
        team, _ = load_team(pdir, venv.groups, device=device)
        budgets = group_budgets(args.eps, feature_layouts(venv.groups, {}, venv.feature_names), device=device)
        pgd = suite_attack("pgd", ac)
        attacked = [AttackTransform(pgd, [a for g in venv.groups for a in g.agents], budgets)]
        timed_evaluation(venv, team, venv.num_envs, seed, attacked)  # warm-up: first calls pay one-off set-up costs
        seconds: dict[str, list[float]] = {"clean": [], "pgd": []}
        returns: dict[str, float] = {}
        for _ in range(args.repeats):
            for side, transforms in (("clean", ()), ("pgd", attacked)):
                took, returns[side] = timed_evaluation(venv, team, args.episodes, seed, transforms)
                seconds[side].append(took)
    median = {side: statistics.median(s) for side, s in seconds.items()}
    result = {
        "policy": str(pdir), "env": spec.id, "device": str(device), "torch_threads": args.threads,
        "num_envs": env_cfg.num_envs, "num_workers": env_cfg.num_workers, "episodes": args.episodes, "seed": seed,
        "repeats": args.repeats, "eps": args.eps, "attack": asdict(pgd),
        "seconds": seconds, "median_seconds": median, "ratio": median["pgd"] / median["clean"],
        "team_return": returns,  # the same every repeat: the episodes are seeded
    }
    print(f"{spec.id}, {pdir} on {device}: {args.episodes} episodes, {env_cfg.num_envs} env copies, median of {args.repeats}")
    print(f"  clean  {median['clean']:.2f} s ({1e3 * median['clean'] / args.episodes:.1f} ms/episode), "
          f"team return {returns['clean']:.2f}")
    print(f"  PGD-{pgd.steps} ({pgd.restarts} restarts, eps {args.eps:g}, all agents) {median['pgd']:.2f} s "
          f"({1e3 * median['pgd'] / args.episodes:.1f} ms/episode), team return {returns['pgd']:.2f}")
    print(f"  ratio  {result['ratio']:.1f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"attack_cost_{spec.id}_{pdir.name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"  written: {out}")


if __name__ == "__main__":
    main()
