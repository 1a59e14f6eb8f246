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
import tempfile
import time
from pathlib import Path

import torch
from bench_throughput import HIDDEN, PPO_SETTINGS, _Timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3 * 128 * 1024 * 3)
    ap.add_argument("--backend", choices=["pettingzoo", "batched"], default="batched")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from madistill.cli import compose_config
    from madistill.runtime import env_spec, make_vec_env, seed_everything
    from madistill.teacher import TeacherTrainer

    torch.set_num_threads(1)
    overrides = [
        "env=simple_spread_v3", f"env.num_envs={args.copies}", "env.num_workers=0", "seed=0",
        f"teacher.total_agent_steps={args.steps}", f"teacher.hidden_sizes={HIDDEN}", "teacher.normalize_obs=false",
        "logger=quiet", "teacher.update_mode=inline", f"env.backend={args.backend}",
    ] + [f"teacher.ppo.{k}={v}" for k, v in PPO_SETTINGS.items()]
    cfg = compose_config(overrides)
    seed_everything(cfg.seed, cfg.torch_threads)
    spec = env_spec(cfg.env)
    with (make_vec_env(cfg.env, spec) as venv, tempfile.TemporaryDirectory() as tmp,
          TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None) as trainer):
        env_timer = _Timed(venv, "step")
        update_timer = _Timed(trainer, "_update")
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        trainer.train(Path(tmp))
        profile.disable()
        wall = time.perf_counter() - t0
    rest = wall - env_timer.total - update_timer.total
    print(f"{args.copies} copies ({args.backend}), {trainer.agent_steps} agent-steps in {wall:.1f} s "
          f"(under cProfile): {trainer.agent_steps / wall:.0f} agent-steps/s")
    print(f"env stepping {env_timer.total / wall:.0%}, rest of the rollout {rest / wall:.0%}, "
          f"PPO update {update_timer.total / wall:.0%}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
