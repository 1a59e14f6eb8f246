"""Teacher-training throughput: madistill vs the PettingZoo SB3 tutorial recipe, measured side by side.

Baseline (PettingZoo tutorial): SuperSuit ``pettingzoo_env_to_vec_env_v1`` + ``concat_vec_envs_v1`` and one
SB3 PPO over all agents, timed in ``learn()``. madistill: ``TeacherTrainer`` (SB3 PPO fed by madistill's
rollout, env copies in worker processes), timed in ``train()``, with the PPO update after each rollout
(``teacher.update_mode=inline``) and overlapped with the next rollout in a thread (``thread``). Same env,
copies, PPO settings, network and agent-step budget; construction (env workers) is excluded from both. Also reports the share of wall time spent waiting for the
environments' ``step``.

    python experiments/bench_throughput.py [--steps 92160] [--repeats 3] [--append]
    python experiments/bench_throughput.py --env-steps   # only the per-step env costs behind the table
    python experiments/bench_throughput.py --backend batched   # madistill on the batched mpe2 port

madistill steps the PettingZoo env copies by default here (``--backend pettingzoo``), the path the tutorial
recipe is compared with; ``--backend batched`` writes its own results file.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ENV_KWARGS = {"N": 3, "max_cycles": 25, "continuous_actions": False}
PPO_SETTINGS = {"learning_rate": 1e-3, "n_steps": 128, "batch_size": 256, "n_epochs": 10, "gamma": 0.99,
                "gae_lambda": 0.95, "clip_range": 0.2, "ent_coef": 0.0, "vf_coef": 0.5, "max_grad_norm": 0.5}
HIDDEN = [64, 64]  # SB3's MlpPolicy default for PPO


class _Timed:
    """Accumulates wall time spent inside a wrapped method."""

    def __init__(self, obj: object, name: str):
        self.total = 0.0
        inner = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.total += time.perf_counter() - t

        setattr(obj, name, wrapper)


def baseline(copies: int, steps: int, num_cpus: int, seed: int, aec_driver: bool = False) -> tuple[float, float]:
    """The tutorial recipe; ``aec_driver=True`` gives it madistill's AEC->parallel driver in place of
    PettingZoo's, to show how much of the difference is the env conversion alone."""
    import supersuit as ss
    from mpe2 import simple_spread_v3
    from stable_baselines3 import PPO

    from madistill.envs import EnvSpec, make_env

    if aec_driver:
        env = make_env(EnvSpec("mpe2.simple_spread_v3.parallel_env", ENV_KWARGS))
    else:
        env = simple_spread_v3.parallel_env(**ENV_KWARGS)
    env = ss.pettingzoo_env_to_vec_env_v1(env)
    env = ss.concat_vec_envs_v1(env, copies, num_cpus=num_cpus, base_class="stable_baselines3")
    env.seed = lambda seed=None: [None] * env.num_envs  # SuperSuit's vec env lacks seed(); SB3 calls it
    model = PPO("MlpPolicy", env, policy_kwargs={"net_arch": HIDDEN}, seed=seed, device="cpu", **PPO_SETTINGS)
    timer = _Timed(env, "step_wait")
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - t0
    done = model.num_timesteps
    env.close()
    return done / wall, timer.total / wall


def madistill_run(copies: int, steps: int, workers: int, seed: int, update_mode: str, backend: str,
                  profile: cProfile.Profile | None = None, fast_update: bool = True,
                  critic_thread: bool = True) -> tuple[float, float, float]:
    """madistill's agent-steps/s and the shares of wall time in the env's ``step`` and in PPO's updates;
    ``profile`` runs during training; ``fast_update=False``: SB3's own ``train()`` (``teacher.ppo.fast_update``);
    ``critic_thread=False``: the fast update in one thread (``teacher.ppo.critic_thread``)."""
    from madistill.cli import compose_config
    from madistill.runtime import env_spec, make_vec_env, seed_everything
    from madistill.teacher import TeacherTrainer

    overrides = [
        "env=simple_spread_v3", f"env.num_envs={copies}", f"env.num_workers={workers}", f"seed={seed}",
        f"teacher.total_agent_steps={steps}", f"teacher.hidden_sizes={HIDDEN}", "teacher.normalize_obs=false",
        "logger=quiet", f"teacher.update_mode={update_mode}", f"env.backend={backend}",
        f"teacher.ppo.fast_update={fast_update}", f"teacher.ppo.critic_thread={critic_thread}",
    ] + [f"teacher.ppo.{k}={v}" for k, v in PPO_SETTINGS.items()]
    cfg = compose_config(overrides)
    seed_everything(cfg.seed, cfg.torch_threads)
    spec = env_spec(cfg.env)
    with (make_vec_env(cfg.env, spec) as venv, tempfile.TemporaryDirectory() as tmp,
          TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None) as trainer):
        timer, update = _Timed(venv, "step"), _Timed(trainer, "_update")
        t0 = time.perf_counter()
        with profile or contextlib.nullcontext():
            trainer.train(Path(tmp))
        wall = time.perf_counter() - t0
    return trainer.agent_steps / wall, timer.total / wall, update.total / wall


def env_step_costs(copies: int, backend: str, steps: int = 3000, repeats: int = 3) -> None:
    """Prints the per-step costs docs/results.md explains the table with (best of ``repeats``, random actions):
    one spread env through PettingZoo's ``parallel_env`` and through madistill's AEC driver, and ``copies``
    copies stepped in-process and through one env worker."""
    from mpe2 import simple_spread_v3

    from madistill.envs import EnvSpec, MultiAgentVecEnv, make_env

    spec = EnvSpec("mpe2.simple_spread_v3.parallel_env", ENV_KWARGS)
    rng = np.random.default_rng(0)
    for name, env in (("PettingZoo parallel_env", simple_spread_v3.parallel_env(**ENV_KWARGS)),
                      ("madistill AEC driver", make_env(spec))):
        best = np.inf
        for _ in range(repeats):
            env.reset(seed=0)
            t = time.perf_counter()
            for k in range(steps):
                if not env.agents:
                    env.reset(seed=k)
                env.step({a: int(rng.integers(5)) for a in env.agents})
            best = min(best, (time.perf_counter() - t) / steps)
        print(f"one env, {name:<24} {1e6 * best:7.0f} us/step")
    for workers in (0, 1):
        with MultiAgentVecEnv(spec, copies, num_workers=workers, backend=backend) as venv:
            venv.reset(0)
            actions = [{g.name: rng.integers(0, 5, (copies, g.n_agents)) for g in venv.groups} for _ in range(steps)]
            best = np.inf
            for _ in range(repeats):
                t = time.perf_counter()
                for a in actions:
                    venv.step(a)
                best = min(best, (time.perf_counter() - t) / steps)
        print(f"{copies} copies, {'in-process' if workers == 0 else 'one env worker':<22} {1e3 * best:7.2f} ms/step")


def _best_tutorial(med: dict[str, float]) -> float:
    return max(v for k, v in med.items() if k.startswith("tutorial SB3"))


def _speedup_ci(rows: dict[str, list[tuple[float, float]]], name: str, n_boot: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of (median of ``name``) / (median of the faster tutorial variant), resampling
    each variant's repeats."""
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(n_boot):
        med = {k: float(np.median(rng.choice([v[0] for v in vals], len(vals)))) for k, vals in rows.items()
               if k == name or k.startswith("tutorial SB3")}
        ratios.append(med[name] / _best_tutorial(med))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3 * 128 * 8 * 3 * 10, help="agent-steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--append", action="store_true", help="pool with the repeats already in the results file")
    ap.add_argument("--env-steps", action="store_true", help="only print the per-step env costs")
    ap.add_argument("--backend", choices=["pettingzoo", "batched"], default="pettingzoo",
                    help="how madistill steps the env copies (env.backend)")
    args = ap.parse_args()
    if args.env_steps:
        env_step_costs(args.copies, args.backend)
        return
    # One torch thread for every variant: small MLPs run fastest that way on CPU, and the baseline with
    # torch's default thread count is several times slower on 2 cores (measured), which would flatter us.
    torch.set_num_threads(1)
    rows: dict[str, list[tuple[float, float]]] = {}
    for r in range(args.repeats):  # interleaved, so drifts in machine load hit every variant alike
        for cpus in (1, 2):
            rows.setdefault(f"tutorial SB3+SuperSuit num_cpus={cpus}", []).append(baseline(args.copies, args.steps, cpus, r))
        rows.setdefault("tutorial num_cpus=2, madistill's AEC driver", []).append(
            baseline(args.copies, args.steps, 2, r, aec_driver=True))
        for workers in (2, 1):
            for mode in ("inline", "thread"):
                rows.setdefault(f"madistill num_workers={workers} update_mode={mode}", []).append(
                    madistill_run(args.copies, args.steps, workers, r, mode, args.backend))
    suffix = "" if args.backend == "pettingzoo" else f"_{args.backend}"
    out = Path(__file__).parent / "results" / f"throughput_simple_spread_v3{suffix}.json"
    settings = {"copies": args.copies, "steps": args.steps, "ppo": PPO_SETTINGS, "hidden": HIDDEN, "env": ENV_KWARGS}
    invocations = 1
    if args.append and out.exists():  # pool with earlier invocations of the same settings
        before = json.loads(out.read_text())
        if before["settings"] != settings:
            raise SystemExit(f"--append: {out} holds other settings; run without --append to replace it")
        invocations += before["invocations"]
        for k, vals in before["runs"].items():
            rows[k] = [(v["agent_steps_per_s"], v["env_step_share"]) for v in vals] + rows.get(k, [])
    n = len(next(iter(rows.values())))
    print(f"simple_spread_v3 N=3, {args.copies} copies, {args.steps} agent-steps per run, {n} repeats over "
          f"{invocations} invocation(s), PPO {PPO_SETTINGS}, net {HIDDEN}")
    print(f"{'variant':<46} {'agent-steps/s (median [min, max])':>36} {'env step share':>15}")
    med = {k: statistics.median(v[0] for v in vals) for k, vals in rows.items()}
    for name, vals in rows.items():
        sps = [v[0] for v in vals]
        share = statistics.median(v[1] for v in vals)
        print(f"{name:<46} {med[name]:>14.0f} [{min(sps):.0f}, {max(sps):.0f}]{'':>6} {share:>14.0%}")
    speedups = {}
    for name in (k for k in med if k.startswith("madistill")):
        lo, hi = _speedup_ci(rows, name)
        speedups[name] = {"median_ratio": med[name] / _best_tutorial(med), "ci95": [lo, hi]}
        print(f"speed-up of {name} over the faster tutorial variant: {speedups[name]['median_ratio']:.2f}x "
              f"[95% bootstrap CI {lo:.2f}, {hi:.2f}]")
    out.write_text(json.dumps({
        "settings": settings, "invocations": invocations,
        "runs": {k: [{"agent_steps_per_s": v[0], "env_step_share": v[1]} for v in vals] for k, vals in rows.items()},
        "speedup_over_best_tutorial": speedups,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
