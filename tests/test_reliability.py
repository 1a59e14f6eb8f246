"""Reliability: envs that used to crash training, errors that used to be tracebacks, output that used to
mislead, and resuming a run into its own directory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import call_cli, tiny
from gymnasium import spaces
from pettingzoo import ParallelEnv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from madistill.envs.episodes import EpisodeRecord
from madistill.evaluate.report import markdown_table
from madistill.evaluate.stats import summarize
from madistill.policies.store import read_manifest


class LeadEnv(ParallelEnv):
    """A lead agent with 20 actions and two teammates with 5, all observing the same 34 features: two groups
    with equal observation spaces and different Discrete action counts. Each agent earns 1 per step for
    action 0; episodes are truncated after ``max_cycles`` steps."""

    metadata = {"name": "lead_v0", "is_parallelizable": True, "render_modes": []}

    def __init__(self, max_cycles: int = 10):
        self.possible_agents = ["lead_0", "mate_0", "mate_1"]
        self.agents: list[str] = []
        self.max_cycles = max_cycles
        self.t = 0
        self._obs_space = spaces.Box(-1.0, 1.0, shape=(34,), dtype=np.float32)
        self._act_spaces = {"lead_0": spaces.Discrete(20), "mate_0": spaces.Discrete(5), "mate_1": spaces.Discrete(5)}

    def observation_space(self, agent):
        return self._obs_space

    def action_space(self, agent):
        return self._act_spaces[agent]

    def _obs(self) -> dict[str, np.ndarray]:
        return {a: np.full(34, self.t / self.max_cycles, dtype=np.float32) for a in self.agents}

    def reset(self, seed=None, options=None):
        self.t = 0
        self.agents = list(self.possible_agents)
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        rewards = {a: float(actions[a] == 0) for a in self.agents}
        done = self.t >= self.max_cycles
        obs, infos = self._obs(), {a: {} for a in self.agents}
        terminated = {a: False for a in self.agents}
        truncated = {a: done for a in self.agents}
        if done:
            self.agents = []
        return obs, rewards, terminated, truncated, infos


LEAD = ("env=custom", "env.target=test_reliability.LeadEnv", "env.name=lead")


def test_groups_with_equal_observations_and_different_action_counts_train(cli, tmp_path):
    rc, out, err = cli("train", *LEAD, *tiny("teacher.total_agent_steps=150"), f"hydra.run.dir={tmp_path}")
    assert rc == 0, err
    m = read_manifest(tmp_path / "policies" / "teacher")
    assert [(g["name"], g["action_space"]["n"]) for g in m["groups"]] == [("lead", 20), ("mate", 5)]


# ------------------------------------------------------------------ errors: one line, exit code 2
def _one_error_line(err: str, stage: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"madistill {stage}: error: "), err
    return lines[0]


def test_a_run_directory_that_cannot_be_created_is_one_line_naming_the_setting(cli, tmp_path):
    (tmp_path / "a_file").write_text("")
    rc, _, err = cli("train", "env=relay", "logger=quiet", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}")
    assert rc == 2
    line = _one_error_line(err, "train")
    assert f"cannot create the run directory {tmp_path / 'a_file' / 'run'}" in line and "hydra.run.dir=" in line


def test_a_run_directory_whose_log_cannot_be_written_is_one_line_naming_the_setting(cli, tmp_path):
    run = tmp_path / "run"
    (run / "train.log").mkdir(parents=True)  # as a read-only directory would, the log file cannot be opened there
    rc, _, err = cli("train", "env=relay", "logger=quiet", f"hydra.run.dir={run}")
    assert rc == 2
    line = _one_error_line(err, "train")
    assert f"cannot write in the run directory: {run / 'train.log'}" in line and "hydra.run.dir=" in line


def test_help_into_a_closed_pipe_is_one_line_and_exit_2():
    proc = subprocess.Popen([sys.executable, "-m", "madistill", "train", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line, as `| head` is after its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 2
    assert "output pipe closed" in _one_error_line(err, "train")


@pytest.mark.slow
def test_a_stage_whose_reader_left_finishes_its_work_and_logs_its_lines(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "madistill", "train", "env=relay",
                             *tiny("teacher.total_agent_steps=200"), f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # `madistill train ... | head -1`, the reader gone at once
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and err == ""
    assert read_manifest(run_dir / "policies" / "teacher")["role"] == "teacher"
    assert f"teachers: {run_dir / 'policies' / 'teacher'}" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("override", ["env.num_envs=0", "env.target=???"])
def test_a_failed_start_leaves_no_run_directory_behind(cli, tmp_path, override):
    run_dir = tmp_path / "run"
    extra = ["env=custom"] if override.startswith("env.target") else ["env=relay"]
    rc, _, err = cli("train", *extra, "logger=quiet", override, f"hydra.run.dir={run_dir}")
    assert rc == 2
    _one_error_line(err, "train")  # a missing value is one line too, without Hydra's "Error executing job"
    assert not run_dir.exists()


def test_a_run_interrupted_before_it_saved_anything_leaves_no_run_directory(cli, relay_teacher, tmp_path, monkeypatch):
    from madistill.stages import evaluate

    def interrupt(*args: object, **kwargs: object) -> None:  # Ctrl-C once the episodes are played
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "_summarise", interrupt)
    run_dir = tmp_path / "run"
    rc, _, err = cli("evaluate", f"eval.policy={relay_teacher}", "logger=quiet", f"hydra.run.dir={run_dir}")
    assert rc == 130 and err.strip().splitlines()[-1] == "madistill evaluate: interrupted"
    assert not run_dir.exists()


def test_a_failed_stage_run_into_another_run_leaves_that_run_as_it_was(cli, relay_teacher, tmp_path):
    """No log, record or folder of the failed job stays in the run it was pointed at."""
    run = tmp_path / "run"
    shutil.copytree(relay_teacher, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    rc, _, err = cli("evaluate", f"eval.policy={run}", "eval.names=[bogus]", "logger=quiet", f"hydra.run.dir={run}")
    assert rc == 2 and "no policies named ['bogus']" in err.strip().splitlines()[-1]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_full_disk_is_one_line_naming_the_file(cli, relay_teacher, tmp_path, monkeypatch):
    import errno

    from madistill.stages import evaluate

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ev" / "reports" / "eval_teacher.json"))

    monkeypatch.setattr(evaluate, "_summarise", full)
    rc, _, err = cli("evaluate", f"eval.policy={relay_teacher}", "logger=quiet", f"hydra.run.dir={tmp_path / 'ev'}")
    assert rc == 2
    assert _one_error_line(err, "evaluate").startswith(
        f"madistill evaluate: error: no space left on the device for {tmp_path / 'ev' / 'reports' / 'eval_teacher.json'}: free some, or pass hydra.run.dir=")


def test_an_evaluation_into_an_earlier_ones_directory_leaves_only_its_own_results(cli, relay_teacher, tmp_path):
    run = tmp_path / "ev"
    for extra in ([], ["eval.random_baseline=false"]):
        rc, _, err = cli("evaluate", f"eval.policy={relay_teacher}", "eval.episodes=2", "logger=quiet", *extra,
                         f"hydra.run.dir={run}")
        assert rc == 0, err
    assert sorted(p.name for p in (run / "reports").glob("eval_*.json")) == ["eval_teacher.json"]
    assert f"removed the earlier evaluation's eval_random.json from {run / 'reports'}" in err
    assert list(json.loads((run / "reports" / "marl_eval.json").read_text())["pettingzoo"]["relay"]) == ["teacher"]


# ------------------------------------------------------------------ output that says what happened
@pytest.fixture(scope="module")
def relay_teacher(tmp_path_factory):
    """A tiny relay teacher trained by ``madistill train`` (once for the module)."""
    run_dir = tmp_path_factory.mktemp("relay") / "run"
    with pytest.MonkeyPatch.context() as mp:
        rc = call_cli(["train", "env=relay", *tiny("teacher.total_agent_steps=200"), f"hydra.run.dir={run_dir}"], mp)
    assert rc == 0
    return run_dir


def test_an_attack_run_in_which_no_attack_can_run_is_one_line(cli, relay_teacher, tmp_path):
    rc, _, err = cli("attack", f"attack.policy={relay_teacher}", "attack.episodes=2", "attack.methods=[transfer]",
                     "attack.checks=false", "logger=quiet", f"hydra.run.dir={tmp_path / 'a'}")
    assert rc == 2 and not (tmp_path / "a").exists()
    assert _one_error_line(err, "attack") == (
        "madistill attack: error: no attack of attack.methods=[transfer] can run (transfer: no surrogate policy (set "
        "attack.transfer_from=<policy>)): add one that runs here, e.g. \"attack.methods=[pgd]\"")


def test_a_policy_no_attack_can_run_on_is_left_out_of_an_attack_on_several(cli, relay_teacher, tmp_path, monkeypatch):
    from madistill.attacks import robustness

    runs = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(relay_teacher, runs / name)
    real, calls = robustness.evaluate_robustness, []

    def first_has_none(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise robustness.NoAttackRuns("no attack of attack.methods=[transfer] can run (no surrogate)")
        return real(*args, **kwargs)

    monkeypatch.setattr(robustness, "evaluate_robustness", first_has_none)
    out = tmp_path / "a"
    rc, _, err = cli("attack", f"attack.policy={runs}", "attack=quick", "attack.episodes=2", "logger=quiet",
                     f"hydra.run.dir={out}")
    assert rc == 0, err
    assert "madistill: note: teacher@a left out: no attack of attack.methods=[transfer] can run" in err
    report = json.loads((out / "reports" / "robustness.json").read_text())
    assert list(report["results"]) == ["teacher@b"] and list(report["meta"]["policies"]) == ["teacher@b"]
    assert list(report["meta"]["left_out"]) == ["teacher@a"]


def test_attack_without_the_masking_checks_says_they_did_not_run(cli, relay_teacher, tmp_path):
    rc, out, err = cli("attack", "attack=quick", f"attack.policy={relay_teacher}", "attack.episodes=2",
                       "attack.steps=2", "logger=quiet", f"hydra.run.dir={tmp_path}")
    assert rc == 0, err
    assert "gradient-masking checks: not run (attack.checks=false)" in out and "flags: 0" not in out
    report = (tmp_path / "reports" / "robustness.md").read_text()
    assert "Gradient-masking checks: not run (attack.checks=false)" in report and "none fired" not in report
    saved = json.loads((tmp_path / "reports" / "robustness.json").read_text())
    assert saved["results"]["teacher"]["checks_run"] is False


def _summaries(**team_returns: list[float]) -> dict[str, dict]:
    """Evaluation summaries of two-agent episodes whose agents both earn the given team returns."""
    return {name: summarize([EpisodeRecord(i, 5, {"a_0": r, "a_1": r}) for i, r in enumerate(rets)], n_boot=50)
            for name, rets in team_returns.items()}


def test_eval_report_defines_its_measures_and_says_the_random_team_samples(make_cfg):
    from madistill.stages.evaluate import eval_report

    ec = make_cfg("eval.deterministic=true").eval
    summaries = _summaries(teacher=[3.0, 4.0], random=[0.0, 1.0])
    text = eval_report(summaries, markdown_table(summaries), "relay", ec)
    assert "greedy actions (the random team samples uniformly)" in text
    assert "Team return: an episode's undiscounted return averaged over the agents" in text
    assert "IQM (interquartile mean): the mean of the middle 50% of the episodes' team returns" in text


def test_a_student_worse_than_random_is_warned_about_at_the_end_and_in_the_report(make_cfg, capsys, tmp_path):
    from madistill.stages.evaluate import eval_report
    from madistill.stages.results import print_results

    summaries = _summaries(teacher=[3.0, 4.0], student=[-2.0, -1.0], random=[0.0, 1.0])
    print_results(make_cfg(), tmp_path, summaries, tmp_path)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("warning: student's mean team return -1.50 is below the random team's 0.50: ")
    assert last in eval_report(summaries, markdown_table(summaries), "relay", make_cfg().eval)
    fine = _summaries(teacher=[3.0, 4.0], student=[1.0, 2.0], random=[0.0, 1.0])
    print_results(make_cfg(), tmp_path, fine, tmp_path)
    assert "warning" not in capsys.readouterr().out
    assert "warning" not in eval_report(fine, markdown_table(fine), "relay", make_cfg().eval)


@pytest.fixture(scope="module")
def lead_teacher(tmp_path_factory):
    """A LeadEnv teacher trained by ``madistill train`` on a budget between two rollouts of 150 agent-steps
    (25 steps x 2 copies x 3 agents); its run directory and standard output."""
    run_dir = tmp_path_factory.mktemp("lead") / "run"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        rc = call_cli(["train", *LEAD, *tiny("teacher.total_agent_steps=200"), f"hydra.run.dir={run_dir}"], mp)
    assert rc == 0
    return run_dir, out.getvalue()


def test_a_budget_between_rollouts_is_rounded_up_and_said_once(lead_teacher):
    run_dir, out = lead_teacher
    said = "training 300 agent-steps: the budget of 200 rounded up to whole rollouts of 150"
    assert out.count(said) == 1
    for saved in ("policies/teacher", "checkpoint"):
        assert read_manifest(run_dir / saved)["training"] == {"agent_steps": 300, "iterations": 2}


def test_the_job_log_holds_what_the_stage_printed(lead_teacher):
    run_dir, out = lead_teacher
    log = (run_dir / "train.log").read_text()
    assert "training 300 agent-steps" in log
    assert f"teachers: {run_dir / 'policies' / 'teacher'}" in log and out.count("teachers: ") == 1


def test_runs_of_a_custom_envs_policies_are_filed_under_that_env(cli, lead_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("evaluate", f"eval.policy={lead_teacher[0]}", "logger=quiet", "eval.episodes=2", "eval.n_boot=20")
    assert rc == 0, err
    assert [p.parent.name for p in (tmp_path / "runs" / "evaluate").glob("*/*")] == ["lead"]


# ------------------------------------------------------------------ interrupted and resumed runs
PER_ITER = 25 * 2 * 4  # relay: n_steps x copies x agents


@pytest.fixture
def crashed_run(cli, tmp_path, monkeypatch):
    """A relay run that crashed in its fourth rollout, its last checkpoint at rollout 2, events up to rollout 3."""
    from madistill.rollout import Rollout

    calls, step = {"n": 0}, Rollout.step

    def crash_in_rollout_4(self):
        calls["n"] += 1
        if calls["n"] == 3 * 25 + 5:
            raise RuntimeError("simulated crash")
        return step(self)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(Rollout, "step", crash_in_rollout_4)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cli("train", "env=relay", *tiny(f"teacher.total_agent_steps={5 * PER_ITER}",
                                            f"teacher.checkpoint_every={2 * PER_ITER}"), f"hydra.run.dir={run_dir}")
    assert not (run_dir / "policies").exists() and (run_dir / "checkpoint" / "trainer_state.pt").is_file()
    return run_dir


def test_evaluating_an_interrupted_run_points_to_its_checkpoint(cli, crashed_run):
    rc, _, err = cli("evaluate", f"eval.policy={crashed_run}", "logger=quiet")
    assert rc == 2
    line = _one_error_line(err, "evaluate")
    assert f"pass its checkpoint {crashed_run / 'checkpoint'} instead" in line
    assert f"madistill train teacher.resume={crashed_run / 'checkpoint'}" in line


def test_an_interrupted_fine_tunes_checkpoint_is_not_offered_to_teacher_resume(cli, crashed_run, tmp_path):
    """A fine-tune does not resume; its checkpoint holds a student, which a teacher's resume cannot load."""
    manifest = crashed_run / "checkpoint" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "role": "finetune_checkpoint"}))
    rc, _, err = cli("evaluate", f"eval.policy={crashed_run}", "logger=quiet")
    assert rc == 2 and "a fine-tune does not resume: run `madistill finetune` again" in _one_error_line(err, "evaluate")
    rc, _, err = cli("train", f"teacher.resume={crashed_run / 'checkpoint'}", "logger=quiet")
    assert rc == 2
    assert "is an interrupted fine-tune's checkpoint, which teacher.resume cannot continue" in _one_error_line(err, "train")
    assert not list(crashed_run.glob(".hydra/resumed_*"))


def test_evaluating_a_sweep_says_which_runs_it_leaves_out(cli, crashed_run, relay_teacher, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(relay_teacher, sweep / "0")
    shutil.copytree(crashed_run, sweep / "1")  # interrupted: a checkpoint, no policies
    shutil.copytree(relay_teacher, sweep / "2")
    shutil.copytree(relay_teacher / "policies" / "teacher", sweep / "2" / "policies" / "student")  # a student in one run
    rc, _, err = cli("evaluate", f"eval.policy={sweep}", "eval.episodes=2", "logger=quiet", f"hydra.run.dir={tmp_path / 'ev'}")
    assert rc == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("madistill: note:")]
    assert notes == [f"madistill: note: skipped {sweep / '1'}: its training was interrupted before it saved policies "
                     f"(finish the run with `madistill train teacher.resume={sweep / '1' / 'checkpoint'}`)",
                     "madistill: note: student pools 1 of 2 runs: 0 saved no student"]


def test_resuming_continues_the_same_run_directory_and_curve(cli, crashed_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original_record = (crashed_run / ".hydra" / "config.yaml").read_text()
    resume = f"teacher.resume={crashed_run / 'checkpoint'}"
    rc, _, err = cli("train", "env=relay", *tiny(f"teacher.total_agent_steps={2 * PER_ITER}"), resume)
    assert rc == 2 and "already at" in _one_error_line(err, "train")  # a failed resume leaves the run as it was
    assert not list((crashed_run / ".hydra").glob("resumed_*")) and (crashed_run / "checkpoint").is_dir()

    # the run's own settings (env=relay, the tiny budgets) come back from its .hydra/overrides.yaml
    rc, out, err = cli("train", f"teacher.total_agent_steps={5 * PER_ITER}", resume)
    assert rc == 0, err
    assert not (tmp_path / "runs").exists() and f"teachers: {crashed_run / 'policies' / 'teacher'}" in out
    assert f"resuming {crashed_run / 'checkpoint'} at {2 * PER_ITER} of {5 * PER_ITER} agent-steps" in out
    assert read_manifest(crashed_run / "policies" / "teacher")["training"]["agent_steps"] == 5 * PER_ITER
    assert (crashed_run / ".hydra" / "config.yaml").read_text() == original_record
    (record,) = (crashed_run / ".hydra").glob("resumed_*")
    assert resume in (record / "overrides.yaml").read_text() and "env=relay" in (record / "overrides.yaml").read_text()
    ea = EventAccumulator(str(crashed_run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    # one curve: rollout 3 that the crash logged is replaced by the resumed run's, not drawn twice
    assert [e.step for e in ea.Scalars("charts/SPS")] == [k * PER_ITER for k in range(1, 6)]


def test_resuming_a_pipelines_teacher_with_train_would_orphan_its_student_and_is_refused(cli, tmp_path):
    for d in ("checkpoint", "policies/student"):
        (tmp_path / "run" / d).mkdir(parents=True)
    ckpt = tmp_path / "run" / "checkpoint"
    rc, _, err = cli("train", "env=relay", "logger=quiet", f"teacher.resume={ckpt}")
    assert rc == 2
    assert f"resume it with `madistill pipeline teacher.resume={ckpt}`" in _one_error_line(err, "train")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint", "policies"]


def test_a_pipeline_interrupted_while_distilling_resumes_to_distil_its_trained_teacher(cli, tmp_path, monkeypatch):
    from madistill.stages import distill

    run = tmp_path / "run"
    settings = tiny("env=relay", "teacher.total_agent_steps=200", "distill.rounds=1", "eval.episodes=2")
    with monkeypatch.context() as mp:
        def interrupt(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        mp.setattr(distill, "distill_students", interrupt)
        rc, _, err = cli("pipeline", *settings, f"hydra.run.dir={run}")
    assert rc == 130 and (run / "policies" / "teacher").is_dir() and not (run / "policies" / "student").exists()
    assert err.splitlines()[-1] == f"madistill pipeline: interrupted: resume with teacher.resume={run / 'checkpoint'}"
    weights = (run / "policies" / "teacher" / "agent.safetensors").read_bytes()
    rc, out, err = cli("pipeline", f"teacher.resume={run / 'checkpoint'}")  # its settings come back from the run
    assert rc == 0, err
    assert f"teacher: trained to 200 agent-steps before the run stopped ({run / 'policies' / 'teacher'}): distilling it" in out
    assert (run / "policies" / "student" / "manifest.json").is_file() and (run / "reports" / "eval.md").is_file()
    assert (run / "policies" / "teacher" / "agent.safetensors").read_bytes() == weights  # not trained again
    # the finished pipeline is not distilled again
    report = (run / "reports" / "eval.md").read_text()
    rc, _, err = cli("pipeline", f"teacher.resume={run / 'checkpoint'}")
    assert rc == 2 and f"the pipeline at {run} finished (its teacher at 200 agent-steps" in _one_error_line(err, "pipeline")
    assert (run / "reports" / "eval.md").read_text() == report
    # a student and report older than the run's teacher (trained further since) are of another teacher
    later = (run / "reports" / "eval.md").stat().st_mtime_ns + 10**9
    os.utime(run / "policies" / "teacher" / "manifest.json", ns=(later, later))
    rc, out, err = cli("pipeline", f"teacher.resume={run / 'checkpoint'}")
    assert rc == 0 and "distilling it" in out, err


def test_a_failed_resumed_run_that_replaced_its_checkpoint_keeps_what_it_wrote(tmp_path):
    from madistill.cli import _drop_failed_start

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "manifest.json").write_text("{}")
    (run / ".hydra").mkdir()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    os.utime(run / "checkpoint" / "manifest.json", ns=(1, 1))  # replaced in place by the resumed run
    (run / "tb").mkdir()
    (run / "tb" / "events").write_text("new curve")
    _drop_failed_start(run, before, run / ".hydra" / "resumed_x", run / "train.log", tmp_path)
    assert (run / "tb" / "events").exists()
    # nothing saved: what the failed attempt added goes, the run's earlier files stay
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    (run / "tb" / "more").write_text("x")
    _drop_failed_start(run, before, run / ".hydra" / "resumed_y", run / "train.log", tmp_path)
    assert not (run / "tb" / "more").exists() and (run / "tb" / "events").exists()


def test_a_manifest_whose_env_is_no_mapping_is_refused_in_one_line(cli, relay_teacher, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(relay_teacher, run)
    manifest = run / "policies" / "teacher" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "env": [1]}))
    rc, _, err = cli("evaluate", f"eval.policy={run}", "logger=quiet", f"hydra.run.dir={tmp_path / 'ev'}")
    assert rc == 2 and "Traceback" not in err and str(run) in _one_error_line(err, "evaluate")
