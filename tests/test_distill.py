"""Distillation end to end: DAgger data, students, the DIGR effect on input gradients, the distill and
saliency commands, sweeps over the distillation fields."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from gymnasium import spaces
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_envs import TOY
from torch import nn

from madistill.common.collect import collect_labelled, collect_round
from madistill.distill.dataset import GroupData, MixedPolicy, mixed_team, rounds_beta
from madistill.distill.loss import DistillLoss
from madistill.envs.factory import EnvSpec
from madistill.envs.features import FeatureLayout
from madistill.envs.groups import AgentGroup
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import uniform_team
from madistill.explain.saliency import perturbation_saliency
from madistill.policies.base import Policy, greedy_actions
from madistill.policies.mlp import MLPPolicy
from madistill.policies.store import load_team, read_manifest


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny speaker-listener teacher, trained once for this module."""
    from conftest import compose_config, tiny

    from madistill.stages.train import train_teachers
    from madistill.tb import TBLogger

    run = tmp_path_factory.mktemp("teacher")
    cfg = compose_config(tiny("teacher.total_agent_steps=3000", "teacher.hidden_sizes=[32]"))
    train_teachers(cfg, run, TBLogger(run / "tb", enabled=False))
    return run


# ---------------------------------------------------------------- DAgger data
def test_beta_schedule():
    assert rounds_beta(4, 0.5, 0.5) == [1.0, 0.5, 0.25, 0.125]
    assert rounds_beta(1, 0.5, 0.5) == [1.0]


def test_mixed_policy_switches_per_sample_with_probability_beta():
    g = AgentGroup("g", ("a",), spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(3))

    class Const(Policy):
        def __init__(self, k: int):
            super().__init__()
            self.group, self.k = g, k
            self.p = nn.Parameter(torch.zeros(0))

        def forward(self, obs):
            return torch.nn.functional.one_hot(torch.full((len(obs),), self.k), 3).float() * 10

    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(20_000, 2)
    picked = MixedPolicy(Const(0), Const(2), 0.3, gen)(x).argmax(-1)
    assert set(picked.tolist()) == {0, 2}
    assert float((picked == 0).float().mean()) == pytest.approx(0.3, abs=0.015)
    assert torch.all(MixedPolicy(Const(0), Const(2), 0.0, gen)(x).argmax(-1) == 2)


def test_collection_skips_dead_agents_and_mixed_team_beta_one_is_the_teacher():
    with MultiAgentVecEnv(EnvSpec(TOY), 2, num_workers=0) as venv:
        team = uniform_team(venv)
        assert mixed_team(team, team, 1.0, 0) is team
        obs, episodes = collect_round(venv, team, seed=0, deterministic=False, episodes=2)
    x = obs["walker"].numpy()
    # walker_0 terminates at step 2 of each 5-step episode: 2 + 5 live observations per episode, no padding
    assert len(episodes) == 2 and len(x) == 2 * (2 + 5)
    assert np.all(x != 0)


def test_group_data_select_and_cat():
    d = GroupData(torch.arange(6.0).reshape(3, 2), torch.zeros(3, 2), torch.ones(3, 1), torch.zeros(3), torch.tensor([True, False, False]), torch.full((3,), -1))
    both = d.cat(d.select(~d.heldout))
    assert len(both) == 5 and both.heldout.sum() == 1


# ---------------------------------------------------------------- the DIGR effect
def test_large_lambda_suppresses_input_gradients_on_irrelevant_features():
    """The teacher reads feature 0 only; feature 1 is a copy of it. A plain student uses both copies; a DIGR
    student whose mask marks feature 1 irrelevant moves all of its input gradient onto feature 0."""
    torch.manual_seed(0)
    g = AgentGroup("g", ("a",), spaces.Box(-np.inf, np.inf, (4,), np.float32), spaces.Discrete(2))
    teacher = MLPPolicy(g, {"hidden_sizes": [], "activation": "tanh"})
    with torch.no_grad():
        teacher.net[0].weight.copy_(torch.tensor([[3.0, 0, 0, 0], [-3.0, 0, 0, 0]]))
        teacher.net[0].bias.zero_()
    x = torch.randn(2048, 4)
    x[:, 1] = x[:, 0]
    layout = FeatureLayout.build(4)
    sal = perturbation_saliency(teacher, x, layout)
    # perturbation saliency sees feature 0 only (the teacher ignores the copy)
    assert torch.all(sal[:, 1:] == 0)
    data = GroupData(x, teacher(x).detach(), sal, torch.zeros(len(x)), torch.zeros(len(x), dtype=torch.bool),
                     torch.full((len(x),), -1))

    def train(lam: float) -> torch.Tensor:
        torch.manual_seed(1)
        student = MLPPolicy(g, {"hidden_sizes": [16], "activation": "tanh"})
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        loss = DistillLoss(lambda_igr=lam, mask="threshold", threshold=0.5)
        for _ in range(300):
            terms = loss(student, data, layout)
            opt.zero_grad()
            terms["total"].backward()
            opt.step()
        agree = float((student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean())
        assert agree > 0.97
        x_req = x.clone().requires_grad_(True)
        f = torch.log_softmax(student(x_req), -1).gather(1, teacher(x).argmax(-1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(f, x_req)
        return grad.abs().mean(0)

    plain, digr = train(0.0), train(10.0)
    assert plain[1] > 0.3 * plain[0]  # the plain student leans on the copy
    assert digr[1] < 0.02 * digr[0]  # the DIGR student does not
    assert digr[2:].max() < 0.02 * digr[0]


# ---------------------------------------------------------------- commands
def test_distill_command_saves_a_compact_student_and_evaluates_it_next_to_the_teacher(cli, teacher_run, tmp_path):
    from conftest import tiny

    run = tmp_path / "distill"
    rc, out, err = cli("distill", *tiny(f"distill.teacher={teacher_run}", "logger=default", "logger.progress=false",
                                        "student.hidden_sizes=[4]", "seed=3"), f"hydra.run.dir={run}")
    assert rc == 0, err
    manifest = read_manifest(run / "policies" / "student")
    t_manifest = read_manifest(teacher_run / "policies" / "teacher")
    assert manifest["role"] == "student" and manifest["config"]["distill"]["teacher"] == str(teacher_run / "policies" / "teacher")
    assert manifest["normalizers"] == t_manifest["normalizers"]  # students read the teacher's units
    for group in ("speaker", "listener"):
        assert manifest["networks"][group]["class"] == "mlp"
        assert manifest["networks"][group]["num_parameters"] < t_manifest["networks"][group]["acting_parameters"] / 4
        assert set(load_file(str(run / "policies" / "student" / f"{group}.safetensors"))) == {
            "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert manifest["config"]["features"]["listener"]["message"] == [8, 9, 10]
    md = (run / "reports" / "eval.md").read_text()
    assert "| teacher |" in md and "| student |" in md and "| random |" in md
    assert "of the teacher's gain over random" in out
    # TensorBoard: per-round distillation scalars, the hparams entry with retention
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("distill/listener/loss_divergence", "distill/listener/loss_igr", "distill/listener/loss_total",
                "distill/listener/agreement", "distill/listener/kl", "distill/listener/saliency_spearman",
                "distill/round_team_return", "hparam/retention"):
        assert tag in tags, tag
    assert [s.step for s in ea.Scalars("distill/round_team_return")] == [0, 1]
    # the student is a drop-in policy for the evaluate command
    rc, out2, err = cli("evaluate", *tiny(f"eval.policy={run}", f"hydra.run.dir={tmp_path / 'ev'}"))
    assert rc == 0, err
    assert {ln.split()[0] for ln in out2.splitlines() if " team return IQM " in ln} == {"student", "random"}
    # the printed re-evaluation command repeats the stage's table: the teacher, the student and the random team
    again = shlex.split(next(ln for ln in out.splitlines() if "re-evaluate:" in ln).split("re-evaluate:")[1])
    assert again[:2] == ["madistill", "evaluate"] and "eval.with_teacher=true" in again
    rc, _, err = cli(*again[1:], f"hydra.run.dir={tmp_path / 'again'}")
    assert rc == 0, err
    for name in ("teacher", "student", "random"):
        first, repeat = (json.loads((d / "reports" / f"eval_{name}.json").read_text()) for d in (run, tmp_path / "again"))
        assert first["episodes"] == repeat["episodes"] and first["summary"] == repeat["summary"], name


def test_distill_is_deterministic_and_lambda_zero_is_plain_distillation(make_cfg, teacher_run, tmp_path):
    from madistill.stages.distill import distill_students
    from madistill.tb import TBLogger

    def run(name: str, *extra: str) -> dict:
        cfg = make_cfg(f"distill.teacher={teacher_run}", *extra)
        distill_students(cfg, tmp_path / name, cfg.distill.teacher, TBLogger(tmp_path / name, enabled=False))
        return load_team(tmp_path / name)[0].state_dict()

    a, b = run("a"), run("b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = run("plain", "distill=plain")
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_saliency_command_writes_maps_figures_and_agreement(cli, teacher_run, tmp_path):
    from conftest import tiny

    run = tmp_path / "sal"
    rc, out, err = cli("saliency", *tiny(f"saliency.policy={teacher_run}", "saliency.episodes=2", "logger=default",
                                         "logger.progress=false"), f"hydra.run.dir={run}")
    assert rc == 0, err
    reports = run / "reports"
    result = json.loads((reports / "saliency.json").read_text())
    mean = result["mean_saliency"]["teacher"]["listener"]
    assert list(mean["perturbation"]) == ["self_vel", "landmark_0", "landmark_1", "landmark_2", "message"]
    arrays = np.load(reports / "saliency.npz")
    m = arrays["teacher/listener/gradient"]
    assert m.shape == (len(arrays["obs/listener"]), 5) and np.allclose(m.max(1), 1.0)
    assert (reports / "saliency_listener.png").is_file() and (reports / "saliency_speaker_per_obs.png").is_file()
    assert "| teacher | listener |" in out
    # top-3 of the listener's 5 feature groups; the speaker's goal has 3 features, so its overlap is a top-2
    rows = {ln.split("|")[2].strip(): ln.split("|")[4].strip() for ln in out.splitlines() if ln.startswith("| teacher |")}
    assert rows["listener"].endswith(" (3)") and rows["speaker"].endswith(" (2)"), rows
    # the written observations can be fed back; results are reproducible
    rc, _, err = cli("saliency", *tiny(f"saliency.policy={teacher_run}", f"saliency.obs={reports / 'saliency.npz'}"),
                     f"hydra.run.dir={tmp_path / 'again'}")
    assert rc == 0, err
    again = np.load(tmp_path / "again" / "reports" / "saliency.npz")
    np.testing.assert_array_equal(again["teacher/listener/perturbation"], arrays["teacher/listener/perturbation"])


def test_saliency_and_distill_errors_are_one_line(cli, teacher_run, tmp_path):
    from conftest import tiny

    rc, _, err = cli("distill", *tiny())
    assert rc == 2 and "pass distill.teacher=" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.npz"
    np.savez(bad, speaker=np.zeros((3, 3)), listener=np.zeros((3, 7)))
    rc, _, err = cli("saliency", *tiny(f"saliency.policy={teacher_run}", f"saliency.obs={bad}"),
                     f"hydra.run.dir={tmp_path / 's'}")
    assert rc == 2 and "'listener' observations have 7 features, the env gives 11" in err
    rc, _, err = cli("distill", *tiny(f"distill.teacher={teacher_run}", "distill.divergence=bogus"),
                     f"hydra.run.dir={tmp_path / 'd'}")
    assert rc == 2 and "distill.divergence" in err


@pytest.mark.slow
def test_distillation_fields_sweep(cli, teacher_run, tmp_path):
    from conftest import tiny

    rc, _, err = cli("distill", *tiny(f"distill.teacher={teacher_run}", "distill.rounds=1", "distill.updates_per_round=5",
                                      "eval.random_baseline=false", f"hydra.sweep.dir={tmp_path}"),
                     "-m", "distill.lambda_igr=0,1", "distill.divergence=kl,prob_l2")
    assert rc == 0, err
    cfgs = sorted(p.read_text() for p in tmp_path.glob("*/.hydra/overrides.yaml"))
    assert len(cfgs) == 4 and all((p / "policies" / "student" / "manifest.json").is_file() for p in tmp_path.glob("[0-9]"))
    teams = {read_manifest(p / "policies" / "student")["config"]["distill"]["divergence"] for p in tmp_path.glob("[0-9]")}
    assert teams == {"kl", "prob_l2"}



@pytest.mark.slow
@pytest.mark.parametrize("objective", ["kl", "ce", "both"])
def test_adversarial_term_makes_the_student_harder_to_move(objective):
    """Robust distillation: with the adversarial and smoothness terms, PGD on the objective used in training
    (policy divergence, the greedy action's cross-entropy, or per sample the worse of the two) moves the
    student less, at the same budget, than after plain distillation: by at least 20% (15% against each of the
    two attacks when training took the worse of them per sample)."""
    from madistill.attacks.budget import Budget
    from madistill.attacks.methods import Attack, Objective

    torch.manual_seed(0)
    g = AgentGroup("g", ("a",), spaces.Box(-np.inf, np.inf, (6,), np.float32), spaces.Discrete(4))
    teacher = MLPPolicy(g, {"hidden_sizes": [64], "activation": "tanh"})
    x = torch.randn(2048, 6)
    data = GroupData(x, teacher(x).detach(), torch.ones(2048, 6), torch.zeros(2048), torch.zeros(2048, dtype=torch.bool),
                     torch.full((2048,), -1))
    layout, budget = FeatureLayout.build(6), Budget.build(0.3, 6)

    def moved(student: MLPPolicy, attack_objective: str) -> float:
        """KL moved by the kl attack; share of greedy actions flipped by the ce attack."""
        x_adv = Attack("pgd", attack_objective)(student, x, budget, torch.Generator().manual_seed(2))
        if attack_objective == "ce":
            return float((student(x_adv).argmax(-1) != student(x).argmax(-1)).float().mean())
        return float(Objective("kl", student, x, None)(x_adv).mean().detach())

    def trained(adv: float, smooth: float) -> tuple[MLPPolicy, set[str]]:
        torch.manual_seed(1)
        student = MLPPolicy(g, {"hidden_sizes": [32], "activation": "tanh"})
        opt = torch.optim.Adam(student.parameters(), 1e-2)
        loss = DistillLoss(adv_weight=adv, smooth_weight=smooth, adv_objective=objective)
        gen = torch.Generator().manual_seed(0)
        for _ in range(200):
            terms = loss(student, data, layout, None, budget, gen)
            opt.zero_grad()
            terms["total"].backward()
            opt.step()
        return student, set(terms)

    plain, plain_terms = trained(0.0, 0.0)
    robust, robust_terms = trained(1.0, 0.5)
    assert plain_terms == {"divergence", "total"} and robust_terms == {"divergence", "adversarial", "smoothness", "total"}
    for attack_objective in ("kl", "ce") if objective == "both" else (objective,):
        assert moved(robust, attack_objective) < (0.85 if objective == "both" else 0.8) * moved(plain, attack_objective)


def test_adv_fgsm_keeps_per_sample_the_worse_of_the_pgd_and_fgsm_points():
    """``distill.adv_fgsm``: FGSM's point joins the training PGD's; per sample the one further from the
    teacher's target is used, so no sample gets a milder perturbation than PGD alone gave it."""
    from madistill.attacks.budget import Budget
    from madistill.attacks.methods import Attack
    from madistill.common.divergences import divergence

    torch.manual_seed(0)
    g = AgentGroup("g", ("a",), spaces.Box(-np.inf, np.inf, (6,), np.float32), spaces.Discrete(4))
    teacher, student = (MLPPolicy(g, {"hidden_sizes": [32], "activation": "tanh"}) for _ in range(2))
    x = torch.randn(512, 6)
    data = GroupData(x, teacher(x).detach(), torch.ones(512, 6), torch.zeros(512), torch.zeros(512, dtype=torch.bool),
                     torch.full((512,), -1))
    budget = Budget.build(0.3, 6)
    kw = {"discrete": True, "teacher_log_std": None, "student_log_std": None}

    def harm(x_adv: torch.Tensor) -> torch.Tensor:
        return divergence("kl", data.teacher_head, student(x_adv), **kw).detach()

    pgd_only = DistillLoss(adv_weight=1.0)._perturbed(student, data, budget, torch.Generator().manual_seed(3), kw)
    with_fgsm = DistillLoss(adv_weight=1.0, adv_fgsm=True)._perturbed(student, data, budget, torch.Generator().manual_seed(3), kw)
    fgsm = Attack("fgsm", "ce")(student, x, budget)
    torch.testing.assert_close(harm(with_fgsm), torch.maximum(harm(pgd_only), harm(fgsm)))
    assert (harm(fgsm) > harm(pgd_only)).any() and (harm(fgsm) < harm(pgd_only)).any()  # each wins somewhere
    assert float((with_fgsm - x).abs().max()) <= 0.3 + 1e-6


@pytest.mark.parametrize("objective", [None, "targeted_lookahead", "director"])
def test_collection_under_attack_records_clean_observations_of_the_drifted_states(make_cfg, teacher_run, objective):
    """``distill.adv_collect``: the student's DAgger rounds run under attack (the loss's PGD, with
    ``adv_collect_objective=targeted_lookahead`` the lookahead's targets forced on the student, with ``director``
    a director trained against the student before each such round), so the team visits other states, but what is
    stored (and labelled by the teacher) is what the env emitted, never the perturbed input."""
    from madistill.attacks.learned import DirectorAttack
    from madistill.attacks.lookahead import LookaheadAttack
    from madistill.attacks.transform import AttackTransform
    from madistill.branching import ActionHistory
    from madistill.distill.trainer import DistillTrainer, student_team
    from madistill.envs.features import feature_layouts
    from madistill.stages.distill import lookahead_branching

    extra = [f"distill.adv_collect_objective={objective}"] if objective else []
    if objective == "director":
        extra += ["attack.director_retrain_steps=64", "attack.director_envs=2", "attack.director_ppo={n_steps: 32, batch_size: 32}"]
    cfg = make_cfg(f"distill.teacher={teacher_run}", "distill=robust", "distill.adv_collect=1.0", "distill.adv_eps=1.0",
                   *extra)
    teacher = load_team(teacher_run / "policies" / "teacher")[0]
    spec = EnvSpec.from_dict(read_manifest(teacher_run / "policies" / "teacher")["env"])
    with MultiAgentVecEnv(spec, 2, num_workers=0) as venv:
        layouts = feature_layouts(venv.groups, None, venv.feature_names)
        branching = lookahead_branching(cfg, spec, venv)
        assert (branching is None) == (objective != "targeted_lookahead")
        trainer = DistillTrainer(cfg, venv, teacher, student_team(teacher, cfg.student), layouts, branching=branching)
        assert trainer._collection_attack(1.0) == []  # round 0: the teacher alone, clean
        trainer.updates_done = trainer.total_updates  # eps fully ramped
        transforms = trainer._collection_attack(0.5)
        attack = transforms[0]
        assert attack.surrogate is trainer.student and attack.frequency == 1.0
        if objective is None:
            assert len(transforms) == 1 and isinstance(attack, AttackTransform)
        elif objective == "director":  # one more training of the same director before each round the student acts in
            assert len(transforms) == 1 and isinstance(attack, DirectorAttack)
            model = trainer.director.model
            assert trainer._collection_attack(0.5)[0].model is model and trainer.director.rounds == 2
            assert model.num_timesteps == 128
        else:  # the lookahead with the action history its branches replay
            assert isinstance(attack, LookaheadAttack) and isinstance(transforms[1], ActionHistory)
            assert attack.branching is branching
        acting = mixed_team(teacher, trainer.student, 0.5, seed=0)
        clean, _ = collect_round(venv, acting, seed=3, deterministic=True, episodes=2)
        recorded = (lambda: attack.targets) if objective == "targeted_lookahead" else None
        attacked, targets, _ = collect_labelled(venv, mixed_team(teacher, trainer.student, 0.5, seed=0), 3, True,
                                                recorded, episodes=2, transforms=transforms)
    if objective == "targeted_lookahead":  # the lookahead's targets, recorded row for row with the observations
        student = trainer.student
        for name, t in targets.items():
            assert t.shape == (len(attacked[name]),)
            forced = (t >= 0).nonzero().flatten()
            x = teacher.normalizers[name].normalize(attacked[name][forced])
            # only a target other than the student's clean greedy action at that very observation is recorded
            assert (greedy_actions(student[name], x) != t[forced]).all()
        assert int((targets["listener"] >= 0).sum()) > 0
    else:
        assert targets == {}
    assert torch.equal(clean["listener"][:2], attacked["listener"][:2])  # the first step: same env seeds
    assert not torch.equal(clean["listener"], attacked["listener"])  # then the attacked team drifts elsewhere
    # the speaker only ever sees one of the three goal colours: nothing perturbed was recorded
    assert len(torch.unique(attacked["speaker"], dim=0)) <= 3


def test_lookahead_collection_refuses_box_actions_before_any_work(make_cfg):
    """``adv_collect_objective=targeted_lookahead`` branches over Discrete actions: an env with Box-action groups
    is refused with one line naming the fix, before the first round is collected."""
    from madistill.runtime import env_spec, make_vec_env
    from madistill.stages.distill import lookahead_branching

    cfg = make_cfg("env.kwargs.continuous_actions=true", "distill=robust", "distill.adv_collect=0.5",
                   "distill.adv_collect_objective=targeted_lookahead")
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv:
        with pytest.raises(MadistillError, match="Box actions: choose another distill.adv_collect_objective"):
            lookahead_branching(cfg, spec, venv)
        # without collection under attack there is nothing to branch
        assert lookahead_branching(OmegaConf.merge(cfg, {"distill": {"adv_collect": 0.0}}), spec, venv) is None


def trained_distiller(cfg, teacher_run):
    """A DistillTrainer of ``cfg`` on the tiny teacher, after all its rounds (its ``history`` per round)."""
    from madistill.distill.trainer import DistillTrainer, student_team
    from madistill.envs.features import feature_layouts

    teacher = load_team(teacher_run / "policies" / "teacher")[0]
    spec = EnvSpec.from_dict(read_manifest(teacher_run / "policies" / "teacher")["env"])
    with MultiAgentVecEnv(spec, 2, num_workers=0) as venv:
        layouts = feature_layouts(venv.groups, None, venv.feature_names)
        from madistill.stages.distill import lookahead_branching

        trainer = DistillTrainer(cfg, venv, teacher, student_team(teacher, cfg.student), layouts,
                                 branching=lookahead_branching(cfg, spec, venv))
        trainer.train()
    return trainer


def test_lookahead_targets_are_recorded_in_the_rounds_the_student_acts_and_trained_against(make_cfg, teacher_run,
                                                                                            monkeypatch):
    """``distill.adv_collect_targets``: the rounds collected under the lookahead store its targets with the
    observations (none in round 0, where the teacher acts alone), and every update's adversarial term forces
    the stored targets of its minibatch on the student."""
    cfg = make_cfg(f"distill.teacher={teacher_run}", "distill=robust", "distill.adv_collect=1.0",
                   "distill.adv_collect_objective=targeted_lookahead", "distill.adv_collect_targets=true",
                   "distill.adv_ramp=0.01")
    targeted_rows = []
    perturbed = DistillLoss._perturbed

    def spy(self, student, batch, *args):
        targeted_rows.append(int((batch.target >= 0).sum()))
        return perturbed(self, student, batch, *args)

    monkeypatch.setattr(DistillLoss, "_perturbed", spy)
    trainer = trained_distiller(cfg, teacher_run)
    for d in trainer.data.values():
        assert (d.target[d.round == 0] == -1).all()
        assert (d.target < d.teacher_head.shape[1]).all()
    listener = trainer.data["listener"]
    assert int((listener.target[listener.round > 0] >= 0).sum()) > 0
    assert sum(targeted_rows) > 0  # minibatches of the later updates hold them


def test_robust_distillation_ramps_eps_keeps_excluded_features_and_combines_with_digr(make_cfg, teacher_run, monkeypatch):
    """``distill=robust`` through the trainer: every loss term of DIGR + adversarial + smoothness is trained,
    eps ramps over ``adv_ramp`` of the updates, and the training attack keeps ``attack.exclude`` and ``attack.scale``."""
    from madistill.distill.loss import DistillLoss

    cfg = make_cfg(f"distill.teacher={teacher_run}", "distill=robust", "distill.adv_ramp=1.0", "distill.adv_eps=0.4",
                   "+attack.exclude.listener=[8,9,10]",  # the message
                   "+attack.scale.speaker.0=0")  # a per-feature eps of 0
    moved: dict[str, list[torch.Tensor]] = {"speaker": [], "listener": []}
    perturbed = DistillLoss._perturbed

    def spy(self, student, batch, budget, generator, kw):
        x_adv = perturbed(self, student, batch, budget, generator, kw)
        moved[student.group.name].append((x_adv - batch.obs).abs().amax(0))
        return x_adv

    monkeypatch.setattr(DistillLoss, "_perturbed", spy)
    rows = trained_distiller(cfg, teacher_run).history
    assert [r["adv_eps"] for r in rows] == pytest.approx([0.2, 0.4])  # half-way after round 0, full after round 1
    for r in rows:
        for g in ("speaker", "listener"):
            assert r[f"{g}/loss_adversarial"] > 0 and r[f"{g}/loss_smoothness"] > 0 and f"{g}/loss_igr" in r
    listener = torch.stack(moved["listener"]).amax(0)
    assert torch.all(listener[[8, 9, 10]] == 0) and torch.all(listener[:8] > 0)  # the message is never perturbed
    speaker = torch.stack(moved["speaker"]).amax(0)
    assert speaker[0] == 0 and torch.all(speaker[1:] > 0)


def test_learning_rate_anneals_to_lr_final_and_the_saved_student_is_the_weight_average(make_cfg, teacher_run):
    """``distill.lr_final``: cosine from ``learning_rate`` to that share at the last update (1 keeps it
    constant). ``distill.weight_average``: the returned student is the exponential moving average of the live
    weights after every update, not the last live weights."""
    from madistill.distill.trainer import DistillTrainer, student_team
    from madistill.envs.features import feature_layouts

    cfg = make_cfg(f"distill.teacher={teacher_run}", "distill.rounds=2", "distill.updates_per_round=5",
                   "distill.lr_final=0.1", "distill.weight_average=0.5")
    teacher = load_team(teacher_run / "policies" / "teacher")[0]
    spec = EnvSpec.from_dict(read_manifest(teacher_run / "policies" / "teacher")["env"])
    live: list[torch.Tensor] = []
    with MultiAgentVecEnv(spec, 2, num_workers=0) as venv:
        layouts = feature_layouts(venv.groups, None, venv.feature_names)
        trainer = DistillTrainer(cfg, venv, teacher, student_team(teacher, cfg.student), layouts)
        assert [trainer.lr_factor(u) for u in (0, 5, 10)] == pytest.approx([1.0, 0.55, 0.1])
        average = trainer.averages["listener"]
        update = average.update_parameters

        def spy(model):  # called with the live student after every optimiser step
            live.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
            update(model)

        average.update_parameters = spy
        student = trainer.train()
    lr = cfg.distill.learning_rate
    assert trainer.optimizers["speaker"].param_groups[0]["lr"] == pytest.approx(0.1 * lr)
    assert [r["learning_rate"] for r in trainer.history] == pytest.approx([0.55 * lr, 0.1 * lr])  # logged per round
    expected = live[0]  # AveragedModel's EMA starts at the first update's weights
    for w in live[1:]:
        expected = 0.5 * expected + 0.5 * w
    final = torch.nn.utils.parameters_to_vector(student["listener"].parameters()).detach()
    assert len(live) == 10 and torch.allclose(final, expected) and not torch.allclose(final, live[-1])


def test_a_run_without_tensorboard_writes_none_and_says_so_instead_of_naming_a_logdir(cli, teacher_run, tmp_path):
    from conftest import tiny

    run = tmp_path / "e"
    rc, out, err = cli("evaluate", *tiny(f"eval.policy={teacher_run}", "eval.episodes=2", "logger.tensorboard=false"),
                       f"hydra.run.dir={run}")
    assert rc == 0, err
    assert "TensorBoard: none written (logger.tensorboard=false)" in out
    assert "tensorboard --logdir" not in out
    assert (run / "reports" / "eval.md").is_file() and not (run / "tb").exists()


def test_a_divergence_without_a_form_for_the_teachers_actions_is_refused_before_collection(cli, teacher_run, tmp_path,
                                                                                         monkeypatch):
    """docs/extending.md lets a new divergence refuse one kind of action; it says so before any DAgger round."""
    from conftest import tiny

    from madistill.common import divergences
    from madistill.distill import trainer

    def refuse(*args: object) -> torch.Tensor:
        raise MadistillError("reverse_kl has no form for Discrete actions here: pick another distill.divergence")

    monkeypatch.setitem(divergences._DISCRETE, "reverse_kl", refuse)
    monkeypatch.setattr(trainer.DistillTrainer, "train", lambda self: pytest.fail("distillation started"))
    rc, _, err = cli("distill", *tiny(f"distill.teacher={teacher_run}", "distill.divergence=reverse_kl"),
                     f"hydra.run.dir={tmp_path / 'd'}")
    assert rc == 2 and "reverse_kl has no form for Discrete actions" in err and not (tmp_path / "d").exists()


def test_the_per_observation_saliency_figure_has_a_colour_scale():
    from madistill.explain.report import METHODS, per_observation_heatmaps

    maps = {"teacher": {"g": {m: np.random.default_rng(0).random((6, 4)) for m in METHODS}}}
    fig = per_observation_heatmaps(maps, "g", FeatureLayout.build(4), 6)
    assert len(fig.axes) == len(METHODS) + 1 and fig.axes[-1].get_ylabel() == "saliency (max of each row = 1)"
