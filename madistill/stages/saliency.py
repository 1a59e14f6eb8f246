"""``madistill saliency``: perturbation and gradient saliency of saved policies, and their agreement."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from madistill.stages.registry import Stage

if TYPE_CHECKING:
    from omegaconf import DictConfig


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Perturbation and gradient saliency of every saved policy under ``saliency.policy``, on observations from
    ``saliency.obs`` (.npz) or from greedy episodes of the teacher (else the first policy).

    Writes ``reports/saliency.json`` (mean saliency per feature group, agreement with the teacher),
    ``reports/saliency.npz`` (observations and maps) and heatmaps (PNG and TensorBoard).
    """
    import json

    from omegaconf import OmegaConf

    from madistill.common.io import atomic_write_text
    from madistill.explain.metrics import overlap_k
    from madistill.explain.report import (
        agreement_table,
        mean_heatmap,
        mean_saliency,
        per_observation_heatmaps,
        saliency_maps,
        save_arrays,
    )
    from madistill.explain.saliency import SaliencyLabeller
    from madistill.runtime import make_vec_env
    from madistill.stages.faults import configured_faults
    from madistill.stages.observations import explained_observations
    from madistill.stages.policies import labelled_teams, paired_policy, studied_policies, teams_for
    from madistill.stages.rundir import open_tb, tensorboard_line

    sc = cfg.saliency
    device, refs, spec = studied_policies(
        cfg, sc.policy, "no policy to explain: pass saliency.policy=<run or policy directory>"
    )
    with make_vec_env(cfg.env, spec) as venv:
        labels, teams, layouts = labelled_teams(cfg, spec, venv, refs, device)
        own_reference = {}  # each policy's teacher (a teacher, or a policy without one, is its own)
        for label, ref in zip(labels, refs):
            i = None if ref.name == "teacher" else paired_policy(ref, "teacher", refs)
            own_reference[label] = label if i is None else labels[i]
        reference = own_reference[labels[0]]  # whose episodes give the observations
        faults = configured_faults(cfg, venv, spec, device, teams_for(cfg, venv, refs))
        raw = explained_observations(cfg, venv, teams[reference], sc.obs, sc.episodes, faults)
    labeller = SaliencyLabeller.from_config(sc, layouts, cfg.seed)
    maps = saliency_maps(teams, raw, layouts, labeller, sc.target)
    table = agreement_table(maps, own_reference, sc.topk)
    reports = run_dir / "reports"
    result = {
        "meta": {"policies": {label: str(r.path) for label, r in zip(labels, refs)}, "references": own_reference,
                 "observations_from": reference, "env": spec.to_dict(),
                 "observations": {g: len(x) for g, x in raw.items()}, "saliency": OmegaConf.to_container(sc)},
        "agreement_with_reference_perturbation": table,
        "mean_saliency": mean_saliency(maps, layouts),
    }
    atomic_write_text(reports / "saliency.json", json.dumps(result, indent=2))
    save_arrays(reports / "saliency.npz", maps, raw)
    # top-k: k is saliency.topk, capped below a group's number of feature groups (overlap_k)
    lines = ["| policy | group | Spearman | top-k overlap (k) | Gini |", "|---|---|---|---|---|"]
    for name, groups in table.items():
        for g, a in groups.items():
            k = overlap_k(int(sc.topk), len(layouts[g].names))
            lines.append(f"| {name} | {g} | {a['spearman']:.3f} | {a['topk']:.3f} ({k}) | {a['gini']:.3f} |")
    text = "\n".join(lines)
    with open_tb(cfg, run_dir) as tb:
        tb.text("saliency/agreement", text)
        if cfg.logger.figures:
            for g, layout in layouts.items():
                tb.figure(f"saliency/{g}", mean_heatmap(maps, g, layout, f"{spec.id}: {g}"))
                tb.figure(f"saliency/{g}_per_obs", per_observation_heatmaps(maps, g, layout, sc.rows))
    figures = f"  figures: {reports}/saliency_<group>.png\n" if cfg.logger.figures else ""
    print(f"\nGradient saliency vs its teacher's perturbation saliency (per observation, averaged):\n{text}\n"
          f"  maps:    {reports / 'saliency.npz'}\n  summary: {reports / 'saliency.json'}\n"
          f"{figures}  {tensorboard_line(cfg, run_dir)}")
    return result


STAGE = Stage(
    name="saliency",
    run=run,
    summary="saliency maps and figures for saved policies (saliency.policy=<run or policy dir>)",
    sections=("saliency", "fault", "purify"),
    writes="reports/saliency.{json,npz} and heatmaps",
    examples=("madistill saliency saliency.policy=<run>",),
    policy_key="saliency.policy",
)
