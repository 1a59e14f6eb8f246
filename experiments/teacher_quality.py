"""Teacher quality next to the PettingZoo SB3 tutorial recipe at the same number of agent-steps.

Trains the tutorial baseline (SuperSuit ``pettingzoo_env_to_vec_env_v1`` + ``concat_vec_envs_v1``, 8 copies,
``PPO("MlpPolicy", lr=1e-3, batch_size=256)``, SB3 defaults otherwise) for as many agent-steps as a madistill
run, then evaluates both (and a uniform-random team) with madistill's evaluator: greedy actions, 100 episodes
with the same seeds, IQM and mean with 95% bootstrap CIs. Plots both training curves (episodic team return vs
agent-steps). Homogeneous envs only (the tutorial shares one policy across all agents).

    madistill pipeline env=simple_spread_v3 teacher.total_agent_steps=3000000 hydra.run.dir=runs/spread_3m
    python experiments/teacher_quality.py runs/spread_3m
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from madistill.envs.factory import EnvSpec, make_env  # noqa: E402
from madistill.envs.vector import MultiAgentVecEnv  # noqa: E402
from madistill.evaluate.evaluator import run_episodes, uniform_team  # noqa: E402
from madistill.evaluate.stats import summarize  # noqa: E402
from madistill.normalize import ObsNormalizer  # noqa: E402
from madistill.policies.base import TeamPolicy  # noqa: E402
from madistill.policies.sb3 import SB3Policy  # noqa: E402
from madistill.policies.store import load_team, read_manifest  # noqa: E402


def train_tutorial(spec: EnvSpec, steps: int, seed: int) -> tuple[object, list[tuple[int, float]]]:
    import supersuit as ss
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    env = ss.pettingzoo_env_to_vec_env_v1(make_env(spec))
    env = ss.concat_vec_envs_v1(env, 8, num_cpus=1, base_class="stable_baselines3")
    env.seed = lambda seed=None: [None] * env.num_envs  # SuperSuit's vec env lacks seed(); SB3 calls it
    env = VecMonitor(env)
    model = PPO("MlpPolicy", env, learning_rate=1e-3, batch_size=256, seed=seed, device="cpu", verbose=0)
    curve: list[tuple[int, float]] = []
    from stable_baselines3.common.callbacks import BaseCallback

    class Curve(BaseCallback):
        def _on_rollout_end(self) -> None:
            if self.model.ep_info_buffer:
                # each "episode" is one agent's; their mean is the team return (mean over agents)
                curve.append((self.num_timesteps, float(np.mean([e["r"] for e in self.model.ep_info_buffer]))))

        def _on_step(self) -> bool:
            return True

    model.learn(total_timesteps=steps, callback=Curve())
    env.close()
    return model, curve


def madistill_curve(run: Path) -> list[tuple[int, float]]:
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars("charts/episodic_return")]


def plot_curves(curves: dict[str, list[tuple[int, float]]], random_mean: float, title: str) -> plt.Figure:
    """Training curves smoothed by a moving average (valid part only, so the ends carry no artefacts)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, curve in curves.items():
        x, y = np.array(curve).T
        k = max(1, len(y) // 25)
        ax.plot(x[k - 1 :], np.convolve(y, np.ones(k) / k, mode="valid"), label=label)
    ax.axhline(random_mean, color="grey", ls="--", label="uniform random")
    ax.set_xlabel("agent-steps")
    ax.set_ylabel("training episodic team return")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a madistill run directory (pipeline or train)")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--eval-seed", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher_dir = args.run / "policies" / "teacher"
    manifest = read_manifest(teacher_dir)
    spec = EnvSpec.from_dict(manifest["env"])
    steps = int(manifest["config"]["teacher"]["total_agent_steps"])
    model, base_curve = train_tutorial(spec, steps, args.seed)
    out: dict[str, dict] = {}
    with MultiAgentVecEnv(spec, 10, num_workers=0) as venv:
        if len(venv.groups) != 1:
            raise SystemExit("the tutorial recipe shares one policy over all agents: use a homogeneous env")
        g = venv.groups[0]
        tutorial = TeamPolicy([g], {g.name: SB3Policy(g, model.policy, {})}, {g.name: ObsNormalizer(g.obs_dim, enabled=False)})
        teams = {"madistill": load_team(teacher_dir, venv.groups)[0], "tutorial": tutorial, "random": uniform_team(venv)}
        for name, team in teams.items():
            recs = run_episodes(venv, team, args.episodes, args.eval_seed, deterministic=name != "random")
            out[name] = summarize(recs, seed=0)["team"]
    print(f"{spec.id}: {steps} agent-steps, greedy team return over {args.episodes} episodes (seeds {args.eval_seed}+)")
    for name, s in out.items():
        print(f"  {name:<10} IQM {s['iqm']:7.2f} [{s['iqm_ci'][0]:.2f}, {s['iqm_ci'][1]:.2f}]"
              f"   mean {s['mean']:7.2f} [{s['mean_ci'][0]:.2f}, {s['mean_ci'][1]:.2f}]")
    curves = {"madistill": madistill_curve(args.run), "tutorial SB3+SuperSuit": base_curve}
    fig = plot_curves(curves, out["random"]["mean"], spec.id)
    dest = Path(__file__).parent / "results"
    dest.mkdir(exist_ok=True)
    fig.savefig(dest / f"teacher_quality_{spec.id}.png", dpi=120)
    (dest / f"teacher_quality_{spec.id}.json").write_text(json.dumps({"steps": steps, "eval": out, "tutorial_curve": base_curve}, indent=1))
    print(f"figure: {dest / f'teacher_quality_{spec.id}.png'}")


if __name__ == "__main__":
    main()
