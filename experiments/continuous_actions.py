"""Continuous-action teachers: madistill next to SB3 PPO through SuperSuit at the same settings, budget and seeds.

Every variant trains on ``simple_spread_v3`` with ``continuous_actions=True`` (mpe2's ``Box(0, 1, (5,))``) from one
composed madistill config: the SB3 side gets the same PPO settings, network (``policy_kwargs``), env copies
(SuperSuit's ``pettingzoo_env_to_vec_env_v1`` + ``concat_vec_envs_v1``, one SB3 env per agent), SB3's
``VecNormalize`` on observations only where ``teacher.normalize_obs`` is on (madistill's normaliser, by the same
formula), and the same ``teacher.bootstrap_truncated``: SuperSuit reports every episode end as done with no
``TimeLimit.truncated``, so SB3 bootstraps only where a wrapper here marks the ends at ``max_cycles`` as time limits.
Each trained policy is evaluated the same way, through madistill's evaluator: greedy actions (the Gaussian's
mean, sent as every policy's actions are: ``madistill.rollout.env_actions``) and sampled ones, 100 episodes of seeds 10000+, mean with a 95% bootstrap CI; a
uniform-random team is the reference. The greedy evaluation also counts, per action component, how often the
Gaussian's mean lies more than 2 stds outside the box (``saturated``). Runs go one after the other, or ``--jobs`` at
once, each in a fresh process (the same numbers either way).

    nice python experiments/continuous_actions.py --steps 100000 --seeds 0 1 2
    nice python experiments/continuous_actions.py --variants madistill-no-bootstrap --tag ls -- teacher.ppo.ent_coef=0

Variants: ``madistill`` (the given settings), ``madistill-no-bootstrap`` (and ``teacher.bootstrap_truncated=false``),
``madistill-recipe`` (``+experiment=spread_continuous``: that and ``teacher.ppo.gamma=0.95``), ``sb3-bootstrap`` (SB3
with madistill's time-limit bootstrap), ``sb3`` (without: PettingZoo's SuperSuit recipe, acting in the raw box) and
``sb3-unit`` (``sb3`` acting in [-1, 1] rescaled affinely to the box, as SB3's docs advise).
Writes ``experiments/results/continuous_actions[_TAG].json`` and ``.png`` (every run's training curve).
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common.vec_env import VecEnvWrapper
from teacher_quality import TeamReturnCurve, plot_curves

from madistill.cli import compose_config
from madistill.evaluate.evaluator import uniform_team
from madistill.evaluate.stats import summarize, summarize_scores
from madistill.normalize import ObsNormalizer
from madistill.policies.base import Policy, TeamPolicy
from madistill.policies.sb3 import SB3Policy, policy_kwargs
from madistill.rollout import Rollout, Transition
from madistill.runtime import env_spec, make_vec_env, seed_everything
from madistill.tb import TBLogger
from madistill.teacher import TeacherTrainer

Curve = list[tuple[int, float]]
ENV = ["env=simple_spread_v3", "env.kwargs.continuous_actions=true", "env.num_workers=0", "logger=quiet"]
VARIANTS = {  # name: (trainer, overrides after the command line's)
    "madistill": ("madistill", []),
    "madistill-no-bootstrap": ("madistill", ["teacher.bootstrap_truncated=false"]),
    "sb3-bootstrap": ("sb3", ["teacher.bootstrap_truncated=true"]),
    "sb3": ("sb3", ["teacher.bootstrap_truncated=false"]),
    "sb3-unit": ("sb3-unit", ["teacher.bootstrap_truncated=false"]),
    "madistill-recipe": ("madistill", ["+experiment=spread_continuous"]),  # conf/experiment/spread_continuous.yaml
}


class _CurveLogger(TBLogger):
    """Keeps the training curve (episodic team return per rollout) in memory; writes nothing."""

    def __init__(self) -> None:
        super().__init__(".", enabled=False)
        self.curve: Curve = []

    def scalar(self, tag: str, value: float, step: int) -> None:
        if tag == "charts/episodic_return":
            self.curve.append((step, float(value)))


def train_madistill(cfg: DictConfig) -> tuple[TeamPolicy, Curve]:
    """A madistill teacher trained as ``madistill train`` does, and its training curve."""
    seed_everything(cfg.seed, cfg.torch_threads)
    spec = env_spec(cfg.env)
    tb = _CurveLogger()
    with (make_vec_env(cfg.env, spec) as venv, tempfile.TemporaryDirectory() as tmp,
          TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb) as trainer):
        team = trainer.train(Path(tmp))
    return team, tb.curve


class _TimeLimitFlags(VecEnvWrapper):
    """Marks the ends at the time limit as truncations (``TimeLimit.truncated``), as a Gymnasium ``TimeLimit``
    would, so SB3 bootstraps them from the critic; SuperSuit reports every end as a plain ``done``."""

    def __init__(self, venv: Any, max_cycles: int):
        super().__init__(venv)
        self.max_cycles = max_cycles
        self.t = np.zeros(venv.num_envs, dtype=np.int64)

    def reset(self) -> Any:
        self.t[:] = 0
        return self.venv.reset()

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        self.t += 1
        ended = np.asarray(dones, dtype=bool)  # SuperSuit's dones are uint8
        for i in np.flatnonzero(ended):
            infos[i]["TimeLimit.truncated"] = bool(self.t[i] >= self.max_cycles)
        self.t[ended] = 0
        return obs, rewards, dones, infos


class _UnitActions(VecEnvWrapper):
    """Presents the env's Box actions as [-1, 1] per dimension and sends them rescaled affinely to the box, as
    madistill's ``box_actions: unit`` convention does (SB3 clips its samples to this [-1, 1] space first)."""

    def __init__(self, venv: Any):
        self.low, self.high = venv.action_space.low, venv.action_space.high
        unit = gym.spaces.Box(-1.0, 1.0, venv.action_space.shape, np.float32)
        super().__init__(venv, action_space=unit)

    def step_async(self, actions: np.ndarray) -> None:
        self.venv.step_async(self.low + (np.clip(actions, -1.0, 1.0) + 1.0) * (0.5 * (self.high - self.low)))

    def reset(self) -> Any:
        return self.venv.reset()

    def step_wait(self) -> Any:
        return self.venv.step_wait()


class _InBoxUnits(Policy):
    """A policy acting in [-1, 1] (``_UnitActions``) as one acting in the box's units, for madistill's evaluator: its
    Gaussian under the same affine map, which takes clipping to [-1, 1] onto the evaluator's clipping to the box,
    so greedy and sampled actions reach the env as they did in training."""

    def __init__(self, inner: Policy):
        super().__init__()
        self.group, self.inner = inner.group, inner
        space = inner.group.action_space
        self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32))
        self.register_buffer("half_width", torch.as_tensor((space.high - space.low) / 2, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.low + (self.inner(obs) + 1.0) * self.half_width

    def log_std(self) -> torch.Tensor | None:
        return self.inner.log_std() + self.half_width.log()


def train_sb3(cfg: DictConfig, unit: bool = False) -> tuple[TeamPolicy, Curve]:
    """SB3 PPO through SuperSuit with ``cfg``'s settings, as a madistill team (its policy and normaliser);
    ``unit``: acting in [-1, 1] rescaled to the box (``_UnitActions``), else in the env's raw box."""
    import supersuit as ss
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

    from madistill.envs.factory import make_env

    seed_everything(cfg.seed, cfg.torch_threads)
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec, num_envs=1) as probe:
        (group,) = probe.groups  # spread: one group of identical agents, as the tutorial's one shared policy
    env = ss.pettingzoo_env_to_vec_env_v1(make_env(spec))
    env = ss.concat_vec_envs_v1(env, int(cfg.env.num_envs), num_cpus=1, base_class="stable_baselines3")
    env.seed = lambda seed=None: [None] * env.num_envs  # SuperSuit's vec env lacks seed(); SB3 calls it
    if unit:
        env = _UnitActions(env)
    if cfg.teacher.bootstrap_truncated:
        env = _TimeLimitFlags(env, int(cfg.env.kwargs.max_cycles))
    env = VecMonitor(env)
    normalize = bool(cfg.teacher.normalize_obs)
    if normalize:
        env = VecNormalize(env, norm_obs=True, norm_reward=False, clip_obs=10.0, epsilon=1e-8, gamma=cfg.teacher.ppo.gamma)
    arch = {"hidden_sizes": list(cfg.teacher.hidden_sizes), "activation": cfg.teacher.activation}
    # SB3's own PPO, so the settings it takes: madistill's update options (teacher.ppo.fast_update, ...) are not its
    accepted = inspect.signature(PPO.__init__).parameters
    ppo = {k: v for k, v in OmegaConf.to_container(cfg.teacher.ppo).items() if k in accepted}
    model = PPO("MlpPolicy", env, policy_kwargs=policy_kwargs(group, arch), seed=cfg.seed, device="cpu", **ppo)
    curve = TeamReturnCurve()  # SB3's window of 100 agent-episodes: all from the last rollout, which ends more
    model.learn(total_timesteps=int(cfg.teacher.total_agent_steps), callback=curve)
    normalizer = ObsNormalizer(group.obs_dim, enabled=normalize)
    if normalize:
        normalizer.mean, normalizer.var = env.obs_rms.mean.astype(np.float64), env.obs_rms.var.astype(np.float64)
    env.close()
    policy: Policy = SB3Policy(group, model.policy, arch)
    team = TeamPolicy([group], {group.name: _InBoxUnits(policy) if unit else policy}, {group.name: normalizer})
    return team, curve.curve


def evaluate(cfg: DictConfig, team: TeamPolicy, episodes: int, seed: int, greedy: bool = True) -> dict[str, Any]:
    """Mean team return over ``episodes`` seeded episodes, with its 95% bootstrap CI, and every episode's; and per
    action component, the share of acting steps whose Gaussian mean lies more than 2 stds outside the box
    (``saturated``): there nearly every sample is clipped to the same bound, so the component has no effect
    that PPO could credit and its mean gets no signal back into the box (none for a random team)."""
    team.eval()
    outside: list[torch.Tensor] = []

    def record(tr: Transition) -> None:
        for g in team.groups:
            dist, space = tr.dists[g.name], g.action_space
            if isinstance(dist, torch.distributions.Normal):
                low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
                beyond = (dist.loc < low - 2 * dist.scale) | (dist.loc > high + 2 * dist.scale)
                outside.append(beyond[tr.active[g.name].reshape(-1)].float())

    with make_vec_env(cfg.env, num_envs=10, num_workers=0) as venv:
        records = Rollout(venv, team, deterministic=greedy, seed=seed).run(episodes=episodes, on_step=record)
    s = summarize(records, seed=0)["team"]
    saturated = torch.cat(outside).mean(0).tolist() if outside else []
    return {"mean": s["mean"], "mean_ci": s["mean_ci"], "returns": [r.team_return for r in records],
            "saturated": saturated}


def pooled(runs: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    """Mean over every seed's episodes, with a 95% bootstrap CI stratified by seed."""
    returns = [x for row in runs.values() for x in row[key]["returns"]]
    strata = [seed for seed, row in runs.items() for _ in row[key]["returns"]]
    s = summarize_scores(np.array(returns), 2000, 0.95, 0, np.array(strata))
    return {"mean": s["mean"], "mean_ci": s["mean_ci"], "seeds": len(runs)}


def mean_curve(curves: list[Curve]) -> Curve:
    """The seeds' training curves averaged point by point (they log at the same agent-steps)."""
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], float(np.mean([c[i][1] for c in curves]))) for i in range(n)]


def write(results: dict[str, Any], tag: str) -> Path:
    """The results JSON and the figure of each variant's training curve (mean over its seeds)."""
    dest = Path(__file__).parent / "results"
    dest.mkdir(exist_ok=True)
    stem = dest / ("continuous_actions" + (f"_{tag}" if tag else ""))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    curves = {f"{name} ({len(runs)} seeds)": mean_curve([row["curve"] for row in runs.values()])
              for name, runs in results["runs"].items()}
    fig = plot_curves(curves, results["random"]["mean"], f"continuous simple_spread_v3, {results['steps']} agent-steps")
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    return stem


def run_one(seed: int, name: str, steps: int, overrides: list[str], episodes: int, eval_seed: int) -> dict[str, Any]:
    """One variant trained at one seed and evaluated (greedy and sampled); with its composed teacher settings."""
    torch.set_num_threads(1)
    trainer, extra = VARIANTS[name]
    cfg = compose_config([*ENV, f"seed={seed}", f"teacher.total_agent_steps={steps}", *overrides, *extra])
    trainers = {"madistill": train_madistill, "sb3": train_sb3, "sb3-unit": partial(train_sb3, unit=True)}
    t0 = time.perf_counter()
    team, curve = trainers[trainer](cfg)
    return {"greedy": evaluate(cfg, team, episodes, eval_seed),
            "sampled": evaluate(cfg, team, episodes, eval_seed, greedy=False),
            "train_seconds": time.perf_counter() - t0, "curve": curve, "settings": OmegaConf.to_container(cfg.teacher)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000, help="agent-steps per training run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--eval-seed", type=int, default=10_000)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    ap.add_argument("--tag", default="", help="suffix of the results files")
    ap.add_argument("overrides", nargs="*", help="madistill config overrides for every variant (after --)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"steps": args.steps, "overrides": args.overrides, "command": " ".join(sys.argv),
                               "settings": {}, "runs": {}}
    cfg = compose_config([*ENV, *args.overrides])
    with make_vec_env(cfg.env, num_envs=1) as venv:
        results["random"] = evaluate(cfg, uniform_team(venv), args.episodes, args.eval_seed, greedy=False)
    runs = [(seed, name) for seed in args.seeds for name in args.variants]
    # each run in a fresh interpreter (spawned, one run per process), so its numbers do not depend on --jobs
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_one, seed, name, args.steps, args.overrides, args.episodes, args.eval_seed): (seed, name)
                   for seed, name in runs}
        for future in as_completed(futures):
            seed, name = futures[future]
            row = future.result()
            results["settings"][name] = row.pop("settings")
            results["runs"].setdefault(name, {})[str(seed)] = row
            g, s, curve = row["greedy"], row["sampled"], row["curve"]
            print(f"seed {seed} {name:<24} greedy {g['mean']:7.2f} [{g['mean_ci'][0]:.2f}, {g['mean_ci'][1]:.2f}]"
                  f"  sampled {s['mean']:7.2f}  last training return {curve[-1][1]:7.2f}  saturated {np.mean(g['saturated']):.2f}"
                  f"  ({row['train_seconds']:.0f} s)",
                  flush=True)
            stem = write(results, args.tag)  # after every run: a stopped sweep keeps what it finished
    # the order of the command line, whatever order the runs finished in
    results["runs"] = {name: {str(seed): results["runs"][name][str(seed)] for seed in args.seeds} for name in args.variants}
    r = results["random"]
    print(f"uniform random {r['mean']:.2f} [{r['mean_ci'][0]:.2f}, {r['mean_ci'][1]:.2f}]; over all seeds:")
    results["pooled"] = {}
    for name, runs_of in results["runs"].items():
        results["pooled"][name] = p = {"greedy": pooled(runs_of, "greedy"), "sampled": pooled(runs_of, "sampled")}
        g, s = p["greedy"], p["sampled"]
        print(f"{name:<24} greedy {g['mean']:7.2f} [{g['mean_ci'][0]:.2f}, {g['mean_ci'][1]:.2f}]"
              f"  sampled {s['mean']:7.2f} [{s['mean_ci'][0]:.2f}, {s['mean_ci'][1]:.2f}]")
    write(results, args.tag)
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
