"""Robust RL fine-tuning (madistill finetune): weight transfer, the SA-PPO regulariser, the stage end to end."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack
from madistill.common.divergences import divergence
from madistill.envs import EnvSpec, group_agents, make_env
from madistill.finetune import SmoothnessRegulariser, actor_critic_team, student_from_actor
from madistill.normalize import ObsNormalizer
from madistill.policies import MLPPolicy, SB3Policy, TeamPolicy
from madistill.policies.store import load_team, read_manifest
from madistill.sb3_adapter import set_progress, take_logged
from madistill.teacher import add_extra_loss, build_model


def _teams(continuous: bool, critic_dim: int = 0) -> tuple[TeamPolicy, TeamPolicy]:
    spec = EnvSpec("mpe2.simple_spread_v3.parallel_env", {"N": 3, "continuous_actions": continuous})
    env = make_env(spec)
    groups = group_agents(env)
    env.close()
    torch.manual_seed(0)
    norm = {g.name: ObsNormalizer(g.obs_dim) for g in groups}
    teacher = TeamPolicy(groups, {g.name: SB3Policy.from_arch(g, {"hidden_sizes": [16, 16], "activation": "tanh",
                                                                   "team_state_dim": critic_dim}) for g in groups}, norm)
    student = TeamPolicy(groups, {g.name: MLPPolicy(g, {"hidden_sizes": [8, 8], "activation": "tanh"}) for g in groups}, norm)
    for p in student.parameters():  # not the zero log-std of a fresh student: the transfer must carry it
        torch.nn.init.normal_(p)
    return teacher, student


@pytest.mark.parametrize("continuous,critic_dim", [(False, 0), (True, 0), (False, 54)])
def test_actor_critic_acts_as_the_student_judges_as_the_teacher_and_converts_back(continuous, critic_dim):
    teacher, student = _teams(continuous, critic_dim)
    ac = actor_critic_team(student, teacher)
    g = teacher.groups[0]
    x = torch.randn(32, g.obs_dim)
    full = torch.randn(32, g.obs_dim + critic_dim)
    assert torch.equal(ac[g.name](x), student[g.name](x))
    assert torch.equal(ac[g.name].critic_value(full), teacher[g.name].critic_value(full))
    if continuous:
        assert torch.equal(ac[g.name].log_std(), student[g.name].log_std())
    assert ac[g.name].acting_parameters == student[g.name].num_parameters
    with torch.no_grad():  # a fine-tuned actor comes back as a student with its weights
        ac[g.name].sb3.action_net.bias += 1.0
    back = student_from_actor(ac, student)
    assert torch.allclose(back[g.name](x), ac[g.name](x))
    assert not torch.equal(back[g.name](x), student[g.name](x))


def test_smoothness_regulariser_makes_the_actor_harder_to_move_and_leaves_the_critic():
    teacher, student = _teams(False)
    g = teacher.groups[0]
    ac = actor_critic_team(student, teacher)
    model = build_model(g, 2, ac[g.name].arch, {"n_steps": 64, "batch_size": 64, "learning_rate": 3e-3}, 0, "cpu")
    model.policy.load_state_dict(ac[g.name].sb3.state_dict())
    buf = model.rollout_buffer
    buf.observations[:] = np.random.default_rng(0).normal(size=buf.observations.shape)
    buf.valid[:], buf.full = True, True
    next(buf.get(64))  # as train() leaves it: flattened, its live entries indexed
    set_progress(model, 50, 100)  # past the ramp: the full radius
    settings = OmegaConf.create({"smooth_weight": 1.0, "eps": 0.3, "steps": 3, "ramp": 0.2})
    budget = Budget.build(1.0, g.obs_dim, excluded=[0, 1])
    reg = SmoothnessRegulariser(budget, settings, torch.Generator().manual_seed(0))
    add_extra_loss(model, g, SB3Policy(g, model.policy, ac[g.name].arch), reg)
    assert [reg.current_eps(p) for p in (0.0, 0.1, 0.5)] == pytest.approx([0.0, 0.15, 0.3])
    x = torch.as_tensor(buf.observations[:256])
    strong = Attack("pgd", "kl", steps=10, restarts=3)

    def moved() -> float:
        actor = SB3Policy(g, model.policy, ac[g.name].arch)
        with torch.no_grad():
            x_adv = strong(actor, x, budget.scaled(0.3), torch.Generator().manual_seed(1))
            return float(divergence("kl", actor(x), actor(x_adv), discrete=True).mean())

    critic = {k: v.clone() for k, v in model.policy.state_dict().items() if "value" in k}
    before = moved()
    for _ in range(200):  # steps on the regulariser alone: the hook adds its gradient before each
        model.policy.optimizer.zero_grad()
        model.policy.optimizer.step()
    assert moved() < 0.5 * before
    assert all(torch.equal(v, model.policy.state_dict()[k]) for k, v in critic.items())
    logged = take_logged(model, 0)
    assert logged["extra/smooth_eps"] == pytest.approx(0.3) and logged["extra/smoothness"] > 0


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """A tiny spread teacher and its student, made once for this module."""
    from conftest import compose_config, tiny

    from madistill.stages.distill import distill_students
    from madistill.stages.train import train_teachers
    from madistill.tb import TBLogger

    root = tmp_path_factory.mktemp("finetune")
    cfg = compose_config(tiny("env=simple_spread_v3", "teacher.total_agent_steps=3000"))
    train_teachers(cfg, root / "teacher", TBLogger(root / "tb", enabled=False))
    cfg = compose_config(tiny("env=simple_spread_v3", f"distill.teacher={root / 'teacher'}"))
    distill_students(cfg, root / "student", cfg.distill.teacher, TBLogger(root / "tb", enabled=False))
    return root


def test_finetune_command_saves_a_drop_in_student_linked_to_its_teacher(cli, student_run, tmp_path):
    from conftest import tiny

    run = tmp_path / "ft"
    rc, out, err = cli("finetune", *tiny(f"finetune.policy={student_run / 'student'}", "finetune.total_agent_steps=600",
                                         "finetune.eps=0.2", "finetune.select_every=0", "logger.progress=false"),
                       f"hydra.run.dir={run}")
    assert rc == 0, err
    manifest = read_manifest(run / "policies" / "student")
    original = read_manifest(student_run / "student" / "policies" / "student")
    assert manifest["role"] == "student" and manifest["networks"] == original["networks"]
    assert manifest["config"]["distill"]["teacher"] == original["config"]["distill"]["teacher"]
    assert manifest["config"]["distill"]["rounds"] == original["config"]["distill"]["rounds"]  # how it was distilled
    assert manifest["config"]["finetune"]["policy"] == str(student_run / "student" / "policies" / "student")
    assert manifest["normalizers"] == original["normalizers"]  # fine-tuning keeps the input units
    tuned, before = load_team(run)[0], load_team(student_run / "student")[0]
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), before.parameters()))
    md = (run / "reports" / "eval.md").read_text()
    assert "| teacher |" in md and "| student |" in md and "student    team return IQM" in out
    assert f"re-evaluate: madistill evaluate eval.policy={run} eval.with_teacher=true " in out


def test_an_interrupted_fine_tune_saves_a_checkpoint_marked_as_one_that_does_not_resume(cli, student_run, tmp_path,
                                                                                        monkeypatch):
    from conftest import tiny

    from madistill.rollout import Rollout

    calls, step = {"n": 0}, Rollout.step

    def interrupt_later(self):
        calls["n"] += 1
        if calls["n"] == 60:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Rollout, "step", interrupt_later)
    run = tmp_path / "ft"
    rc, out, err = cli("finetune", *tiny(f"finetune.policy={student_run / 'student'}", "finetune.total_agent_steps=6000",
                                       "finetune.select_every=0", "logger.progress=false"), f"hydra.run.dir={run}")
    assert rc == 130, err
    assert read_manifest(run / "checkpoint")["role"] == "finetune_checkpoint"
    assert "a fine-tune starts afresh" in out + err


def test_finetune_errors_are_one_line(cli, student_run, tmp_path):
    from conftest import tiny

    for args, needle in [
        ((), "pass finetune.policy="),
        ((f"finetune.policy={student_run / 'teacher'}",), "has no student policy (it holds: teacher): pass a run with one"),
        ((f"finetune.policy={student_run / 'teacher' / 'policies' / 'teacher'}",), "records no teacher"),
        ((f"finetune.policy={student_run / 'student'}", "finetune.ramp=2"), "finetune.ramp"),
        ((f"finetune.policy={student_run / 'student'}", "finetune.select_attacks=[transfer]"), "finetune.select_attacks=["),
        ((f"finetune.policy={student_run / 'student'}", "finetune.select_robust_weight=2"), "finetune.select_robust_weight"),
    ]:
        rc, out, err = cli("finetune", *tiny(*args), f"hydra.run.dir={tmp_path / 'e'}")
        assert rc == 2 and needle in err and "Traceback" not in err, (args, err)


def test_a_run_without_a_teacher_is_no_teacher_to_distil_from(cli, student_run, tmp_path):
    """A distill run's student is not taken for the teacher a run directory should hold: named by its own
    directory, it is."""
    from conftest import tiny

    rc, _, err = cli("distill", *tiny("env=simple_spread_v3", f"distill.teacher={student_run / 'student'}"),
                     f"hydra.run.dir={tmp_path / 'd'}")
    assert rc == 2 and "has no teacher policy (it holds: student)" in err and not (tmp_path / "d").exists()


@pytest.mark.parametrize("objective", ["targeted_lowest", "targeted_lookahead"])
def test_finetune_collects_under_the_targeted_inner_adversary(cli, student_run, tmp_path, monkeypatch, objective):
    """``finetune.attack_objective``: the attacked steps are played under the suite's targeted PGD, with targets
    from the policy's ranking or from branches of the running episodes (spread branches on the batched port)."""
    from conftest import tiny

    from madistill.attacks.lookahead import LookaheadAttack
    from madistill.attacks.methods import Attack

    forced, branched = [], []
    force, force_all = Attack.force, LookaheadAttack._force_all

    def forcing_all(self, *a):
        adv, reached = force_all(self, *a)
        branched.extend(r.shape for r in reached)  # per victim: [rows, actions forced]
        return adv, reached

    monkeypatch.setattr(Attack, "force", lambda self, *a, **k: forced.append(self.method) or force(self, *a, **k))
    monkeypatch.setattr(LookaheadAttack, "_force_all", forcing_all)
    run = tmp_path / "ft"
    rc, out, err = cli("finetune", *tiny(f"finetune.policy={student_run / 'student'}", "finetune.total_agent_steps=600",
                                         f"finetune.attack_objective={objective}", "finetune.attack_fraction=1",
                                         "finetune.ramp=0", "finetune.select_every=0", "logger.progress=false"),
                       f"hydra.run.dir={run}")
    assert rc == 0, err
    assert forced and set(forced) == {"targeted"}
    # the lookahead forces every one of the 5 actions of every attacked copy; the policy's ranking branches nothing
    assert (bool(branched) and {s[1] for s in branched} == {5}) if objective == "targeted_lookahead" else not branched
    assert (run / "policies" / "student" / "manifest.json").is_file()


def test_finetune_alternates_the_director_with_the_student(cli, student_run, tmp_path, monkeypatch):
    """``finetune.attack_objective=director``: the director trains against the student before fine-tuning and
    again every ``finetune.director_every`` agent-steps (never after the last update), each time against the
    student's current weights, and its targets are forced on the acting student's attacked steps."""
    from conftest import tiny

    from madistill.attacks.learned import AlternatingDirector, Director

    trained, forced = [], []
    train_against, deltas = AlternatingDirector.train_against, Director.deltas

    def spy(self, team, unit_budgets, eps):
        trained.append(torch.cat([p.detach().flatten().clone() for p in team.parameters()]))
        train_against(self, team, unit_budgets, eps)

    monkeypatch.setattr(AlternatingDirector, "train_against", spy)
    monkeypatch.setattr(Director, "deltas", lambda self, *a: forced.append(1) or deltas(self, *a))
    run = tmp_path / "ft"
    rc, out, err = cli("finetune", *tiny(f"finetune.policy={student_run / 'student'}", "finetune.total_agent_steps=600",
                                         "finetune.attack_objective=director", "finetune.attack_fraction=1",
                                         "finetune.director_every=1", "finetune.ramp=0", "finetune.select_every=0",
                                         "attack.director_retrain_steps=64", "attack.director_envs=2",
                                         "attack.director_ppo={n_steps: 32, batch_size: 32}", "logger.progress=false"),
                       f"hydra.run.dir={run}")
    assert rc == 0, err
    # 600 agent-steps are 4 rollouts of 25 steps x 2 copies x 3 agents: trained before the first and after each
    # but the last
    steps = re.findall(r"training the director against the student of step (\d+):", out)
    assert steps == ["0", "150", "300", "450"] and len(trained) == 4
    assert all(not torch.equal(a, b) for a, b in zip(trained, trained[1:]))  # the student's weights as they were then
    assert forced


def test_ppo_learns_from_the_attacked_observations_when_collecting_under_attack(make_cfg):
    from madistill.attacks.budget import group_budgets
    from madistill.envs.features import feature_layouts
    from madistill.finetune import collection_attack
    from madistill.rollout import Rollout
    from madistill.runtime import env_spec, make_vec_env
    from madistill.teacher import TeacherTrainer
    from madistill.transforms import normalize

    cfg = make_cfg("env=simple_spread_v3", "finetune.attack_fraction=1", "finetune.eps=0.2")
    assert collection_attack([], {}, OmegaConf.merge(cfg.finetune, {"attack_fraction": 0.0})) == []
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv:
        layouts = feature_layouts(venv.groups, {}, venv.feature_names)
        budgets = group_budgets(1.0, layouts, {"agent": [0, 1]})
        (attack,) = collection_attack(venv.groups, budgets, cfg.finetune)
        assert attack.attack.objective == "ce" and attack.victims == ["agent_0", "agent_1", "agent_2"]
        with TeacherTrainer(cfg, venv, spec, torch.device("cpu"), None, transforms=[attack]) as trainer:
            seen = []

            def on_step(tr):  # the trainer's own step, recording what it was given
                seen.append((normalize(trainer.team, tr.raw_obs), tr.obs))
                trainer._on_step(tr)

            Rollout(venv, trainer.team, trainer.transforms, seed=0).run(steps=5, on_step=on_step)
    clean, attacked = seen[-1][0]["agent"], seen[-1][1]["agent"]
    delta = (attacked - clean).abs()
    assert float(delta[..., 2:].max()) == pytest.approx(0.2, abs=1e-5) and float(delta[..., :2].max()) == 0.0
    stored = torch.as_tensor(trainer.learners["agent"].collecting.observations[4]).reshape(attacked.shape)
    assert torch.allclose(stored, attacked)  # the buffer holds what the policy saw


@pytest.mark.slow
def test_best_policy_keeps_a_copy_of_the_best_on_paired_validation_episodes(make_cfg):
    from madistill.attacks.budget import group_budgets
    from madistill.envs.features import feature_layouts
    from madistill.runtime import env_spec, make_vec_env
    from madistill.selection import BestPolicy

    cfg = make_cfg("env=simple_spread_v3")
    with make_vec_env(cfg.env, env_spec(cfg.env)) as venv:
        budgets = group_budgets(1.0, feature_layouts(venv.groups, {}, venv.feature_names), {})
        a, b = (_teams(False)[1] for _ in range(2))
        for p in b.parameters():  # a different team: other weights
            torch.nn.init.normal_(p, std=2.0)
        best = BestPolicy(venv, budgets, cfg.attack, ["fgsm", "pgd"], 0.5, 6, 0.5, seed=123)
        first, second, again = best.offer(0, a), best.offer(1, b), best.offer(2, a)
        assert (again.clean, again.worst) == (first.clean, first.worst)  # the same episodes for every candidate
        assert first.clean != second.clean
        assert best.best == max(first, second, key=lambda v: v.score)  # a tie (again) keeps the earlier
        assert first.score == pytest.approx(0.5 * first.clean + 0.5 * first.worst)
        kept = best.team
        for p in (a if best.best.step == 0 else b).parameters():  # what was offered changes; the kept copy does not
            p.data.add_(1.0)
        assert best.offer(3, kept).clean == best.best.clean
        clean_only = BestPolicy(venv, budgets, cfg.attack, ["fgsm"], 0.0, 6, 1.0, seed=123)
        v = clean_only.offer(0, a)
        assert v.worst == v.clean == v.score  # no budget: the worst case is the clean return


@pytest.mark.slow
def test_finetune_saves_the_best_validated_candidate(cli, student_run, tmp_path):
    import json

    from conftest import tiny

    from madistill.attacks.budget import group_budgets
    from madistill.cli import compose_config
    from madistill.envs.features import feature_layouts
    from madistill.runtime import env_spec, make_vec_env
    from madistill.seeds import finetune_validation_seed
    from madistill.selection import BestPolicy

    run = tmp_path / "ft"
    overrides = tiny("env=simple_spread_v3", f"finetune.policy={student_run / 'student'}", "finetune.total_agent_steps=600",
                     "finetune.select_every=300", "finetune.learning_rate=0.01", "seed=3")
    rc, out, err = cli("finetune", *overrides, f"hydra.run.dir={run}")
    assert rc == 0, err
    report = json.loads((run / "reports" / "selection.json").read_text())
    history = report["history"]
    assert [v["step"] for v in history] == [0, 300, 600]  # the start, every 300 agent-steps (150 per iteration)
    assert report["chosen"] == max(history, key=lambda v: v["score"])
    assert f"selected the student of step {report['chosen']['step']} of 600" in out
    # the saved student is the chosen candidate: validated again on the same episodes, it scores the same
    cfg = compose_config(overrides)
    tuned, start = load_team(run)[0], load_team(student_run / "student")[0]
    with make_vec_env(cfg.env, env_spec(cfg.env)) as venv:
        layouts = feature_layouts(venv.groups, OmegaConf.to_container(cfg.env.features), venv.feature_names)
        budgets = group_budgets(1.0, layouts, cfg.attack.exclude, "cpu", cfg.attack.scale)
        again = BestPolicy(venv, budgets, cfg.attack, list(cfg.finetune.select_attacks), cfg.finetune.eps,
                           cfg.finetune.select_episodes, cfg.finetune.select_robust_weight,
                           finetune_validation_seed(3)).offer(0, tuned)
    assert (again.clean, again.worst) == (report["chosen"]["clean"], report["chosen"]["worst"])
    same_as_start = all(torch.equal(x, y) for x, y in zip(tuned.parameters(), start.parameters()))
    assert same_as_start == (report["chosen"]["step"] == 0)


def test_the_regulariser_joins_the_fast_update_as_it_joins_sb3s():
    """The same update with the smoothness regulariser, by madistill's fast update and by SB3's train(): the same
    weights and logged values (the regulariser's gradient joins PPO's before each optimiser step in both)."""
    teacher, student = _teams(False)
    g = teacher.groups[0]
    ac = actor_critic_team(student, teacher)
    results = []
    for fast in (True, False):
        model = build_model(g, 2, ac[g.name].arch, {"n_steps": 64, "batch_size": 48, "n_epochs": 2,
                                                     "learning_rate": 3e-3, "fast_update": fast}, 0, "cpu")
        model.policy.load_state_dict(ac[g.name].sb3.state_dict())
        buf, rng = model.rollout_buffer, np.random.default_rng(0)
        buf.observations[:] = rng.normal(size=buf.observations.shape)
        buf.advantages[:] = rng.normal(size=buf.advantages.shape)
        buf.returns[:] = rng.normal(size=buf.returns.shape)
        buf.valid[:], buf.full, buf.rng = True, True, np.random.default_rng(1)
        set_progress(model, 50, 100)
        settings = OmegaConf.create({"smooth_weight": 1.0, "eps": 0.3, "steps": 3, "ramp": 0.2})
        reg = SmoothnessRegulariser(Budget.build(1.0, g.obs_dim, excluded=[0, 1]), settings,
                                    torch.Generator().manual_seed(0))
        add_extra_loss(model, g, SB3Policy(g, model.policy, ac[g.name].arch), reg)
        model.train()
        results.append((torch.cat([p.detach().flatten() for p in model.policy.parameters()]), take_logged(model, 0)))
    (ours, our_logged), (sb3, sb3_logged) = results
    torch.testing.assert_close(ours, sb3, rtol=0, atol=1e-6)
    assert our_logged.keys() == sb3_logged.keys() and our_logged["extra/smoothness"] > 0
    for key, value in sb3_logged.items():
        assert our_logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
