"""Where teacher training spends its time with many env copies: env stepping, the rest of the rollout (acting,
the SB3 buffer), and the PPO update, plus cProfile's top functions by own time.

    python experiments/profile_teacher.py [--copies 1024] [--steps 1228800] [--backend batched] [--top 25]

Spread (N=3), the tutorial recipe's PPO settings and network (experiments/bench_throughput.py), one torch
thread, inline updates, env copies in this process.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from bench_throughput import madistill_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3 * 128 * 1024 * 3)
    ap.add_argument("--backend", choices=["pettingzoo", "batched"], default="batched")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    profile = cProfile.Profile()
    sps, env, update = madistill_run(args.copies, args.steps, 0, 0, "inline", args.backend, profile=profile)
    print(f"{args.copies} copies ({args.backend}), {args.steps} agent-steps budget: {sps:.0f} agent-steps/s "
          f"under cProfile")
    print(f"env stepping {env:.0%}, rest of the rollout {1 - env - update:.0%}, PPO update {update:.0%}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
