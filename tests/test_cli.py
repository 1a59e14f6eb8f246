"""The command line: stages, pipeline outputs, determinism of evaluate, one-line errors with exit code 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, call_cli, tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from madistill.errors import MadistillError
from madistill.policies.store import read_manifest

SL_TINY = tiny("env=simple_speaker_listener_v4", "teacher.total_agent_steps=200", "teacher.ppo.n_steps=50")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """``madistill pipeline`` on simple_speaker_listener_v4 with a tiny budget (run once for the module)."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = call_cli(["pipeline", *SL_TINY, f"hydra.run.dir={run_dir}"], mp)
    assert rc == 0, err.getvalue()
    return run_dir, out.getvalue()


def _err_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def _madistill_error(err: str, stage: str) -> str:
    lines = [ln for ln in _err_lines(err) if ln.startswith(f"madistill {stage}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ help and stages
@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_help_lists_the_stages(cli, args):
    rc, out, _ = cli(*args)
    assert rc == (0 if args else 2)  # no stage given is a usage error
    for stage in ("train", "evaluate", "distill", "saliency", "explain", "attack", "pipeline"):
        assert f"  {stage} " in out
    assert "usage: madistill <stage>" in out


@pytest.mark.parametrize("stage", ["train", "attack"])
def test_stage_help_says_what_the_stage_reads_and_writes(cli, stage):
    """``madistill <stage> --help``: the stage, what it writes, its settings with their presets, examples."""
    rc, out, _ = cli(stage, "--help")
    assert rc == 0
    assert out.startswith(f"madistill {stage}: ") and "examples:" in out and "in its run directory" in out
    presets = {"train": "teacher.*  [teacher=<ppo> in conf/teacher/]",
               "attack": "[attack=<quick, suite, thorough> in conf/attack/]"}
    assert presets[stage] in out


def test_unknown_stage_exits_2(cli):
    from madistill.stages.registry import stages

    rc, out, err = cli("distil", "env=relay")
    assert rc == 2 and out == ""
    assert _err_lines(err) == [
        f"madistill: error: unknown stage 'distil': did you mean 'distill'? use one of {', '.join(stages())}"
    ]


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "madistill", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "pipeline" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "madistill", "nope"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "unknown stage 'nope'" in proc.stderr


# ------------------------------------------------------------------ pipeline
def test_pipeline_writes_reports(pipeline_run):
    run_dir, _ = pipeline_run
    reports = run_dir / "reports"
    md = (reports / "eval.md").read_text()
    assert md.startswith("# Evaluation on simple_speaker_listener_v4")
    rows = [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows == ["Policy", "teacher", "student", "random"]
    assert "4 episodes per run, seeds 10000..10003" in md

    ev = json.loads((reports / "eval_teacher.json").read_text())
    assert ev["meta"]["policy"] == "teacher" and ev["meta"]["env"]["name"] == "simple_speaker_listener_v4"
    assert [e["seed"] for e in ev["episodes"]] == [10000, 10001, 10002, 10003]
    assert ev["summary"]["n_episodes"] == 4 and ev["summary"]["n_boot"] == 200
    assert set(ev["summary"]["agents"]) == {"speaker_0", "listener_0"}
    assert "teams" not in ev["summary"] and "teams" not in ev["meta"]  # cooperative: one team, as before
    rnd = json.loads((reports / "eval_random.json").read_text())
    assert rnd["meta"]["deterministic"] is False and ev["meta"]["deterministic"] is True

    marl = json.loads((reports / "marl_eval.json").read_text())
    algos = marl["pettingzoo"]["simple_speaker_listener_v4"]
    assert set(algos) == {"teacher", "student", "random"}
    for runs in algos.values():
        (run,) = runs.values()
        assert len(run["absolute_metrics"]["episode_return"]) == 4
        assert len(run["step_0"]["listener_0_return"]) == 4
    teacher_returns = [e["team_return"] for e in ev["episodes"]]
    assert next(iter(algos["teacher"].values()))["absolute_metrics"]["episode_return"] == pytest.approx(
        teacher_returns
    )

    teacher = run_dir / "policies" / "teacher"
    assert {p.name for p in teacher.iterdir()} >= {"manifest.json", "speaker.safetensors", "listener.zip"}
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_pipeline_prints_where_things_are(pipeline_run):
    run_dir, out = pipeline_run
    assert f"tensorboard --logdir {run_dir / 'tb'}" in out
    assert f"madistill evaluate eval.policy={run_dir}" in out
    assert "teacher    team return IQM" in out and "random     team return IQM" in out
    assert "student    team return IQM" in out
    assert "of the teacher's gain over random" in out or "retention: n/a (the teacher is no better than random" in out
    # retention comes from the means, which each line shows beside the IQM, and the report says it too
    means = {ln.split()[0]: float(ln.rsplit("mean ", 1)[1]) for ln in out.splitlines() if " team return IQM " in ln}
    kept = next((ln for ln in out.splitlines() if "of the teacher's gain over random" in ln), None)
    if kept is not None:
        share = (means["student"] - means["random"]) / (means["teacher"] - means["random"])
        assert f"keeps {100 * share:.1f}%" in kept or abs(float(kept.split("keeps ")[1].split("%")[0]) - 100 * share) < 0.5
        assert kept.strip()[0].upper() + kept.strip()[1:] + "." in (run_dir / "reports" / "eval.md").read_text()


def test_pipeline_writes_hparams_and_eval_scalars(pipeline_run):
    run_dir, _ = pipeline_run
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    hp = ea.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hp and "_hparams_/session_start_info" in hp
    scalars = set(ea.Tags()["scalars"])
    assert {
        "hparam/teacher_team_return",
        "hparam/random_team_return",
        "eval/teacher/team_return_iqm",
        "charts/episodic_return",
        "losses/listener/value_loss",
    } <= scalars
    start = hp["_hparams_/session_start_info"].decode("latin-1")
    # the settings the run sets (its command line's, its env file's), not those it leaves at their defaults
    assert "teacher.ppo.n_epochs" in start and "env.name" in start and "teacher.ppo.learning_rate" not in start


def test_evaluate_twice_gives_identical_results(pipeline_run, cli, tmp_path):
    run_dir, _ = pipeline_run
    results = []
    for i in range(2):
        # a different copy/worker layout than the pipeline used: greedy episodes must not depend on it
        rc, _, err = cli(
            "evaluate",
            f"eval.policy={run_dir}",
            f"hydra.run.dir={tmp_path / str(i)}",
            "logger=quiet",
            "eval.episodes=4",
            "eval.n_boot=200",
            "env.num_envs=3",
            "env.num_workers=2",
        )
        assert rc == 0, err
        results.append(json.loads((tmp_path / str(i) / "reports" / "eval_teacher.json").read_text()))
        rnd = json.loads((tmp_path / str(i) / "reports" / "eval_random.json").read_text())
        results.append(rnd)
    assert results[0] == results[2] and results[1] == results[3]
    piped = json.loads((run_dir / "reports" / "eval_teacher.json").read_text())
    assert results[0]["episodes"] == piped["episodes"] and results[0]["summary"] == piped["summary"]
    assert (tmp_path / "0" / "reports" / "eval.md").read_text() == (
        tmp_path / "1" / "reports" / "eval.md"
    ).read_text()


def test_evaluate_builds_its_table_once_for_eval_md_and_tensorboard(pipeline_run, cli, tmp_path, monkeypatch):
    from madistill.evaluate import report

    run_dir, _ = pipeline_run
    tables = []
    build = report.markdown_table
    monkeypatch.setattr(report, "markdown_table", lambda s, *a, **k: tables.append(build(s, *a, **k)) or tables[-1])
    rc, _, err = cli("evaluate", f"eval.policy={run_dir}", f"hydra.run.dir={tmp_path}", "logger=quiet",
                     "eval.episodes=2", "eval.n_boot=50")
    assert rc == 0, err
    assert len(tables) == 1 and tables[0] in (tmp_path / "reports" / "eval.md").read_text()


def test_sampled_evaluation_with_episode_streams_does_not_depend_on_the_copies(pipeline_run, cli, tmp_path):
    """``eval.episode_streams=true``: sampled episodes (teacher and random team) are the same with 1 or 3 copies."""
    run_dir, _ = pipeline_run
    results = []
    for copies in (1, 3):
        out = tmp_path / str(copies)
        rc, _, err = cli("evaluate", f"eval.policy={run_dir}", f"hydra.run.dir={out}", "logger=quiet",
                         "eval.episodes=4", "eval.n_boot=200", "eval.deterministic=false", "eval.episode_streams=true",
                         f"env.num_envs={copies}", "env.num_workers=0")
        assert rc == 0, err
        results.append([json.loads((out / "reports" / f"eval_{n}.json").read_text())["episodes"]
                        for n in ("teacher", "random")])
    assert results[0] == results[1]


def test_a_run_into_the_directory_of_an_earlier_run_says_so(pipeline_run, cli, tmp_path):
    run_dir, _ = pipeline_run
    args = ("evaluate", f"eval.policy={run_dir}", f"hydra.run.dir={tmp_path / 'eval'}", "logger=quiet", "eval.episodes=1")
    first, second = cli(*args), cli(*args)
    assert first[0] == second[0] == 0 and "note:" not in first[2]
    assert f"madistill evaluate: note: {tmp_path / 'eval'} holds an earlier run" in second[2]


# ------------------------------------------------------------------ errors: exit 2, one line
def test_evaluate_in_the_wrong_env_exits_2_with_one_line(pipeline_run, cli, tmp_path):
    run_dir, _ = pipeline_run
    rc, _, err = cli(
        "evaluate",
        f"eval.policy={run_dir}",
        "env=simple_spread_v3",
        f"hydra.run.dir={tmp_path}",
        "logger=quiet",
        "eval.episodes=2",
    )
    assert rc == 2
    assert len(_err_lines(err)) == 1, err
    line = _madistill_error(err, "evaluate")
    assert "simple_speaker_listener_v4" in line and "env=simple_speaker_listener_v4" in line


def test_unknown_env_lists_available_envs(cli, tmp_path):
    rc, out, err = cli("train", "env=nope", f"hydra.run.dir={tmp_path}")
    assert rc == 2 and out == ""
    assert len(_err_lines(err)) == 1
    line = _madistill_error(err, "train")
    assert "unknown env 'nope'" in line
    for name in ("custom", "relay", "simple_adversary_v3", "simple_speaker_listener_v4", "simple_spread_v3"):
        assert name in line
    assert not (tmp_path / "tb").exists()


def test_unknown_env_message_lists_only_envs(cli, tmp_path):
    _, _, err = cli("train", "env=nope", f"hydra.run.dir={tmp_path}")
    line = _madistill_error(err, "train")
    assert "base_env" not in line and "provider=" not in line and "search path" not in line


def test_wrong_type_exits_2_with_one_line(cli, tmp_path):
    rc, out, err = cli("train", "teacher.ppo.learning_rate=abc", f"hydra.run.dir={tmp_path}")
    assert rc == 2 and out == ""
    assert len(_err_lines(err)) == 1
    assert "teacher.ppo.learning_rate=abc" in _madistill_error(err, "train")


@pytest.mark.parametrize("stage,args,fix", [
    ("attack", ["attack.eps=0.3"], 'attack.eps takes a list: use "attack.eps=[0.3]"'),
    ("cascade", ["fault.victims=agent_0"], 'fault.victims takes a list: use "fault.victims=[agent_0]"'),
    ("train", ["env=custom"], "env=custom needs the env's import path: add env.target=<module>.parallel_env"),
    ("train", ["seed=1", "--foo"], "unknown option '--foo': settings are key=value overrides"),
    ("train", ["-m", "seed=0,1", "hydra.run.dir=/tmp/run"], "hydra.run.dir names one run's directory, which a sweep (-m) does not use: pass "
                                  "hydra.sweep.dir=<dir>"),
    ("evaluate", ["-m", "seed=0,1", "eval.policy=/no/such/run"],
     "no such policy or run directory: /no/such/run (eval.policy); pass the path printed at the end of a run"),
    ("finetune", ["teacher.resume=/tmp/run/checkpoint"],
     "teacher.resume continues a teacher's training (train or pipeline); finetune does not resume"),
    ("evaluate", ["hydra.run.dir="], "hydra.run.dir is empty: pass a directory (hydra.run.dir=<dir>)"),
    ("train", ["-m", "seed=[1,2"], "no viable alternative at input '[1,2'"),
    ("train", ["-m", "seed=0,1", "+launcher=local", "hydra.launcher.n_jobs=0"], "hydra.launcher.n_jobs=0 runs no job"),
    ("pipeline", ["fault=stuck"], "fault=stuck names no victims, so no fault would be played"),  # before training
])
def test_common_mistakes_get_one_line_naming_the_fix(cli, tmp_path, stage, args, fix):
    rc, out, err = cli(stage, *args, f"hydra.{'sweep' if '-m' in args else 'run'}.dir={tmp_path / 'run'}")
    assert rc == 2 and out == "" and len(_err_lines(err)) == 1
    assert fix in _madistill_error(err, stage)
    assert not (tmp_path / "run").exists()


def test_a_failed_start_in_the_default_run_directory_leaves_no_folder_above_it(cli, tmp_path, monkeypatch):
    """The default run directory is runs/<stage>/<env>/<time>: the folders Hydra made for it go with it, and a
    folder that holds something else stays."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "kept").mkdir(parents=True)
    rc, _, err = cli("train", "teacher.total_agent_steps=-5")
    assert rc == 2 and "teacher.total_agent_steps must be at least 1" in err
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == ["runs", "runs/kept"]
    # folders of the user's, outside the default runs folder, stay even when empty
    (tmp_path / "mine" / "results").mkdir(parents=True)
    rc, _, _ = cli("train", "teacher.total_agent_steps=-5", "hydra.run.dir=mine/results/r1")
    assert rc == 2 and (tmp_path / "mine" / "results").is_dir() and not (tmp_path / "mine" / "results" / "r1").exists()


def test_wrong_type_message_says_what_type_is_expected(cli, tmp_path):
    _, _, err = cli("train", "teacher.ppo.learning_rate=abc", f"hydra.run.dir={tmp_path}")
    assert "float" in _madistill_error(err, "train").lower()


def test_unknown_key_exits_2(cli, tmp_path):
    rc, _, err = cli("train", "teacher.no_such_key=1", f"hydra.run.dir={tmp_path}")
    assert rc == 2 and "no_such_key" in _madistill_error(err, "train")


def test_missing_policy_path_exits_2(cli, tmp_path):
    rc, _, err = cli(
        "evaluate", f"eval.policy={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'out'}", "logger=quiet"
    )
    assert rc == 2
    assert "no such policy or run directory" in _madistill_error(err, "evaluate")


def test_no_policy_given_exits_2(cli, tmp_path):
    rc, _, err = cli("evaluate", f"hydra.run.dir={tmp_path}", "logger=quiet")
    assert rc == 2 and "eval.policy" in _madistill_error(err, "evaluate")


@pytest.mark.parametrize("damage", ["manifest", "weights"])
def test_corrupt_policy_exits_2(pipeline_run, cli, tmp_path, damage):
    run_dir, _ = pipeline_run
    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "policies" / "teacher", bad)
    if damage == "manifest":
        (bad / "manifest.json").write_text("{ not json")
    else:
        data = (bad / "listener.safetensors").read_bytes()
        (bad / "listener.safetensors").write_bytes(data[:40])
    rc, _, err = cli(
        "evaluate",
        f"eval.policy={bad}",
        f"hydra.run.dir={tmp_path / 'out'}",
        "logger=quiet",
        "eval.episodes=2",
    )
    assert rc == 2
    line = _madistill_error(err, "evaluate")
    assert str(bad) in line
    assert ("corrupt manifest" if damage == "manifest" else "unreadable weights") in line


def test_quiet_logger_shows_no_progress_bars(pipeline_run, cli, tmp_path):
    run_dir, _ = pipeline_run
    rc, _, err = cli(
        "evaluate",
        f"eval.policy={run_dir}",
        f"hydra.run.dir={tmp_path}",
        "logger=quiet",
        "eval.episodes=2",
        "env.num_workers=0",
    )
    assert rc == 0
    assert "eval teacher" not in err and "eval random" not in err


# ------------------------------------------------------------------ custom env
def test_custom_env_from_the_command_line(cli, tmp_path):
    rc, out, err = cli(
        "train",
        "env=custom",
        "env.target=envs.relay.parallel_env",
        "env.name=myrelay",
        *tiny("teacher.total_agent_steps=200"),
        f"hydra.run.dir={tmp_path}",
    )
    assert rc == 0, err
    m = read_manifest(tmp_path / "policies" / "teacher")
    assert m["env"] == {"target": "envs.relay.parallel_env", "kwargs": {}, "name": "myrelay"}
    assert [g["agents"] for g in m["groups"]] == [["agent_0", "agent_1", "agent_2", "agent_3"]]
    assert f"teachers: {tmp_path / 'policies' / 'teacher'}" in out + err


def test_an_env_module_in_the_working_directory_imports_as_under_python_m(cli, tmp_path, monkeypatch):
    """The console script does not put the working directory on sys.path as ``python -m`` does: main() does."""
    home = tmp_path / "project"
    home.mkdir()
    (home / "myenvmod.py").write_text("from envs.relay import parallel_env  # noqa: F401\n")
    monkeypatch.chdir(home)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(home))])
    rc, _, err = cli("train", "env=custom", "env.target=myenvmod.parallel_env", "env.name=mine",
                     *tiny("teacher.total_agent_steps=200"), f"hydra.run.dir={tmp_path / 'r'}")
    assert rc == 0, err
    assert sys.path[-1] == str(home)
    assert read_manifest(tmp_path / "r" / "policies" / "teacher")["env"]["target"] == "myenvmod.parallel_env"


def test_an_env_file_of_the_users_own_config_folder_and_its_re_evaluation(cli, tmp_path):
    conf = tmp_path / "conf" / "env"
    conf.mkdir(parents=True)
    (conf / "myrelay.yaml").write_text("# @package _global_\nenv:\n  name: myrelay\n  target: envs.relay.parallel_env\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    rc, _, err = cli("train", "env=myrelay", search, *tiny("teacher.total_agent_steps=200"), f"hydra.run.dir={tmp_path / 't'}")
    assert rc == 0, err
    rc, out, err = cli("evaluate", f"eval.policy={tmp_path / 't'}", "env=myrelay", search, *tiny(),
                       f"hydra.run.dir={tmp_path / 'e'}")
    assert rc == 0, err
    again = next(ln for ln in out.splitlines() if "re-evaluate:" in ln)
    assert "env=myrelay" in again and search in shlex.split(again)


def test_feature_groups_the_env_lacks_are_refused_before_training(cli, tmp_path):
    """env.features keyed by an agent id, not its group: refused by train, before any teacher records it."""
    rc, _, err = cli("train", "env=relay", "+env.features.agent_0.first=[0]", *tiny(), f"hydra.run.dir={tmp_path / 'r'}")
    assert rc == 2 and "env.features names groups ['agent_0'] this env lacks" in _madistill_error(err, "train")
    assert not (tmp_path / "r").exists()


def test_an_env_file_whose_env_name_is_not_its_own_is_refused(cli, tmp_path):
    """Saved policies find their env's file by env.name: a mismatch would drop its feature groups later."""
    rc, _, err = cli("train", "env=relay", "env.name=myrelay", *tiny(), f"hydra.run.dir={tmp_path / 'r'}")
    assert rc == 2 and "env.name is 'myrelay' but its config file is relay.yaml" in _madistill_error(err, "train")
    assert not (tmp_path / "r").exists()


def test_custom_env_without_target_exits_2(cli, tmp_path):
    rc, _, err = cli("train", "env=custom", f"hydra.run.dir={tmp_path}", "logger=quiet")
    assert rc == 2 and "env.target" in _madistill_error(err, "train")


# ------------------------------------------------------------------ sweeps
@pytest.mark.slow
def test_joblib_sweep_trains_one_teacher_per_seed(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        sys.executable,
        "-m",
        "madistill",
        "train",
        "-m",
        "seed=0,1",
        "+launcher=local",
        f"hydra.sweep.dir={sweep}",
        "env=relay",
        *tiny("teacher.total_agent_steps=200"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sweep: {sweep} (2 jobs)" in proc.stdout.splitlines()  # the jobs ran in other processes
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    seeds = []
    for job in ("0", "1"):
        m = read_manifest(sweep / job / "policies" / "teacher")
        assert m["role"] == "teacher" and m["env"]["name"] == "relay"
        seeds.append(m["config"]["seed"])
        assert any((sweep / job / "tb").iterdir())
    assert seeds == [0, 1]
    w0 = (sweep / "0" / "policies" / "teacher" / "agent.safetensors").read_bytes()
    w1 = (sweep / "1" / "policies" / "teacher" / "agent.safetensors").read_bytes()
    assert w0 != w1  # different seeds train different teachers
    assert (sweep / "multirun.yaml").is_file()
    assert (
        not (tmp_path / "multirun").exists() and not (tmp_path / "runs").exists()
    )  # nothing outside the sweep dir


def test_a_sweep_reports_every_failed_job_by_its_swept_settings_and_where_the_sweep_is(cli, tmp_path):
    sweep = tmp_path / "sweep"
    rc, out, err = cli("train", "-m", *tiny("env=relay", "teacher.total_agent_steps=-5,200,0", "seed=3"),
                       f"hydra.sweep.dir={sweep}")
    assert rc == 2
    assert f"sweep: {sweep} (3 jobs, 2 failed)" in out.splitlines()
    assert [ln for ln in err.splitlines() if ln.startswith("madistill")] == [
        "madistill train: error: job 0 (teacher.total_agent_steps=-5): teacher.total_agent_steps must be at least 1, got -5",
        "madistill train: error: job 2 (teacher.total_agent_steps=0): teacher.total_agent_steps must be at least 1, got 0"]
    assert "Error executing job" not in err
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["1"]  # the failed jobs left nothing
    assert (sweep / "1" / "policies" / "teacher").is_dir()


def test_an_interrupted_sweep_keeps_the_jobs_checkpoint_and_starts_no_new_job(cli, tmp_path, monkeypatch):
    from madistill.teacher import TeacherTrainer

    def interrupt(*args: object) -> None:  # Ctrl-C in the first training iteration of the first job
        raise KeyboardInterrupt

    monkeypatch.setattr(TeacherTrainer, "_log", interrupt)
    sweep = tmp_path / "sweep"
    rc, out, err = cli("train", "-m", *tiny("env=relay", "teacher.total_agent_steps=400", "seed=0,1,2"),
                       f"hydra.sweep.dir={sweep}")
    assert rc == 130
    assert f"sweep: {sweep} (3 jobs, 1 interrupted, 2 not started)" in out.splitlines()
    assert [ln for ln in err.splitlines() if ln.startswith("madistill")] == [
        f"madistill train: job 0 (seed=0) interrupted: resume it with teacher.resume={sweep / '0' / 'checkpoint'}",
        "madistill train: interrupted"]
    assert (sweep / "0" / "checkpoint" / "manifest.json").is_file()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]  # the jobs that did not start left nothing
    # Hydra's launch line only for the job that started
    assert "#0 : " in out + err and "#1 :" not in out + err and "#2 :" not in out + err


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [True, False], ids=["ctrl-c", "sigterm-to-the-launcher"])
def test_ctrl_c_of_a_joblib_sweep_saves_the_running_jobs_checkpoint_beside_an_idle_worker(tmp_path, to_group):
    """The terminal's Ctrl-C reaches every process: the worker whose job ended and the one that never got a job
    ignore it (their pool would take their end for a crash and kill the other worker mid-save), the running job
    saves its checkpoint. A SIGTERM to the launcher alone (a scheduler's) reaches the running job through the
    sweep's record, which it reads between training iterations."""
    import signal
    import time

    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "madistill", "train", "-m", "teacher.total_agent_steps=200,10000000", "+launcher=local",
         "hydra.launcher.n_jobs=3", f"hydra.sweep.dir={sweep}", *tiny("env=relay")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((sweep / "0" / "policies").is_dir() and (sweep / "1" / "tb").is_dir()):
        time.sleep(0.5)
    time.sleep(3)  # job 0 is done and its worker idle; job 1 trains
    if to_group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=120)
    finally:  # a sweep that did not stop must not outlive the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert f"sweep: {sweep} (2 jobs, 1 interrupted)" in out.splitlines()
    assert read_manifest(sweep / "1" / "checkpoint")["role"] == "checkpoint" and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [["train", "env=relay", "--cfg", "job"], ["train", "--cfg", "job", "env=relay", "seed=5"],
     ["train", "env=relay", "--cfg=job"], ["train", "env=relay", "-cjob"]],
    ids=["flag-last", "flag-first", "flag=value", "short-attached"],
)
def test_cfg_job_prints_the_composed_config(cli, args):
    rc, out, err = cli(*args)
    assert rc == 0, err
    assert "name: relay" in out and "target: envs.relay.parallel_env" in out
    assert ("seed: 5" in out) == ("seed=5" in args)


def test_longer_speaker_listener_budget_is_a_config_file():
    from madistill.cli import compose_config

    cfg = compose_config(["+experiment=sl_long"])
    assert cfg.env.name == "simple_speaker_listener_v4" and cfg.teacher.total_agent_steps == 4_000_000
    assert compose_config([]).teacher.total_agent_steps == 1_500_000  # the main job's default budget


def test_spread_robust_preset_is_robust_distillation_with_8_rounds_on_spread():
    from madistill.cli import compose_config

    cfg = compose_config(["+experiment=spread_robust"])
    assert cfg.env.name == "simple_spread_v3" and cfg.distill.lambda_igr == 0.01  # spread's DIGR weight
    assert cfg.distill.rounds == 8 and cfg.distill.adv_weight == 1.0 and cfg.distill.smooth_weight == 0.5
    assert list(cfg.attack.eps) == [0.1, 0.2, 0.3]


def test_lookahead_robust_preset_collects_every_student_step_under_the_lookahead_and_keeps_its_targets():
    from madistill.cli import compose_config

    cfg = compose_config(["+experiment=robust_lookahead"])
    robust = compose_config(["distill=robust"])
    assert cfg.env.name == "simple_speaker_listener_v4" and cfg.distill.adv_weight == robust.distill.adv_weight == 1.0
    assert (cfg.distill.adv_collect, cfg.distill.adv_collect_objective, cfg.distill.adv_collect_targets) == (
        1.0, "targeted_lookahead", True)
    assert (robust.distill.adv_collect, robust.distill.adv_collect_objective, robust.distill.adv_collect_targets) == (
        0.0, None, False)


def test_lookahead_repair_preset_is_one_long_fisher_masked_fine_tune_against_the_lookahead():
    from madistill.cli import compose_config

    rc = compose_config(["+experiment=repair_lookahead"]).repair
    assert (rc.attack, rc.mask, rc.episodes, rc.steps, list(rc.learning_rates), list(rc.anchors), rc.weight_decay,
            rc.adv_steps) == ("targeted_lookahead", "fisher", 100, 2000, [0.0003], [0.0], 0.0, 3)
    default = compose_config([]).repair
    assert (default.attack, default.mask, default.steps) == ("pgd", "neurons", 300)


def test_continuous_spread_recipe_is_a_config_file():
    """docs/continuous_actions.md's recipe: continuous spread without the time-limit bootstrap, discount 0.95; the
    rest as the default spread teacher."""
    from omegaconf import OmegaConf

    from madistill.cli import compose_config

    cfg = compose_config(["+experiment=spread_continuous"])
    default = compose_config(["env=simple_spread_v3"])
    assert cfg.env.name == "simple_spread_v3" and cfg.env.kwargs.continuous_actions is True
    assert cfg.teacher.bootstrap_truncated is False and cfg.teacher.ppo.gamma == 0.95
    assert default.teacher.bootstrap_truncated is True and default.teacher.ppo.gamma == 0.99
    for key in ("total_agent_steps", "ppo.learning_rate", "ppo.ent_coef", "ppo.n_epochs", "hidden_sizes"):
        assert OmegaConf.select(cfg.teacher, key) == OmegaConf.select(default.teacher, key), key


def test_attacking_a_teacher_with_a_central_critic_skips_the_critic_attack(cli, tmp_path):
    """A centralised critic has no value from one agent's observation: the critic attack is skipped and said
    so in the report; the rest of the suite runs."""
    base = ["env=relay", "logger=quiet", "env.num_envs=2", "env.num_workers=0", "teacher.hidden_sizes=[16]",
            "teacher.ppo.n_steps=25", "teacher.ppo.batch_size=100", "teacher.ppo.n_epochs=2"]
    rc, _, err = cli("train", *base, "teacher.critic=central", "teacher.total_agent_steps=400", f"hydra.run.dir={tmp_path / 't'}")
    assert rc == 0, err
    rc, _, err = cli("attack", *base, f"attack.policy={tmp_path / 't'}", "attack.methods=[critic,fgsm]", "attack.eps=[0.3]",
                     "attack.victims=[all]", "attack.episodes=2", "attack.checks=false", f"hydra.run.dir={tmp_path / 'a'}")
    assert rc == 0, err
    report = json.loads((tmp_path / "a" / "reports" / "robustness.json").read_text())["results"]["teacher"]
    assert any(s.startswith("critic: no policy with a value head on one agent's observation") for s in report["skipped"])
    assert "fgsm" in report["returns"]["all"]


def test_attack_presets_are_a_config_group(cli):
    """``attack=quick|suite|thorough`` pick the suite; keys still override on top; an unknown preset names them."""
    from madistill.cli import compose_config

    suite = compose_config([]).attack
    assert suite.methods == ["random", "fgsm", "pgd", "critic", "spsa", "transfer", "targeted_lowest",
                             "targeted_lookahead"] and suite.checks
    quick = compose_config(["attack=quick", "attack.episodes=5"]).attack
    assert (quick.methods, quick.eps, quick.victims, quick.episodes, quick.checks) == (
        ["random", "fgsm", "pgd"], [0.3], ["all"], 5, False)
    assert quick.restarts == suite.restarts  # the rest comes from the suite
    assert {"learned", "offsets"} <= set(compose_config(["attack=thorough"]).attack.methods)
    rc, _, err = cli("attack", "attack=strongest")
    assert rc != 0 and "attack=<one of: quick suite thorough>" in err


def test_conflicting_hydra_flags_exit_2(cli):
    rc, _, err = cli("train", "env=relay", "-m", "--cfg", "job")
    assert rc == 2 and len(_err_lines(err)) == 1


def test_ctrl_c_during_train_exits_130_with_a_checkpoint(cli, tmp_path, monkeypatch):
    from madistill.rollout import Rollout

    calls = {"n": 0}
    orig_step = Rollout.step

    def step_then_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 30:  # second rollout of 25 steps
            raise KeyboardInterrupt
        return orig_step(self)

    monkeypatch.setattr(Rollout, "step", step_then_interrupt)
    rc, out, err = cli(
        "train", "env=relay", *tiny("teacher.total_agent_steps=2000"), f"hydra.run.dir={tmp_path}"
    )
    assert rc == 130
    assert "madistill train: interrupted" in err
    assert f"teacher.resume={tmp_path / 'checkpoint'}" in out + err
    assert read_manifest(tmp_path / "checkpoint")["role"] == "checkpoint"


@pytest.mark.parametrize("stage,key", [("distill", "distill.teacher"), ("evaluate", "eval.policy"),
                                       ("attack", "attack.policy"), ("saliency", "saliency.policy")])
def test_stages_take_the_env_config_of_the_policy_they_read(cli, tmp_path, stage, key):
    """A relay teacher read without env=...: the relay env file applies, not the default env's."""
    run = tmp_path / "relay"
    rc, _, err = cli("train", *tiny("env=relay", "teacher.total_agent_steps=200"), f"hydra.run.dir={run}")
    assert rc == 0, err
    rc, out, err = cli(stage, f"{key}={run}", "--cfg", "job")
    assert rc == 0, err
    assert "name: relay" in out and "simple_speaker_listener" not in out
    rc, out, _ = cli(stage, f"{key}={run}", "env=simple_spread_v3", "--cfg", "job")
    assert "name: simple_spread_v3" in out  # an env the user names still wins
    rc, out, _ = cli(stage, f"{key}={run}", "env.num_workers=0", "--cfg", "job")
    assert "name: relay" in out and "num_workers: 0" in out  # how the env is stepped keeps the saved env


def test_saved_env_is_added_only_when_all_swept_policies_agree(cli, tmp_path):
    from madistill.cli import _with_saved_env

    runs = {}
    for env in ("relay", "simple_speaker_listener_v4"):
        runs[env] = tmp_path / env
        rc, _, err = cli("train", *tiny(f"env={env}", "teacher.total_agent_steps=200", "teacher.ppo.n_steps=50"),
                         f"hydra.run.dir={runs[env]}")
        assert rc == 0, err
    relay, sl = runs["relay"], runs["simple_speaker_listener_v4"]
    assert _with_saved_env([f"eval.policy={relay},{relay}"], "evaluate")[0] == "env=relay"
    assert _with_saved_env([f"eval.policy=[{relay},{sl}]"], "evaluate") == [f"eval.policy=[{relay},{sl}]"]
    assert _with_saved_env([f"eval.policy={relay}", "env.kwargs.n=5"], "evaluate") == [f"eval.policy={relay}", "env.kwargs.n=5"]
    # Hydra's sweep syntax over existing paths is left to Hydra; only plain paths are checked before it starts
    for value in (f"[{relay},{sl}],[{relay}]", f"choice({relay},{sl})"):
        assert _with_saved_env([f"eval.policy={value}"], "evaluate") == [f"eval.policy={value}"]
    with pytest.raises(MadistillError, match=f"no such policy or run directory: {relay}_gone"):
        _with_saved_env([f"eval.policy={relay},{relay}_gone"], "evaluate")


def test_per_agent_policies_are_evaluated_with_their_grouping_or_get_a_one_line_fix(cli, tmp_path):
    """Agents trained one policy each keep that grouping when read back; an env grouped otherwise is refused."""
    run = tmp_path / "per_agent"
    rc, _, err = cli("train", *tiny("env=relay", "env.grouping=per_agent", "teacher.total_agent_steps=200"),
                     f"hydra.run.dir={run}")
    assert rc == 0, err
    assert [g["name"] for g in read_manifest(run / "policies" / "teacher")["groups"]] == [f"agent_{i}" for i in range(4)]
    rc, out, err = cli("evaluate", f"eval.policy={run}", "eval.episodes=2", "logger=quiet",
                       f"hydra.run.dir={tmp_path / 'eval'}")
    assert rc == 0, err
    rc, _, err = cli("evaluate", f"eval.policy={run}", "env.grouping=auto", "eval.episodes=2", "logger=quiet",
                     f"hydra.run.dir={tmp_path / 'eval_auto'}")
    assert rc == 2 and len(_err_lines(err)) == 1, err
    assert "env.grouping=per_agent" in _madistill_error(err, "evaluate")


def test_evaluation_rows_pool_runs_that_differ_in_how_they_ran_not_in_what_they_trained(tmp_path):
    from madistill.evaluate.evaluator import PolicyRef
    from madistill.policies.store import FORMAT_VERSION, MANIFEST
    from madistill.stages.evaluate import setting_rows

    def saved(run: str, config: dict) -> PolicyRef:
        path = tmp_path / run / "policies" / "teacher"
        path.mkdir(parents=True)
        (path / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "role": "teacher", "config": config}))
        return PolicyRef("teacher", path, run)

    how = [{"seed": 0, "logger": {"progress": True}, "env": {"num_workers": 2}, "eval": {"episodes": 100}},
           {"seed": 1, "logger": {"progress": False}, "env": {"num_workers": 0}, "eval": {"episodes": 5}, "device": "cuda"}]
    assert setting_rows([saved(str(i), c) for i, c in enumerate(how)]) == ["teacher", "teacher"]
    lr = [saved(f"lr{i}", {"teacher": {"ppo": {"learning_rate": r}}, "logger": {"progress": i == 0}})
          for i, r in enumerate((1e-3, 3e-4))]
    assert setting_rows(lr) == ["teacher [teacher.ppo.learning_rate=0.001]", "teacher [teacher.ppo.learning_rate=0.0003]"]


def test_a_stage_reads_each_studied_policys_manifest_once(tmp_path, monkeypatch):
    """Pairing every policy with every other, the saved env, the settings rows and the teams read the manifests
    through their refs: one read per policy, however many look-ups."""
    from pathlib import Path

    from madistill.evaluate.evaluator import PolicyRef, saved_env
    from madistill.policies.store import FORMAT_VERSION, MANIFEST
    from madistill.stages.evaluate import setting_rows
    from madistill.stages.policies import paired_policy, with_teachers

    env = {"target": "envs.relay.parallel_env", "kwargs": {}}
    refs = []
    for run in ("0", "1"):
        for role in ("teacher", "student"):
            path = tmp_path / run / "policies" / role
            path.mkdir(parents=True)
            config = {"seed": int(run), "distill": {"teacher": str(tmp_path / run / "policies" / "teacher")}}
            (path / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "role": role, "env": env,
                                                     "config": config}))
            refs.append(PolicyRef(role, path, run))
    reads = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **k: reads.append(p.name) or read_text(p, *a, **k))
    for _ in range(2):
        assert [paired_policy(r, "student" if r.name == "teacher" else "teacher", refs) for r in refs] == [1, 0, 3, 2]
        assert with_teachers(refs[1::2])[0].path == refs[0].path
        assert with_teachers(refs[1::2])[0].run == "0"  # named by the listed run it sits in
        assert setting_rows(refs) == ["teacher", "student", "teacher", "student"]
        assert saved_env(refs).target == "envs.relay.parallel_env"
    assert reads.count(MANIFEST) == len(refs)


def test_policies_are_found_through_a_directory_of_links_to_runs(tmp_path):
    from madistill.evaluate.evaluator import discover_policies, unfinished_runs
    from madistill.policies.store import FORMAT_VERSION, MANIFEST

    for run, folder in (("r0", "policies/teacher"), ("r1", "policies/teacher"), ("r2", "checkpoint")):
        (tmp_path / "runs" / run / folder).mkdir(parents=True)
        (tmp_path / "runs" / run / folder / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION}))
    picked = tmp_path / "picked"
    picked.mkdir()
    for run in ("r0", "r1", "r2"):
        (picked / run).symlink_to(tmp_path / "runs" / run)
    (picked / "again").symlink_to(picked)  # a link back up the tree is not followed
    (picked / "r1_too").symlink_to(tmp_path / "runs" / "r1")  # another run of the list, though the same files
    assert [(r.name, r.run) for r in discover_policies(picked)] == [("teacher", "r0"), ("teacher", "r1"),
                                                                    ("teacher", "r1_too")]
    assert unfinished_runs(picked) == [picked / "r2"]


def test_a_students_added_teacher_is_named_by_its_run(tmp_path):
    from pathlib import Path

    from madistill.evaluate.evaluator import PolicyRef
    from madistill.policies.store import FORMAT_VERSION, MANIFEST
    from madistill.stages.policies import policy_labels, with_teachers

    def saved(run: str, role: str, teacher: str = "") -> PolicyRef:
        path = tmp_path / run / "policies" / role
        path.mkdir(parents=True)
        config = {"distill": {"teacher": str(tmp_path / teacher / "policies" / "teacher")}} if teacher else {}
        (path / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "role": role, "config": config}))
        return PolicyRef(role, path, Path(run).name)

    saved("teachers/t0", "teacher")
    saved("s1", "teacher")
    assert policy_labels(with_teachers([saved("s0", "student", "teachers/t0")])) == ["teacher@t0", "student@s0"]
    # a listed run of the teacher run's name: the teacher is named by its directory's path
    assert with_teachers([saved("x/s1", "student", "s1")])[0].run == str(tmp_path / "s1")


def test_each_policy_of_a_sweep_is_paired_with_its_own_teacher_and_student(tmp_path):
    """Transfer surrogates, critics and saliency references come from the same run, else from the manifest."""
    from madistill.evaluate.evaluator import PolicyRef
    from madistill.policies.store import FORMAT_VERSION, MANIFEST
    from madistill.stages.policies import paired_policy

    def policy(run: str, role: str, teacher: str | None = None) -> PolicyRef:
        path = tmp_path / run / "policies" / role
        path.mkdir(parents=True)
        config = {"distill": {"teacher": str(tmp_path / teacher)}} if teacher else {}
        (path / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "role": role, "config": config}))
        return PolicyRef(role, path, run)

    refs = [policy("0", "teacher"), policy("0", "student"), policy("1", "teacher"), policy("1", "student")]
    assert [paired_policy(r, "student" if r.name == "teacher" else "teacher", refs) for r in refs] == [1, 0, 3, 2]
    # students of a distill sweep whose teachers are listed from elsewhere: linked through their manifests
    shared = [policy("t0", "teacher"), policy("t1", "teacher"),
              policy("d0", "student", "t1/policies/teacher"), policy("d1", "student", "t0/policies/teacher")]
    assert [paired_policy(r, "teacher", shared) for r in shared[2:]] == [1, 0]
    assert [paired_policy(r, "student", shared) for r in shared[:2]] == [3, 2]
    assert paired_policy(refs[0], "critic", refs) is None


def test_evaluate_saves_a_gif_of_one_episode(pipeline_run, cli, tmp_path):
    import imageio.v3 as iio
    import numpy as np

    run_dir, _ = pipeline_run
    rc, out, err = cli("evaluate", f"eval.policy={run_dir}", "eval.names=[teacher]", "eval.episodes=2", "eval.video=true",
                       "logger=quiet", f"hydra.run.dir={tmp_path}")
    assert rc == 0, err
    gif = tmp_path / "reports" / "episode_teacher.gif"
    assert f"video: {gif}" in out + err
    frames = iio.imread(gif, index=None)
    assert frames.shape[0] == 25 and frames.shape[1] > 100 and frames.shape[-1] in (3, 4)  # max_cycles=25: 25 states shown
    assert not np.array_equal(frames[0], frames[-1])  # the agents moved


def test_an_mp4_without_its_writer_is_refused_before_any_episode(pipeline_run, cli, tmp_path, monkeypatch):
    import importlib.util

    from madistill.stages import evaluate

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else find_spec(name, *a))
    monkeypatch.setattr(evaluate, "setting_rows", lambda *a: pytest.fail("episodes played before the check"))
    run_dir, _ = pipeline_run
    rc, _, err = cli("evaluate", f"eval.policy={run_dir}", "eval.video=true", "eval.video_format=mp4", "logger=quiet",
                     f"hydra.run.dir={tmp_path / 'ev'}")
    assert rc == 2 and not (tmp_path / "ev").exists()
    assert _madistill_error(err, "evaluate") == ("madistill evaluate: error: eval.video_format=mp4 needs imageio's ffmpeg plugin: pip install "
                                                 "'madistill[video]', or use eval.video_format=gif")


@pytest.mark.slow
def test_sigterm_checkpoints_like_ctrl_c_and_env_workers_stay_quiet(tmp_path):
    """A cluster's time limit (SIGTERM to the whole job) saves a checkpoint; the env workers print nothing."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "madistill", "train", *tiny("env=relay", "env.num_workers=2", "teacher.total_agent_steps=10000000",
                                                           "logger.progress=true"), f"hydra.run.dir={tmp_path}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "tb").glob("events*")):
        time.sleep(0.5)
    time.sleep(3)  # well into training
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert read_manifest(tmp_path / "checkpoint")["role"] == "checkpoint"
    assert "Traceback" not in err and "madistill train: interrupted" in err


@pytest.mark.slow
def test_env_workers_exit_when_their_parent_is_killed(tmp_path):
    import time

    script = ("import os, signal\nfrom madistill.envs.factory import EnvSpec\nfrom madistill.envs.vector import MultiAgentVecEnv\n"
              "v = MultiAgentVecEnv(EnvSpec('envs.relay.parallel_env', {}, 'relay'), 2, num_workers=2)\n"
              "print(*[p.pid for p in v._procs], flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)


def test_the_readmes_import_path_example_runs_and_a_moved_env_version_is_named(cli, tmp_path):
    import re

    example = re.search(r"`madistill train (env=custom env\.target=\S+ env\.name=\S+)`", (REPO / "README.md").read_text())
    assert example is not None
    rc, _, err = cli("train", *example.group(1).split(), *tiny("teacher.total_agent_steps=200", "teacher.ppo.n_steps=50"),
                     f"hydra.run.dir={tmp_path / 'example'}")
    assert rc == 0, err
    rc, _, err = cli("train", "env=custom", "env.target=mpe2.simple_reference_v2.parallel_env", f"hydra.run.dir={tmp_path}")
    assert rc == 2 and "did you mean simple_reference_v3" in _madistill_error(err, "train")


@pytest.mark.parametrize("stage,override", [("evaluate", "eval.episodes=0"), ("attack", "attack.episodes=-1"),
                                            ("train", "teacher.total_agent_steps=0"), ("distill", "distill.rounds=0")])
def test_counts_below_one_are_refused_before_any_work(cli, tmp_path, stage, override):
    rc, _, err = cli(stage, override, f"hydra.run.dir={tmp_path}")
    assert rc == 2 and "must be at least 1" in _madistill_error(err, stage)
    assert not (tmp_path / "policies").exists()


@pytest.mark.slow
def test_evaluating_a_sweep_pools_seeds_but_keeps_other_settings_apart(cli, tmp_path):
    sweeps = {"seeds": {"0": ["seed=0"], "1": ["seed=1"]},
              "widths": {"0": ["seed=0"], "1": ["seed=0", "teacher.hidden_sizes=[24]"]}}
    for sweep, jobs in sweeps.items():
        for job, extra in jobs.items():
            rc, _, err = cli("train", *tiny("env=relay", "teacher.total_agent_steps=200", *extra),
                             f"hydra.run.dir={tmp_path / sweep / job}")
            assert rc == 0, err
        rc, _, err = cli("evaluate", f"eval.policy={tmp_path / sweep}", "eval.episodes=2", "logger=quiet",
                         f"hydra.run.dir={tmp_path / ('eval_' + sweep)}")
        assert rc == 0, err
    reports = tmp_path / "eval_seeds" / "reports"
    assert sorted(p.name for p in reports.glob("eval_*.json")) == ["eval_random.json", "eval_teacher.json"]
    assert json.loads((reports / "eval_teacher.json").read_text())["meta"]["runs"] == ["0", "1"]
    md = (tmp_path / "eval_widths" / "reports" / "eval.md").read_text()
    assert "teacher [teacher.hidden_sizes=[16]]" in md and "teacher [teacher.hidden_sizes=[24]]" in md


def test_a_resume_of_a_run_directory_resumes_its_checkpoint_in_place(tmp_path):
    from madistill.cli import _resume_in_place

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- env=relay\n")
    args = _resume_in_place([f"teacher.resume={tmp_path}", "teacher.total_agent_steps=900"], "train")
    assert args[0] == f"hydra.run.dir={tmp_path}" and f"teacher.resume={tmp_path / 'checkpoint'}" in args
    assert "env=relay" in args


def test_a_resume_repeats_the_settings_the_run_last_ran_with(tmp_path):
    from madistill.cli import _run_overrides

    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text("- env=simple_spread_v3\n- +teacher.message_bonus.speaker=0.05\n"
                                          "- logger.name=${env.name}_x\n- teacher.total_agent_steps=100\n")
    # given again: the run's value goes; a key the run added (+) stays, so a plain change has it to change;
    # interpolations stay as written
    assert _run_overrides(tmp_path, ["teacher.resume=c", "teacher.message_bonus.speaker=0.1",
                                     "teacher.total_agent_steps=200"]) == [
        "env=simple_spread_v3", "+teacher.message_bonus.speaker=0.05", "logger.name=${env.name}_x",
        "teacher.resume=c", "teacher.message_bonus.speaker=0.1", "teacher.total_agent_steps=200"]
    assert _run_overrides(tmp_path, ["+teacher.message_bonus.speaker=0.1"])[1:] == [
        "logger.name=${env.name}_x", "teacher.total_agent_steps=100", "+teacher.message_bonus.speaker=0.1"]
    # removing a key the run added removes its addition, and leaves no removal of a key the config lacks
    assert _run_overrides(tmp_path, ["~teacher.message_bonus.speaker", "~logger.name"]) == [
        "env=simple_spread_v3", "teacher.total_agent_steps=100", "~logger.name"]
    # resumed before: the newest resumed record holds what it last ran with
    for stamp, rate in (("2026-12-05_10-00-00", "0.001"), ("2026-12-05_11-00-00", "0.0001")):
        (hydra / f"resumed_{stamp}").mkdir()
        (hydra / f"resumed_{stamp}" / "overrides.yaml").write_text(
            f"- env=simple_spread_v3\n- teacher.ppo.learning_rate={rate}\n- teacher.resume=c\n")
    assert _run_overrides(tmp_path, ["teacher.resume=c"]) == ["env=simple_spread_v3", "teacher.ppo.learning_rate=0.0001",
                                                              "teacher.resume=c"]


def test_another_stage_run_into_a_run_keeps_the_runs_record_that_its_resume_reads(cli, tmp_path):
    """Evaluating into a training run records the evaluation in .hydra/evaluate_<time>/: the run's own .hydra/,
    whose settings resuming it repeats, stays as it was; a run of the same stage there replaces it."""
    from madistill.cli import _beside_another_stage, _run_overrides

    run = tmp_path / "run"
    rc, _, err = cli("train", *tiny("env=relay", "teacher.total_agent_steps=200"), f"hydra.run.dir={run}")
    assert rc == 0, err
    record = (run / ".hydra" / "overrides.yaml").read_text()
    rc, _, err = cli("evaluate", *tiny(f"eval.policy={run}", "eval.episodes=2"), f"hydra.run.dir={run}")
    assert rc == 0, err
    assert (run / ".hydra" / "overrides.yaml").read_text() == record
    assert [p.name.split("_")[0] for p in (run / ".hydra").glob("evaluate_*")] == ["evaluate"]
    assert "teacher.total_agent_steps=200" in _run_overrides(run, [])
    # a stage that trains a teacher replaces the run: its record is the one a resume reads
    for stage in ("train", "pipeline"):
        assert _beside_another_stage([f"hydra.run.dir={run}"], stage) == [f"hydra.run.dir={run}"]


@pytest.mark.parametrize("name,fix", [
    ("mps", "device=mps is not supported: use device=cpu, device=cuda or device=auto"),
    ("bogus", "unknown device 'bogus': use device=cpu, device=cuda or device=auto"),
    ("cuda:1", "device=cuda:1"),
])
def test_a_device_madistill_cannot_use_is_one_line_naming_the_ones_it_can(name, fix):
    import torch

    from madistill.runtime import resolve_device

    if name == "cuda:1" and torch.cuda.device_count() > 1:
        pytest.skip("this machine has a second GPU")
    with pytest.raises(MadistillError, match=re.escape(fix)):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")
