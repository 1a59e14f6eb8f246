"""``madistill purify``: train a purifier (a denoiser per agent group) on a teacher's clean observations; any
stage then puts it in front of the policies it loads with ``purify.purifier=<this run>``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from madistill.config import ConfigSection, PurifyConfig
from madistill.stages.registry import Stage

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from madistill.policies.purified import Denoiser


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Collect the teacher's clean observations, train one denoiser per group on them, save ``purifier/`` and
    report held-out reconstruction errors and the clean return with and without the purifier."""
    import json

    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from madistill.common.collect import collect_round
    from madistill.common.episodes import team_returns
    from madistill.common.io import atomic_write_text
    from madistill.errors import MadistillError
    from madistill.evaluate.evaluator import PolicyRef, run_episodes
    from madistill.evaluate.report import write_markdown
    from madistill.evaluate.stats import bootstrap_ci
    from madistill.policies.purified import Purifier, purified_team, train_denoiser
    from madistill.policies.store import load_team, save_purifier
    from madistill.runtime import make_vec_env, resolve_device, seed_everything
    from madistill.seeds import purify_seed
    from madistill.stages.policies import env_for, teacher_dir
    from madistill.stages.rundir import open_tb

    pc = cfg.purify
    if not pc.teacher:
        raise MadistillError("no teacher to learn clean observations from: pass purify.teacher=<teacher run or policy dir>")
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    tdir = teacher_dir(pc.teacher)
    spec = env_for(cfg, [PolicyRef(tdir.name, tdir, "teacher")])
    arch = {"hidden_sizes": list(pc.hidden_sizes), "activation": str(pc.activation), "noise": float(pc.noise),
            "clip": bool(pc.clip)}
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    report: dict = {"groups": {}}
    with make_vec_env(cfg.env, spec) as venv, open_tb(cfg, run_dir) as tb:
        teacher, _ = load_team(tdir, venv.groups, device=device)
        raw, _ = collect_round(venv, teacher, purify_seed(cfg.seed), pc.deterministic, agent_steps=pc.agent_steps)
        denoisers = {}
        for g in venv.groups:
            x = teacher.normalizers[g.name].normalize(raw[g.name].to(device).float())
            x = x[torch.randperm(len(x), generator=gen, device=device)]
            held = max(1, int(pc.validation * len(x)))

            def log(epoch: int, loss: float, name: str = g.name) -> None:
                tb.scalar(f"purify/{name}/train_mse", loss, epoch)

            denoisers[g.name] = train_denoiser(x[held:], arch, pc.eps, pc.sign_share, pc.epochs, pc.batch_size,
                                               pc.learning_rate, gen, log)
            report["groups"][g.name] = {"observations": len(x) - held, "held_out": held,
                                        **_errors(denoisers[g.name], x[:held], sorted({0.0, *map(float, cfg.attack.eps)}), gen)}
        purifier = Purifier(denoisers, teacher.normalizers)
        config = OmegaConf.to_container(cfg, resolve=True)
        config["purify"]["teacher"] = str(tdir.resolve())
        pdir = save_purifier(run_dir / "purifier", purifier, spec, config=config,
                             training={"agent_steps": sum(len(v) for v in raw.values()), "epochs": pc.epochs})
        clean = {}
        for name, team in (("teacher", teacher), ("teacher+purifier", purified_team(teacher, purifier, cfg.seed))):
            recs = run_episodes(venv, team, pc.episodes, cfg.eval.seed)
            clean[name] = {"mean": team_returns(recs),
                           "ci": bootstrap_ci(np.array([r.team_return for r in recs]), np.mean, n_boot=cfg.eval.n_boot,
                                              seed=cfg.seed)}
            tb.scalar(f"purify/clean_return/{name}", clean[name]["mean"], 0)
        report["clean"] = clean
    report["meta"] = {"teacher": str(tdir), "purifier": str(pdir), "env": spec.id, "episodes": pc.episodes,
                      "eval_seed": cfg.eval.seed, "purify": OmegaConf.to_container(pc, resolve=True)}
    reports = run_dir / "reports"
    atomic_write_text(reports / "purify.json", json.dumps(report, indent=2))
    text = _markdown(report)
    write_markdown(reports / "purify.md", text)
    print(f"\n{text}\n  purifier: {pdir}\n  use it: madistill attack attack.policy={tdir} purify.purifier={run_dir} "
          f"(purify.gradient=bpda|ignore, purify.eot_samples=N for the other attack views)")
    return report


def _errors(den: Denoiser, x: torch.Tensor, radii: list[float], gen: torch.Generator) -> dict:
    """Held-out reconstruction: per radius, the mean l_inf distance to the clean ``x`` of perturbations at random
    corners of the ball (the attacks' favourite points), before and after purification."""
    import torch

    out = {}
    with torch.no_grad():
        for r in radii:
            noisy = x + r * (torch.randint(0, 2, x.shape, generator=gen, device=x.device).to(x) * 2 - 1)
            out[f"{r:g}"] = {"before": float((noisy - x).abs().amax(-1).mean()),
                             "after": float((den(noisy, gen) - x).abs().amax(-1).mean())}
    return {"linf_error": out}


def _markdown(report: dict) -> str:
    """The report: reconstruction errors per group and radius, and the clean returns."""
    lines = [f"# Purifier for {report['meta']['teacher']} on {report['meta']['env']}", "",
             "Held-out clean observations perturbed at a random corner of the l_inf ball of each radius: mean l_inf "
             "distance to the clean observation before / after purification (normalised units).", "",
             "| group | " + " | ".join(f"radius {r}" for r in next(iter(report["groups"].values()))["linf_error"]) + " |",
             "|---|" + "---|" * len(next(iter(report["groups"].values()))["linf_error"])]
    for g, rep in report["groups"].items():
        lines.append(f"| {g} | " + " | ".join(f"{e['before']:.3f} / {e['after']:.3f}" for e in rep["linf_error"].values())
                     + " |")
    lines += ["", f"Clean team return over {report['meta']['episodes']} episodes (eval seeds "
              f"{report['meta']['eval_seed']}...), mean [95% CI]:", ""]
    lines += [f"- {name}: {c['mean']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" for name, c in report["clean"].items()]
    return "\n".join(lines)


STAGE = Stage(
    name="purify",
    run=run,
    summary="train a purifier on a teacher's clean observations (purify.teacher=<run>); put it in front of any policy "
            "with purify.purifier=<purify run>",
    sections=("purify",),
    writes="purifier/ (purifier.json + <group>.safetensors), reports/purify.{json,md}",
    examples=("madistill purify purify.teacher=<teacher run>",
              "madistill purify purify=randomized purify.teacher=<teacher run>",
              "madistill attack attack.policy=<run> purify.purifier=<purify run> purify.gradient=bpda"),
    policy_key="purify.teacher",
    adds=(ConfigSection("purify", PurifyConfig),),
)
