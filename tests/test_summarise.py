"""experiments/summarise.py on hand-made run directories, and the library's recovery it reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny

from madistill.stages.results import recovery

T_975_1 = 12.706204736174698  # Student's t quantile 0.975 with one degree of freedom (two seeds)


@pytest.fixture
def summarise(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import summarise

    return summarise


def _run(path: Path, seed: int, overrides: list[str], evals: dict[str, float] | None = None) -> Path:
    """A run directory as Hydra and the stages leave it: overrides, config (seed) and eval reports."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    (path / "reports").mkdir()
    for name, mean in (evals or {}).items():
        (path / "reports" / f"eval_{name}.json").write_text(json.dumps({"summary": {"team": {"mean": mean}}}))
    if evals:
        (path / "reports" / "eval.md").write_text("# Evaluation\n")  # written last: the evaluation finished
    return path


def _robustness(clean: float, worst: float, random: float = -30.0) -> dict:
    return {"clean": clean, "random": random, "worst_case": {"all": {"0.2": ["pgd", worst], "3.0": ["pgd", -99.0]}}}


def _experiment(tmp_path: Path) -> Path:
    """Two seeds of one recipe distilled (teacher -10, random -30; students -12 and -14), plus one seed of
    another recipe, then one attack run of the sweep (teacher -10 clean, -20 worst; students -15 and -17)."""
    root = tmp_path / "exp"
    sweep = root / "distill"
    for seed, student in ((0, -12.0), (1, -14.0)):
        _run(sweep / f"s{seed}", seed, ["+experiment=spread_robust", f"seed={seed}", "distill.teacher=/t"],
             {"teacher": -10.0, "student": student, "random": -30.0})
    _run(root / "r16" / "s0", 0, ["+experiment=spread_robust", "distill.rounds=16", "seed=0"],
         {"teacher": -10.0, "student": -10.0, "random": -30.0})
    attack = _run(root / "attack", 0, ["attack.policy=" + str(sweep)])
    report = {"meta": {"attack": {"policy": str(sweep), "eps": [0.2]}},
              "results": {"teacher@teacher": _robustness(-10.0, -20.0), "student@s0": _robustness(-11.0, -15.0),
                          "student@s1": _robustness(-13.0, -17.0)}}
    (attack / "reports" / "robustness.json").write_text(json.dumps(report))
    return root


def test_recovery_is_the_share_of_the_teachers_loss_the_student_gets_back():
    assert recovery(-15.0, -10.0, -20.0) == pytest.approx(0.5)
    assert recovery(-22.0, -10.0, -20.0) == pytest.approx(-0.2)  # worse than the teacher under attack
    assert math.isnan(recovery(-15.0, -10.0, -10.0))  # the attack costs the teacher nothing


def test_summary_pools_seeds_of_a_recipe_with_t_intervals(summarise, tmp_path):
    table = summarise.summarise([_experiment(tmp_path)])
    retained = {r["recipe"]: r for r in table["retention"]}
    assert set(retained) == {"+experiment=spread_robust", "+experiment=spread_robust distill.rounds=16"}
    # retention (R_s - R_r) / (R_t - R_r): 18/20 = 0.9 and 16/20 = 0.8; two seeds: sd 0.0707, se 0.05
    pooled = retained["+experiment=spread_robust"]
    assert pooled["seeds"] == [0, 1]
    assert pooled["retention"] == pytest.approx([0.85, 0.85 - 0.05 * T_975_1, 0.85 + 0.05 * T_975_1])
    assert retained["+experiment=spread_robust distill.rounds=16"]["retention"] == pytest.approx([1.0] * 3)
    # only the attack's own eps (0.2), not the checks' 3.0
    (row,) = table["robustness"]
    assert (row["recipe"], row["policy"], row["victims"], row["eps"]) == ("+experiment=spread_robust", "student", "all", 0.2)
    assert row["seeds"] == [0, 1] and (row["teacher_clean"], row["teacher_worst"]) == (-10.0, -20.0)
    # recovery (W_s - W_t) / (C_t - W_t): 5/10 and 3/10; sd 0.1414, se 0.1
    assert row["recovery"] == pytest.approx([0.4, 0.4 - 0.1 * T_975_1, 0.4 + 0.1 * T_975_1])
    assert row["worst"] == pytest.approx([-16.0, -16.0 - T_975_1, -16.0 + T_975_1])
    # clean retention on the attack's episodes: 19/20 and 17/20
    assert row["retention"][0] == pytest.approx(0.9)


def test_cli_prints_and_writes_the_tables(summarise, tmp_path, capsys):
    out = tmp_path / "results" / "spread"
    assert summarise.main([str(_experiment(tmp_path)), "--out", str(out)]) == 0
    printed, said = capsys.readouterr()
    assert said == f"wrote {out}.md and {out}.json\n"
    assert "| +experiment=spread_robust | 0,1 | 85% [21%, 149%] |" in printed
    assert "| +experiment=spread_robust | student | 0,1 | all | 0.2 | 90% [" in printed
    assert "-10.00 / -20.00 | -16.00 [-28.71, -3.29] | 40% [-87%, 167%] |" in printed
    assert Path(f"{out}.md").read_text() == printed
    assert json.loads(Path(f"{out}.json").read_text())["robustness"][0]["recovery"][0] == pytest.approx(0.4)


def test_runs_whose_reports_do_not_read_are_named_and_left_out(summarise, tmp_path, capsys):
    root = _experiment(tmp_path)
    (root / "distill" / "s1" / "reports" / "eval.md").unlink()  # its evaluation stopped before the end
    broken = _run(root / "broken" / "s0", 0, ["+experiment=spread_robust", "seed=0"])
    (broken / "reports" / "cascade.json").write_text('{"meta": ')  # cut short
    assert summarise.main([str(root)]) == 0
    printed, said = capsys.readouterr()
    notes = said.splitlines()
    assert notes[0].startswith(f"summarise: note: skipped {broken}: a report of it is not complete (JSONDecodeError")
    assert notes[1] == (f"summarise: note: skipped the retention of {root / 'distill' / 's1'}: its evaluation did not "
                        "finish (no eval.md beside eval_random.json, eval_student.json, eval_teacher.json)")
    # one seed of the recipe left: its retention has no interval, and says so
    assert "| +experiment=spread_robust | 0 | 90% (one seed) |" in printed
    assert summarise.fmt([math.nan, math.nan, math.nan], pct=True) == "n/a"  # a teacher no better than random


def test_no_reports_is_a_one_line_error(summarise, tmp_path, capsys):
    assert summarise.main([str(tmp_path)]) == 2
    assert summarise.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("summarise: error: ") for line in err)
    assert "no run reports found" in err[0] and "no such directory" in err[1]
    assert not (tmp_path / "x.md").exists()


def test_an_experiment_sweeps_seeds_into_its_own_directory_that_summarise_reads(summarise, cli, tmp_path, monkeypatch):
    """``madistill pipeline -m +experiment=<name> seed=0,1`` files each seed's run under
    runs/experiments/<name>/pipeline/s<seed>; the summariser pools them into one recipe row."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("pipeline", "-m", *tiny("+experiment=sl_long", "teacher.total_agent_steps=300", "seed=0,1"))
    assert rc == 0, err
    root = tmp_path / "runs" / "experiments" / "sl_long"
    assert sorted(p.name for p in (root / "pipeline").iterdir() if p.is_dir()) == ["s0", "s1"]
    assert all((root / "pipeline" / s / "reports" / "eval_student.json").is_file() for s in ("s0", "s1"))
    (row,) = summarise.summarise([root])["retention"]
    assert row["seeds"] == [0, 1] and row["recipe"].startswith("+experiment=sl_long ")


def _cascade_run(path: Path, overrides: list[str], policies: dict[str, Path], faults: dict[str, dict[str, tuple]]) -> None:
    """A cascade run: ``faults[label][fault] = (cascade size, non-faulted return delta)`` per studied policy."""
    _run(path, 0, overrides)
    results = {label: {"faults": {f: {"cascade": {"size_mean": size, "others_return_delta": delta}}
                                  for f, (size, delta) in by_fault.items()}} for label, by_fault in faults.items()}
    meta = {"policies": {label: str(p / "policies" / label.split("@")[0]) for label, p in policies.items()}}
    (path / "reports" / "cascade.json").write_text(json.dumps({"meta": meta, "policies": results}))


def test_cascade_sweeps_pool_over_the_studied_policies_seeds(summarise, tmp_path, capsys):
    """A ``-m fault=noise,random cascade.policy=<s0>,<s1>`` sweep (one policy per run), and one cascade run over
    the sweep directory (two policies, labelled name@run): rows per policy recipe, policy, settings and fault."""
    root = tmp_path / "exp"
    teachers = {s: _run(root / "train" / f"s{s}", s, ["env=relay", f"seed={s}"]) for s in (0, 1)}
    for i, (fault, s, size, delta) in enumerate([("noise", 0, 1.0, -0.5), ("noise", 1, 2.0, -1.5),
                                                 ("random", 0, 3.0, -2.0), ("random", 1, 3.0, -2.0)]):
        _cascade_run(root / "sweep" / str(i), [f"fault={fault}", f"cascade.policy={teachers[s]}"], {"teacher": teachers[s]},
                     {"teacher": {f"{fault}@agent_0": (size, delta)}})
    _cascade_run(root / "over_dir", ["cascade.episodes=30"], {f"teacher@s{s}": teachers[s] for s in (0, 1)},
                 {f"teacher@s{s}": {"dead@agent_1": (0.5 * (s + 1), -0.1 * (s + 1))} for s in (0, 1)})
    rows = {(r["settings"], r["fault"]): r for r in summarise.summarise([root])["cascade"]}
    assert set(rows) == {("fault=noise", "noise@agent_0"), ("fault=random", "random@agent_0"),
                         ("cascade.episodes=30", "dead@agent_1")}
    assert all(r["recipe"] == "env=relay" and r["policy"] == "teacher" and sorted(r["seeds"]) == [0, 1]
               for r in rows.values())
    # sizes 1 and 2: mean 1.5, sd 0.7071, se 0.5; deltas -0.5 and -1.5 the same spread
    noise = rows[("fault=noise", "noise@agent_0")]
    assert noise["size"] == pytest.approx([1.5, 1.5 - 0.5 * T_975_1, 1.5 + 0.5 * T_975_1])
    assert noise["others_return_delta"] == pytest.approx([-1.0, -1.0 - 0.5 * T_975_1, -1.0 + 0.5 * T_975_1])
    assert rows[("fault=random", "random@agent_0")]["size"] == pytest.approx([3.0] * 3)  # no spread over seeds
    dead = rows[("cascade.episodes=30", "dead@agent_1")]
    assert dead["size"] == pytest.approx([0.75, 0.75 - 0.25 * T_975_1, 0.75 + 0.25 * T_975_1])
    assert summarise.main([str(root)]) == 0
    assert "| env=relay | teacher | fault=noise | noise@agent_0 | 0,1 | 1.50 [-4.85, 7.85] | -1.00 [-7.35, 5.35] |" \
        in capsys.readouterr().out


def test_an_attack_of_a_one_seed_sweep_files_its_student_under_that_seed(summarise, tmp_path):
    # one run: the report labels its policies by name alone, and names each policy's directory in its meta
    root = tmp_path / "exp"
    run = _run(root / "distill" / "s0", 0, ["+experiment=spread_robust", "seed=0"],
               {"teacher": -10.0, "student": -12.0, "random": -30.0})
    attack = _run(root / "attack", 0, ["attack.policy=" + str(root / "distill")])
    report = {"meta": {"attack": {"policy": str(root / "distill"), "eps": [0.2]},
                       "policies": {"teacher": str(run / "policies" / "teacher"), "student": str(run / "policies" / "student")}},
              "results": {"teacher": _robustness(-10.0, -20.0), "student": _robustness(-11.0, -15.0)}}
    (attack / "reports" / "robustness.json").write_text(json.dumps(report))
    (row,) = summarise.summarise([root])["robustness"]
    assert (row["recipe"], row["seeds"]) == ("+experiment=spread_robust", [0])
    assert row["recovery"][0] == pytest.approx(0.5)  # (-15 - -20) / (-10 - -20)
