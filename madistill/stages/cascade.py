"""``madistill cascade``: inject a fault into one agent of a saved team and measure how it propagates."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from madistill.stages.registry import Stage

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from madistill.cascade.monitor import CascadeStudy
    from madistill.tb import TBLogger


def impulse_config(name: str) -> Any:
    """The FaultConfig of ``cascade.impulse``: its conf/fault/ file (one line naming the choices when none)."""
    from omegaconf import OmegaConf

    from madistill.cascade.monitor import fault_config
    from madistill.config import config_dir
    from madistill.errors import MadistillError

    path = Path(config_dir(), "fault", f"{name}.yaml")
    if not path.exists():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise MadistillError(f"cascade.impulse={name!r} is no fault in conf/fault/: use one of {names}")
    return fault_config(OmegaConf.load(path))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Paired clean and faulted rollouts of every saved policy under ``cascade.policy``: the influence matrix of
    one-step impulses on each agent and the cascades of the studied fault (``fault=<name>``, ``fault.victims``).
    Writes ``reports/cascade.{json,md}``, influence heatmaps per lag, the influence graph and a timeline per
    studied fault (PNG and TensorBoard images), and TensorBoard scalars."""

    from madistill.cascade.monitor import studied_faults, study
    from madistill.cascade.report import compare, comparison, markdown
    from madistill.common.io import atomic_write_text, strict_json
    from madistill.envs.features import feature_layouts
    from madistill.evaluate.report import write_markdown
    from madistill.runtime import make_vec_env
    from madistill.stages.faults import fault_env
    from madistill.stages.monitoring import (
        alerts_line,
        alerts_markdown,
        check_alerts,
        log_alerts,
        watch_policy,
        write_alerts,
    )
    from madistill.stages.policies import (
        configured_features,
        configured_purifier,
        load_policy,
        policy_labels,
        purifier_line,
        purifier_meta,
        studied_policies,
        teams_for,
    )
    from madistill.stages.rundir import open_tb, tensorboard_line

    cc, fc = cfg.cascade, cfg.fault
    impulse = impulse_config(cc.impulse)
    device, refs, spec = studied_policies(cfg, cc.policy, "no policy to study: pass cascade.policy=<run or policy directory>",
                                          add_teachers=False)

    def make_venv(n: int, period: int) -> Any:
        return make_vec_env(cfg.env, spec, num_envs=n, seed_period=period)

    with make_vec_env(cfg.env, spec, num_envs=1, num_workers=0) as venv:
        groups = venv.groups
        layouts = feature_layouts(groups, configured_features(cfg, spec), venv.feature_names, cfg.saliency.image_patch)
        teams = teams_for(cfg, venv, refs)
    env = fault_env(cfg, groups, layouts, spec, device, teams)
    agents = [a for g in groups for a in g.agents]
    if cfg.alerts.enabled:
        check_alerts(cfg, len(agents))
    studies, alerts = {}, {}
    purifier = configured_purifier(cfg, device)
    labels = policy_labels(refs)
    for ref, label in zip(refs, labels):
        team = load_policy(ref, groups, device, purifier, cfg.seed)
        studies[label] = study(make_venv, team, env, cc, fc, impulse, spec.id,
                               f"cascade {label}" if cfg.logger.progress else None)
        if cfg.alerts.enabled:  # the study's faults are armed on its paired run's blocks: fresh ones here
            watched = [(sf.label, sf.fault) for sf in studied_faults(fc, env, agents)]
            with make_vec_env(cfg.env, spec) as venv:
                alerts[label] = watch_policy(cfg, venv, make_venv, team, watched, int(cc.episodes), int(cc.seed),
                                             bool(cc.deterministic), studies[label].threshold)
    results = {label: s.to_dict(int(cc.n_boot), float(cc.confidence)) for label, s in studies.items()}
    first = next(iter(results))
    # keyed by the reports' labels (name@run from several runs), so a sweep's policies of one name stay apart
    paths = {label: str(r.path) for r, label in zip(refs, labels)}
    compared = compare(results, int(cc.n_boot), float(cc.confidence)) if len(results) > 1 else None
    payload = {"meta": {"env": spec.to_dict(), "policies": paths, "episodes": cc.episodes,
                        "seed": cc.seed, "policy": first, "purifier": purifier_meta(cfg)}, **results[first],
               "policies": results,
               **({"comparison": compared} if compared else {})}
    reports = run_dir / "reports"
    atomic_write_text(reports / "cascade.json", strict_json(payload))
    text = "\n".join([*(markdown(r, spec.id, label, int(cc.episodes), bool(cc.deterministic)) for label, r in results.items()),
                      *([comparison(compared)] if compared else []),
                      *([alerts_markdown(alerts, cfg)] if alerts else []),
                      *([purifier_line(cfg) + "\n"] if cfg.purify.purifier else [])])
    write_markdown(reports / "cascade.md", text)
    if alerts:
        write_alerts(reports, cfg, int(cc.episodes), int(cc.seed), alerts)
    with open_tb(cfg, run_dir) as tb:
        tb.text("cascade/report", text)
        log_alerts(tb, "cascade", alerts)
        for label, s in studies.items():
            _log_study(tb, label, s, results[label], cfg.logger.figures)
    lines = ["", f"Cascade study on {spec.id} ({cc.episodes} paired episodes):"]
    for label, r in results.items():
        edges = ", ".join(f"{a}->{b}" for a, b, _ in r["edges"]) or "none"
        lines.append(f"  {label:<8} lag-1 influence graph: {edges}")
        if r["threshold"] > float(cc.threshold):  # a cascade size of 0 then may be the floor's doing, not the policy's
            why = ("the sampling noise floor of clean twins (cascade.deterministic=true compares greedy twins, "
                   "which have none)" if r["threshold"] == r["noise_floor"] else "the replay check's deviation")
            lines.append(f"  {label:<8} failure threshold TV > {r['threshold']:.3g}: cascade.threshold="
                         f"{float(cc.threshold):g} raised to {why}")
        for label_f, f in r["faults"].items():
            c = f["cascade"]
            lines.append(f"  {label:<8} {label_f}: cascade size {c['size_mean']:.2f} [{c['size_ci'][0]:.2f}, "
                         f"{c['size_ci'][1]:.2f}], representative order {c['representative_order']}")
    if cfg.purify.purifier:
        lines.append(f"  {purifier_line(cfg)}")
    if alerts:
        lines.append(f"  {alerts_line(reports)}")
    lines += [f"  report:      {reports / 'cascade.md'}", f"  {tensorboard_line(cfg, run_dir)}"]
    print("\n".join(lines))
    return payload


def _log_study(tb: TBLogger, label: str, s: CascadeStudy, result: dict, figures: bool) -> None:
    """One policy's study in TensorBoard: influence over the lag, cascade size and TV over the episode step per
    fault, and (``figures``) the heatmaps, graph and timelines."""
    from madistill.cascade.report import graph, heatmaps, timeline

    inf = s.influence
    for i, src in enumerate(inf.agents):
        for j, dst in enumerate(inf.agents):
            for k in range(inf.lags) if i != j else ():
                tb.scalar(f"cascade/{label}/influence/{src}->{dst}", float(inf.effect[i, j, k]), k + 1)
    for label_f, r in result["faults"].items():
        tb.scalar(f"cascade/{label}/{label_f}/size", r["cascade"]["size_mean"], 0)
        for agent, dev in r["deviation"]["agents"].items():
            for t, v in enumerate(dev["tv"]):
                if v is not None:
                    tb.scalar(f"cascade/{label}/{label_f}/tv/{agent}", v, t)
    if figures:
        tb.figure(f"cascade/{label}/influence", heatmaps(s, label))
        tb.figure(f"cascade/{label}/graph", graph(s, label))
        for i, sf in enumerate(s.faults):
            tb.figure(f"cascade/{label}/timeline_{sf.label}", timeline(s, i, label))


STAGE = Stage(
    name="cascade",
    run=run,
    summary="inject a fault into agents of saved policies and measure its cascade (cascade.policy=<run or policy dir>)",
    sections=("cascade", "fault", "alerts", "purify"),
    writes="reports/cascade.{json,md}, influence heatmaps, graph and timelines, alerts.json (alerts.enabled)",
    examples=("madistill cascade cascade.policy=<run>", "madistill cascade cascade.policy=<run> fault=stuck "
              "fault.victims=[listener_0] fault.onset=5"),
    policy_key="cascade.policy",
    faults_each_agent=True,
)
