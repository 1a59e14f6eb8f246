"""Reliability: envs that used to crash training, errors that used to be tracebacks, output that used to
mislead, and resuming a run into its own directory."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny
from gymnasium import spaces
from pettingzoo import ParallelEnv

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


def test_help_into_a_closed_pipe_is_one_line_and_exit_2():
    proc = subprocess.Popen([sys.executable, "-m", "madistill", "train", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line, as `| head` is after its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 2
    assert "output pipe closed" in _one_error_line(err, "train")


@pytest.mark.parametrize("override", ["env.num_envs=0", "env.target=???"])
def test_a_failed_start_leaves_no_run_directory_behind(cli, tmp_path, override):
    run_dir = tmp_path / "run"
    extra = ["env=custom"] if override.startswith("env.target") else ["env=relay"]
    rc, _, err = cli("train", *extra, "logger=quiet", override, f"hydra.run.dir={run_dir}")
    assert rc == 2
    _one_error_line(err, "train")  # a missing value is one line too, without Hydra's "Error executing job"
    assert not run_dir.exists()
