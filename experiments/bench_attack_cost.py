"""Cost of attacking: wall time of evaluating a saved policy clean vs under suite attacks on every agent, side
by side.

Every side plays the same episodes (the attack stage's seeds) through the library's evaluation loop
(``run_episodes``; each attack is the attack stage's transform for it, built afresh per evaluation as the stage
does), repeats are interleaved so all see the same machine load, and the medians and their ratios to clean are
reported. With several methods, ``suite_ratio`` is one evaluation of each of them (what the suite spends per
victim set and eps) relative to one clean evaluation.

    python experiments/bench_attack_cost.py runs/teachers/simple_spread_v3 [--episodes 100] [--repeats 5]
    python experiments/bench_attack_cost.py runs/zoo/sl/s0 --name teacher --methods suite --eps 1.0

``--methods``: suite attacks to time (default ``pgd``); ``suite`` names the default suite (``attack.methods``).
``critic`` uses the policy's own value heads (skipped without them), ``transfer`` the ``--surrogate`` policy
(skipped without one). The env and how it is stepped (copies, worker processes) come from the policy's
manifest; the attack settings other than ``--steps`` and the episode seed are the ``attack`` config's defaults.
Writes ``experiments/results/attack_cost_<env>_<policy>.json`` (PGD alone) or
``attack_cost_<env>_<policy>_<methods>.json`` (``suite``, or the names joined by ``+``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from madistill.attacks.budget import group_budgets
from madistill.attacks.robustness import suite_transforms
from madistill.branching import value_critic
from madistill.config import AttackConfig, Config, EnvConfig
from madistill.envs.factory import EnvSpec
from madistill.envs.features import feature_layouts
from madistill.envs.vector import MultiAgentVecEnv
from madistill.evaluate.evaluator import run_episodes
from madistill.policies.base import TeamPolicy
from madistill.policies.store import find_policy_dir, load_team, read_manifest
from madistill.runtime import make_vec_env, resolve_device, seed_everything
from madistill.transforms import ActionTransform, ObsTransform

RESULTS = Path(__file__).parent / "results"


def timed_evaluation(
    venv: MultiAgentVecEnv, team: TeamPolicy, episodes: int, seed: int,
    transforms: Callable[[], Sequence[ObsTransform | ActionTransform]] = tuple,
) -> tuple[float, float]:
    """Wall seconds of one greedy evaluation of ``episodes`` episodes (seeds ``seed..``) under the transforms
    ``transforms()`` builds (timed too, as the attack stage builds them per evaluation) and its mean team return."""
    start = time.perf_counter()
    records = run_episodes(venv, team, episodes, seed, transforms=transforms())
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
    ap.add_argument("--methods", nargs="+", default=["pgd"],
                    help="suite attacks to time, or 'suite' for the default attack.methods")
    ap.add_argument("--surrogate", help="policy directory the transfer attack crafts on (else transfer is skipped)")
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
    label = "suite" if args.methods == ["suite"] else "+".join(args.methods)
    methods = [str(m) for m in attack_defaults.methods] if label == "suite" else list(args.methods)
    skipped = []
    with make_vec_env(env_cfg, spec) as venv:
        team, _ = load_team(pdir, venv.groups, device=device)
        surrogate = load_team(find_policy_dir(args.surrogate), venv.groups, device=device)[0] if args.surrogate else None
        critic = value_critic(team)
        for name, missing in (("critic", critic is None), ("transfer", surrogate is None)):
            if name in methods and missing:
                methods.remove(name)
                skipped.append(f"{name}: {'the policy has no value heads' if name == 'critic' else 'no --surrogate'}")
        budgets = group_budgets(args.eps, feature_layouts(venv.groups, {}, venv.feature_names), device=device)
        victims = [a for g in venv.groups for a in g.agents]

        def attacked(method: str) -> Callable[[], list[ObsTransform | ActionTransform]]:
            return lambda: suite_transforms(method, venv, team, victims, budgets, ac, seed, surrogate, critic)

        sides = {"clean": tuple, **{m: attacked(m) for m in methods}}
        for transforms in sides.values():  # warm-up: first calls pay one-off set-up costs
            timed_evaluation(venv, team, venv.num_envs, seed, transforms)
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        returns: dict[str, float] = {}
        for _ in range(args.repeats):
            for side, transforms in sides.items():
                took, returns[side] = timed_evaluation(venv, team, args.episodes, seed, transforms)
                seconds[side].append(took)
    median = {side: statistics.median(s) for side, s in seconds.items()}
    ratios = {m: median[m] / median["clean"] for m in methods}
    result = {
        "policy": str(pdir), "env": spec.id, "device": str(device), "torch_threads": args.threads,
        "num_envs": env_cfg.num_envs, "num_workers": env_cfg.num_workers, "episodes": args.episodes, "seed": seed,
        "repeats": args.repeats, "eps": args.eps, "victims": victims, "methods": methods, "skipped": skipped,
        "attack": OmegaConf.to_container(ac, resolve=True),
        "seconds": seconds, "median_seconds": median, "ratios": ratios,
        "suite_ratio": sum(median[m] for m in methods) / median["clean"],
        "team_return": returns,  # the same every repeat: the episodes are seeded
    }
    if methods == ["pgd"]:
        result["ratio"] = ratios["pgd"]
    print(f"{spec.id}, {pdir} on {device}: {args.episodes} episodes, {env_cfg.num_envs} env copies, eps {args.eps:g}, "
          f"all agents attacked, median of {args.repeats}")
    for side in sides:
        ratio = "" if side == "clean" else f", {ratios[side]:.1f}x clean"
        print(f"  {side:<20} {median[side]:.2f} s ({1e3 * median[side] / args.episodes:.1f} ms/episode), "
              f"team return {returns[side]:.2f}{ratio}")
    print(f"  every method once: {result['suite_ratio']:.1f}x clean" + "".join(f"; skipped {s}" for s in skipped))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"attack_cost_{spec.id}_{pdir.name}{'' if label == 'pgd' else '_' + label}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"  written: {out}")


if __name__ == "__main__":
    main()
