"""The configured fault (``fault=<name> fault.victims=[...]``) in the other stages that roll out: attack, saliency
and explain play their episodes under it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import call_cli, tiny

CHAIN = ["env=relay", "env.kwargs.max_cycles=12"]
DEAD_SOURCE = ["fault=dead", "fault.victims=[agent_0]", "fault.onset=0"]
ATTACK = ["attack=quick", "attack.methods=[random]", "attack.eps=[0.3]", "attack.victims=[agent_2]",
          "attack.episodes=4", "attack.seed=500"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("faults") / "teacher"
    with pytest.MonkeyPatch.context() as mp:
        assert call_cli(["train", *tiny(*CHAIN, "teacher.total_agent_steps=3000"), f"hydra.run.dir={run}"], mp) == 0
    return run


def test_attack_plays_its_clean_and_attacked_episodes_under_the_fault(cli, teacher, tmp_path):
    fault = ["fault=random", "fault.victims=[agent_0]", "fault.onset=2"]
    rc, _, err = cli("attack", *tiny(*ATTACK, f"attack.policy={teacher}", *fault), f"hydra.run.dir={tmp_path / 'f'}")
    assert rc == 0, err
    faulted = json.loads((tmp_path / "f" / "reports" / "robustness.json").read_text())
    assert faulted["meta"]["fault"]["name"] == "random" and faulted["meta"]["fault"]["victims"] == ["agent_0"]
    assert "Under fault 'random' on agent_0" in (tmp_path / "f" / "reports" / "robustness.md").read_text()
    rc, _, err = cli("attack", *tiny(*ATTACK, f"attack.policy={teacher}"), f"hydra.run.dir={tmp_path / 'c'}")
    assert rc == 0, err
    clean = json.loads((tmp_path / "c" / "reports" / "robustness.json").read_text())
    assert clean["meta"]["fault"] is None
    # the same episodes evaluated under the same fault give the faulted clean return exactly
    rc, _, err = cli("evaluate", *tiny(f"eval.policy={teacher}", "eval.episodes=4", "eval.seed=500",
                                       "eval.random_baseline=false", *fault), f"hydra.run.dir={tmp_path / 'e'}")
    assert rc == 0, err
    evaluated = json.loads((tmp_path / "e" / "reports" / "eval_teacher.json").read_text())["summary"]
    f_clean, c_clean = faulted["results"]["teacher"]["clean"], clean["results"]["teacher"]["clean"]
    assert f_clean == pytest.approx(evaluated["team"]["mean"]) and f_clean != pytest.approx(c_clean)


def _source_symbols_heard(run, stage: str) -> np.ndarray:
    """Per step, the symbol agent_1 hears from agent_0 in the stage's saved observations (-1: none yet)."""
    obs = np.load(run / "reports" / f"{stage}.npz")["obs/agent"].reshape(-1, 4, 3)[:, 1]
    return np.where(obs.any(-1), obs.argmax(-1), -1)


@pytest.mark.parametrize("stage", ["saliency", "explain"])
def test_saliency_and_explain_collect_their_observations_under_the_fault(cli, teacher, tmp_path, stage):
    args = [f"{stage}.policy={teacher}", f"{stage}.episodes=2"] + (["explain.methods=[gradient]"] if stage == "explain" else [])
    rc, _, err = cli(stage, *tiny(*args, *DEAD_SOURCE), f"hydra.run.dir={tmp_path / 'f'}")
    assert rc == 0, err
    rc, _, err = cli(stage, *tiny(*args), f"hydra.run.dir={tmp_path / 'c'}")
    assert rc == 0, err
    heard_faulted, heard_clean = _source_symbols_heard(tmp_path / "f", stage), _source_symbols_heard(tmp_path / "c", stage)
    assert set(heard_faulted.tolist()) == {-1, 0}  # the dead source only ever sends symbol 0
    assert set(heard_clean.tolist()) - {-1, 0}  # a live source sends others
