"""``madistill explain``: attribution methods of saved policies, scored by explanation-quality metrics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from madistill.stages.registry import Stage

if TYPE_CHECKING:
    from omegaconf import DictConfig


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Every attribution method of ``explain.methods`` on every saved policy under ``explain.policy``,
    scored by the explanation-quality metrics (docs/explain.md), on observations from ``explain.obs`` (.npz) or
    from greedy episodes of the teacher (else the first policy).

    Writes ``reports/explain.{json,md}``, ``reports/explain.npz`` (observations and maps), deletion/insertion
    curves and heatmaps (PNG and TensorBoard).
    """

    import numpy as np
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from madistill.attacks.budget import group_budgets
    from madistill.attacks.robustness import suite_attack
    from madistill.common.io import atomic_write_text, strict_json
    from madistill.explain.evaluation import (
        curves_figure,
        display_maps,
        markdown_table,
        score_methods,
        summarise,
    )
    from madistill.explain.report import mean_heatmap, save_arrays
    from madistill.runtime import make_vec_env
    from madistill.stages.faults import configured_faults, fault_line, fault_meta
    from madistill.stages.observations import explained_observations
    from madistill.stages.policies import labelled_teams, studied_policies, teams_for
    from madistill.stages.rundir import open_tb, tensorboard_line

    ec = cfg.explain
    settings = OmegaConf.to_object(ec)
    methods = [str(m) for m in ec.methods]  # the config's enum checked the names
    device, refs, spec = studied_policies(
        cfg, ec.policy, "no policy to explain: pass explain.policy=<run or policy directory>"
    )
    with make_vec_env(cfg.env, spec) as venv:
        labels, teams, layouts = labelled_teams(cfg, spec, venv, refs, device)
        _check_mlp_needs(teams, methods, bool(ec.randomisation))
        source = next((label for label, r in zip(labels, refs) if r.name == "teacher"), labels[0])
        faults = configured_faults(cfg, venv, spec, device, teams_for(cfg, venv, refs))
        raw = explained_observations(cfg, venv, teams[source], ec.obs, ec.episodes, faults)
    # evenly spaced over the episodes, so that every part of them is explained
    raw = {g: x[np.unique(np.linspace(0, len(x) - 1, min(len(x), ec.max_observations)).round().astype(int))]
           for g, x in raw.items()}
    attack = None if ec.attack is None else suite_attack(ec.attack, cfg.attack)
    budgets = {eps: group_budgets(eps, layouts, cfg.attack.exclude, device, cfg.attack.scale) for eps in cfg.attack.eps}
    summaries: dict[str, dict[str, dict]] = {}
    maps: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    jobs = [(label, g) for label in labels for g in layouts]
    for label, g in tqdm(jobs, desc="explain", disable=not cfg.logger.progress):
        team = teams[label]
        x = team.normalizers[g].normalize(raw[g].to(device))
        scores, group_maps = score_methods(team[g], x, layouts[g], methods, settings, ec.target, attack,
                                           {eps: b[g] for eps, b in budgets.items()}, cfg.seed)
        summaries.setdefault(label, {})[g] = summarise([scores], ec.n_boot, cfg.seed, ec.randomisation_tolerance)
        maps.setdefault(label, {})[g] = display_maps(group_maps)
    reports = run_dir / "reports"
    middle = sorted(cfg.attack.eps)[len(cfg.attack.eps) // 2] if attack is not None and len(cfg.attack.eps) else None
    tables = [f"## {g}\n\n" + markdown_table({label: summaries[label][g] for label in labels}, middle) for g in layouts]
    box = [g.name for g in venv.groups if not g.discrete]
    explained = (f"maps explain the {ec.target} of the chosen action, deletion/insertion read its probability"
                 + (f" (Box actions, {', '.join(box)}: the action mean summed over its components, for both)" if box
                    else ""))
    played = f" {fault_line(cfg)}" if cfg.fault.victims and not ec.obs else ""  # the episodes it collected
    text = (f"# Explanation quality: {spec.id}\n\nMeans over {', '.join(f'{len(x)} {g}' for g, x in raw.items())} "
            f"observations with {ec.n_boot}-resample bootstrap 95% CIs; {explained}; (OOD): share of masked inputs "
            f"beyond {ec.ood_k} stds.{played}\n\n" + "\n\n".join(tables) + "\n")
    result = {
        "meta": {"policies": {label: str(r.path) for label, r in zip(labels, refs)}, "observations_from": source,
                 "env": spec.to_dict(), "observations": {g: len(x) for g, x in raw.items()},
                 "explain": OmegaConf.to_container(ec), "attack_eps": list(cfg.attack.eps),
                 "fault": None if ec.obs else fault_meta(cfg)},
        "results": summaries,
    }
    atomic_write_text(reports / "explain.json", strict_json(result))
    atomic_write_text(reports / "explain.md", text)
    save_arrays(reports / "explain.npz", maps, raw)
    with open_tb(cfg, run_dir) as tb:
        tb.text("explain/table", text)
        if cfg.logger.figures:
            for g, layout in layouts.items():
                tb.figure(f"explain/{g}_maps", mean_heatmap(maps, g, layout, f"{spec.id}: {g} (|map|, max 1)", methods))
                for label in labels:
                    tb.figure(f"explain/{g}_{label}_curves", curves_figure(summaries[label][g], f"{label}: {g}"))
    figures = f"  figures: {reports}/explain_*.png\n" if cfg.logger.figures else ""
    print(f"\n{text}\n  report:  {reports / 'explain.md'}\n  summary: {reports / 'explain.json'}\n"
          f"  maps:    {reports / 'explain.npz'}\n{figures}  {tensorboard_line(cfg, run_dir)}")
    return result


def _check_mlp_needs(teams: dict, methods: list[str], randomisation: bool) -> None:
    """Before any episode: the parts of the stage that walk a policy's layers (relevance propagation, the
    randomisation check) need MLP policies; one line names every setting to change for those that are not."""
    from madistill.errors import MadistillError
    from madistill.policies.path import acting_path

    needs = [(what, fix) for what, fix, wanted in (
        ("relevance propagation (lrp)", "drop lrp from explain.methods", "lrp" in methods),
        ("the randomisation check", "set explain.randomisation=false", randomisation)) if wanted]
    if not needs:
        return
    for team in teams.values():
        for g in team.groups:
            try:
                acting_path(team[g.name], "", "")
            except MadistillError:
                raise MadistillError(f"{' and '.join(w for w, _ in needs)} need MLP policies, and the {g.name!r} "
                                     f"policy ({type(team[g.name]).__name__}) is not one: "
                                     f"{' and '.join(f for _, f in needs)}") from None


STAGE = Stage(
    name="explain",
    run=run,
    summary="attribution methods and their quality metrics for saved policies (explain.policy=<run or policy dir>)",
    sections=("explain", "fault", "purify"),
    writes="reports/explain.{json,md,npz}, deletion/insertion curves and heatmaps",
    examples=("madistill explain explain.policy=<run>",
              "madistill explain explain.policy=<run> \"explain.methods=[gradient,integrated_gradients]\" explain.attack=null"),
    policy_key="explain.policy",
)
