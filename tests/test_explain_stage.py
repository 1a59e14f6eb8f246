"""The ``madistill explain`` stage: reports, curves, heatmaps and maps for a teacher and its student; errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from madistill.config import ValidationAttack
from madistill.explain.attribution import METHODS

FAST = ("explain.episodes=1", "explain.max_observations=12", "explain.ig_steps=8", "explain.smoothgrad_samples=4",
        "explain.shap_samples=16", "explain.lime_samples=16", "explain.random_orders=2",
        "explain.infidelity_samples=4", "explain.sensitivity_samples=2", "explain.randomisation_draws=2",
        "explain.n_boot=100", "attack.steps=2", "attack.restarts=1", "attack.eps=[0.1,0.3]", "logger.progress=false")


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """A tiny speaker-listener teacher and its DIGR student in one run, trained once for this module."""
    from conftest import compose_config, tiny

    from madistill.stages.distill import distill_students
    from madistill.stages.train import train_teachers
    from madistill.tb import TBLogger

    run = tmp_path_factory.mktemp("runs")
    cfg = compose_config(tiny("teacher.total_agent_steps=1500"))
    train_teachers(cfg, run, TBLogger(run / "tb", enabled=False))
    cfg = compose_config(tiny(f"distill.teacher={run}", "distill.rounds=1", "eval.random_baseline=false"))
    distill_students(cfg, run, run, TBLogger(run / "tb", enabled=False))  # one run, as the pipeline's
    return run


def test_explain_writes_reports_curves_heatmaps_and_maps(cli, student_run, tmp_path):
    from conftest import tiny

    run = tmp_path / "explain"
    rc, out, err = cli("explain", *tiny(f"explain.policy={student_run}", *FAST, "logger=default",
                                        "logger.progress=false", "fault=dead", "fault.victims=[speaker_0]", "fault.onset=20"),
                       f"hydra.run.dir={run}")
    assert rc == 0, err
    reports = run / "reports"
    result = json.loads((reports / "explain.json").read_text())
    # the episodes the observations come from played under the fault, and the reports say so
    assert result["meta"]["fault"]["name"] == "dead" and "Under fault 'dead' on speaker_0" in out
    assert set(result["results"]) == {"teacher", "student"}  # every policy of the run
    groups = {"speaker": 3, "listener": 5}  # feature groups of each agent group (env.features)
    for by_group in result["results"].values():
        assert set(by_group) == set(groups)
        for g, methods in by_group.items():
            assert list(methods) == ["random order", *METHODS]
            for m, s in methods.items():
                deletion, insertion = s["curves"]["deletion"], s["curves"]["insertion"]
                assert len(deletion) == len(insertion) == groups[g] + 1
                # both curves run between the clean input's and the baseline's probability of the chosen action
                assert deletion[0] == pytest.approx(insertion[-1]) and deletion[-1] == pytest.approx(insertion[0])
                assert 0 < s["deletion_auc"]["mean"] < 1 and s["deletion_auc"]["n"] == 12
                assert s["deletion_auc"]["mean_ci"][0] <= s["deletion_auc"]["mean"] <= s["deletion_auc"]["mean_ci"][1]
                assert 0 <= s["deletion_ood"]["mean"] <= 1
                if m != "random order":
                    assert list(s["attack"]) == ["0.1", "0.3"] and s["infidelity"]["mean"] >= 0
                    assert list(s["randomisation"]) == ["top", "top-1"]  # both have one hidden layer (TINY)
                    assert s["randomisation"]["top-1"]["draws"] == 2
                    assert list(s["randomisation_signed"]) == ["top", "top-1"]
                    assert s["randomisation_verdict"] in ("passes", "fails", "inconclusive")
    text = (reports / "explain.md").read_text()
    assert "## speaker" in text and "| student | lrp |" in text and "(eps 0.3)" in text
    assert "| teacher | random order |" in out
    for name in ("explain_listener_maps", "explain_speaker_maps", "explain_listener_student_curves"):
        assert (reports / f"{name}.png").is_file()
    arrays = np.load(reports / "explain.npz")
    maps = arrays["student/listener/integrated_gradients"]
    assert maps.shape == (12, 5) and np.allclose(maps.max(1), 1.0)
    # the written observations can be fed back, with the same maps
    rc, _, err = cli("explain", *tiny(f"explain.policy={student_run}", *FAST, f"explain.obs={reports / 'explain.npz'}",
                                      "explain.methods=[kernel_shap]", "explain.attack=null"),
                     f"hydra.run.dir={tmp_path / 'again'}")
    assert rc == 0, err
    again = np.load(tmp_path / "again" / "reports" / "explain.npz")
    np.testing.assert_allclose(again["student/listener/kernel_shap"], arrays["student/listener/kernel_shap"], atol=1e-6)
    assert "attack" not in json.loads((tmp_path / "again" / "reports" / "explain.json").read_text())[
        "results"]["student"]["listener"]["kernel_shap"]


@pytest.mark.parametrize(("override", "message"), [
    ("explain.methods=[gradient,occlusion]", "explain.methods cannot be 'occlusion': use explain.methods=[<any of "
     "gradient, input_x_gradient, integrated_gradients, smoothgrad, lrp, kernel_shap, lime, perturbation>]"),
    ("explain.target=log_prob", "explain.target cannot be 'log_prob': use explain.target=<one of prob, logit>"),
    ("explain.attack=critic", "explain.attack cannot be 'critic': use explain.attack=<one of "
     f"{', '.join(a.value for a in ValidationAttack)}>"),
    ("explain.methods=[]", "explain.methods must be a non-empty list, got []"),
    ("explain.max_observations=0", "explain.max_observations must be at least 1"),
])
def test_explain_errors_are_one_line_and_write_nothing(cli, student_run, tmp_path, override, message):
    from conftest import tiny

    rc, out, err = cli("explain", *tiny(f"explain.policy={student_run}", override), f"hydra.run.dir={tmp_path / 'r'}")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "reports").exists()


def test_explain_without_a_policy_names_the_setting(cli, tmp_path):
    from conftest import tiny

    rc, _, err = cli("explain", *tiny(), f"hydra.run.dir={tmp_path / 'r'}")
    assert rc == 2 and "pass explain.policy=<run or policy directory>" in err
