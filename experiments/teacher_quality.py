"""Teacher quality next to the PettingZoo SB3 tutorial recipe at the same number of agent-steps.

Trains the tutorial baseline (SuperSuit ``pettingzoo_env_to_vec_env_v1`` + ``concat_vec_envs_v1``, 8 copies,
``PPO("MlpPolicy", lr=1e-3, batch_size=256)``, SB3 defaults otherwise) for as many agent-steps as a madistill
run, then evaluates both (and a uniform-random team) with madistill's evaluator: greedy actions, 100 episodes
with the same seeds, IQM and mean with 95% bootstrap CIs. Plots both training curves (episodic team return vs
agent-steps). The tutorial shares one policy across all agents; for agents with different spaces it pads
them to the widest with SuperSuit (``pad_observations_v0``, ``pad_action_space_v0``), as PettingZoo's SB3
tutorials do.

    madistill pipeline env=simple_spread_v3 teacher.total_agent_steps=3000000 hydra.run.dir=runs/spread_3m
    python experiments/teacher_quality.py runs/spread_3m
    madistill train seed=0 hydra.run.dir=runs/sl_s0      # speaker-listener at the default budget
    python experiments/teacher_quality.py runs/sl_s0 --seed 0
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
import torch.nn.functional as F  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from madistill.envs.factory import EnvSpec, make_env  # noqa: E402
from madistill.envs.groups import AgentGroup  # noqa: E402
from madistill.envs.vector import MultiAgentVecEnv  # noqa: E402
from madistill.evaluate.evaluator import run_episodes, uniform_team  # noqa: E402
from madistill.evaluate.stats import summarize  # noqa: E402
from madistill.normalize import ObsNormalizer  # noqa: E402
from madistill.policies.base import Policy, TeamPolicy  # noqa: E402
from madistill.policies.store import load_team, read_manifest  # noqa: E402


def train_tutorial(spec: EnvSpec, steps: int, seed: int) -> tuple[object, list[tuple[int, float]]]:
    import supersuit as ss
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    env = ss.pettingzoo_env_to_vec_env_v1(ss.pad_action_space_v0(ss.pad_observations_v0(make_env(spec))))
    env = ss.concat_vec_envs_v1(env, 8, num_cpus=1, base_class="stable_baselines3")
    env.seed = lambda seed=None: [None] * env.num_envs  # SuperSuit's vec env lacks seed(); SB3 calls it
    env = VecMonitor(env)
    model = PPO("MlpPolicy", env, learning_rate=1e-3, batch_size=256, seed=seed, device="cpu", verbose=0)
    curve = TeamReturnCurve()
    model.learn(total_timesteps=steps, callback=curve)
    env.close()
    return model, curve.curve


class TeamReturnCurve(BaseCallback):
    """The training curve of SB3 on a SuperSuit vec env under ``VecMonitor``: after each rollout, the mean return
    of the episodes in SB3's window (the last 100). Each "episode" is one agent's, so their mean is the team
    return (mean over agents), as madistill logs it."""

    def __init__(self) -> None:
        super().__init__()
        self.curve: list[tuple[int, float]] = []

    def _on_rollout_end(self) -> None:
        if self.model.ep_info_buffer:
            self.curve.append((self.num_timesteps, float(np.mean([e["r"] for e in self.model.ep_info_buffer]))))

    def _on_step(self) -> bool:
        return True


class PaddedSharedPolicy(Policy):
    """The tutorial's one policy over padded spaces, as one group's policy. Observations are zero-padded to the
    widest; a padded action beyond the group's own means action 0, as SuperSuit's ``pad_action_space`` plays
    it, so the greedy action here is the one the tutorial's ``predict(deterministic=True)`` takes."""

    def __init__(self, group: AgentGroup, sb3_policy: torch.nn.Module, obs_width: int):
        super().__init__()
        self.group, self.sb3, self.width = group, sb3_policy, obs_width

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = F.pad(obs, (0, self.width - obs.shape[-1]))
        logits = self.sb3.action_net(self.sb3.mlp_extractor.forward_actor(self.sb3.pi_features_extractor(x)))
        n = int(self.group.action_space.n)
        head = logits[:, :n].clone()
        head[:, 0] = logits[:, [0, *range(n, logits.shape[1])]].max(1).values
        return head


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
        width = max(g.obs_dim for g in venv.groups)
        tutorial = TeamPolicy(venv.groups, {g.name: PaddedSharedPolicy(g, model.policy, width) for g in venv.groups},
                              {g.name: ObsNormalizer(g.obs_dim, enabled=False) for g in venv.groups})
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
    stem = f"teacher_quality_{spec.id}" + (f"_seed{args.seed}" if args.seed else "")
    fig.savefig(dest / f"{stem}.png", dpi=120)
    (dest / f"{stem}.json").write_text(json.dumps({"steps": steps, "seed": args.seed, "eval": out, "tutorial_curve": base_curve}, indent=1))
    print(f"figure: {dest / f'{stem}.png'}")


if __name__ == "__main__":
    main()
