"""Cost of a cascade study against clean evaluations of the same episodes.

A study with F fault blocks (one-step impulses on each agent at each onset, plus the studied fault on each agent)
plays F + 1 twins of every episode side by side. This times, on the same episode seeds, a clean evaluation (one
env copy per episode), the paired run alone and the whole study (replay check, paired run, influence bootstrap,
cascades), and prints each against (F + 1) clean evaluations. Writes
``experiments/results/bench_cascade_<env>.json``.

    python experiments/bench_cascade.py <run or policy dir> [--episodes 20] [--repeats 3] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from madistill.cascade.faults import FaultEnv
from madistill.cascade.monitor import fault_config, impulse_faults, studied_faults, study
from madistill.cascade.paired import paired_rollouts
from madistill.config import AttackConfig, CascadeConfig
from madistill.envs.factory import EnvSpec
from madistill.envs.features import feature_layouts
from madistill.envs.vector import MultiAgentVecEnv
from madistill.policies.store import load_team, read_manifest
from madistill.rollout import Rollout
from madistill.stages.policies import teacher_dir


def best_of(repeats: int, fn) -> float:  # noqa: ANN001 - any zero-argument callable
    """The fastest of ``repeats`` timed calls, in seconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", help="a run or policy directory")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="env worker processes")
    ap.add_argument("--seed", type=int, default=30_000)
    ap.add_argument("--results", default=None, help="default: experiments/results/bench_cascade_<env>.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pdir = teacher_dir(args.policy)
    spec = EnvSpec.from_dict(read_manifest(pdir)["env"])

    def make_venv(n: int, period: int) -> MultiAgentVecEnv:
        return MultiAgentVecEnv(spec, n, num_workers=args.workers, seed_period=period)

    with make_venv(1, 1) as venv:
        team, _ = load_team(pdir, venv.groups)
        env = FaultEnv(venv.groups, feature_layouts(venv.groups, {}, venv.feature_names), OmegaConf.structured(AttackConfig))
    cc = OmegaConf.structured(CascadeConfig(episodes=args.episodes, seed=args.seed, replay_episodes=3))
    fc, impulse = fault_config(name="stuck", duration=None, onset=3), fault_config(name="random")

    def clean() -> None:
        with make_venv(args.episodes, args.episodes) as venv:
            Rollout(venv, team, seed=args.seed, episode_streams=True).run(episodes=args.episodes)

    agents = [a for g in env.groups for a in g.agents]
    impulses, _ = impulse_faults(impulse, list(cc.onsets), env, agents)
    studied = [sf.fault for sf in studied_faults(fc, env, agents)]
    faults = [*impulses, *studied]
    blocks = len(faults)  # F
    t_clean = best_of(args.repeats, clean)
    t_paired = best_of(args.repeats, lambda: paired_rollouts(make_venv, team, faults, args.episodes, args.seed))
    t_study = best_of(args.repeats, lambda: study(make_venv, team, env, cc, fc, impulse, spec.id))
    budget = (blocks + 1) * t_clean
    out = {"env": spec.id, "policy": str(pdir), "episodes": args.episodes, "faults": blocks, "workers": args.workers,
           "seconds": {"clean": t_clean, "paired": t_paired, "study": t_study},
           "ratio_paired": t_paired / budget, "ratio_study": t_study / budget}
    print(f"{spec.id}: {args.episodes} episodes, F = {blocks} fault blocks ({len(impulses)} impulses + "
          f"{len(studied)} studied faults)")
    print(f"  clean evaluation       {t_clean:7.2f} s   x (F + 1) = {budget:7.2f} s")
    print(f"  paired run             {t_paired:7.2f} s   ratio {out['ratio_paired']:.2f}")
    print(f"  whole study            {t_study:7.2f} s   ratio {out['ratio_study']:.2f}")
    path = Path(args.results or f"experiments/results/bench_cascade_{spec.id}.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
