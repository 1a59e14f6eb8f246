"""Teacher training (SB3 PPO per group): learning, saved files, TensorBoard, checkpoints, resume, Ctrl-C."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_envs import TOY, ToyEnv

from madistill import teacher as teacher_module
from madistill.envs.factory import EnvSpec
from madistill.envs.vector import MultiAgentVecEnv
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import run_episodes, uniform_team
from madistill.policies.store import load_team, read_manifest
from madistill.rollout import Rollout
from madistill.runtime import env_spec, make_vec_env
from madistill.sb3_adapter import update_count
from madistill.stages import train as train_stage
from madistill.tb import TBLogger
from madistill.teacher import TeacherTrainer, bootstrap_obs

# relay (chain of 4, 3 symbols): one shared policy must learn to copy what it sees.
RELAY = (
    "env=relay",
    "env.num_envs=4",
    "teacher.ppo.n_epochs=4",
    "teacher.ppo.batch_size=50",
    "teacher.ppo.learning_rate=1e-2",
    "teacher.ppo.ent_coef=0.0",
    "teacher.total_agent_steps=12000",
)
PER_ITER = 25 * 2 * 4  # n_steps x num_envs x agents with env.num_envs=2


def _scalars(tb_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _state(path: Path) -> dict:
    return torch.load(path / "trainer_state.pt", weights_only=True)


@pytest.fixture(scope="module")
def relay_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("relay_run")
    cfg = compose_config(tiny(*RELAY))
    path = train_stage.run(cfg, run_dir)
    return cfg, run_dir, path


def test_relay_teacher_beats_random(relay_run):
    cfg, _, path = relay_run
    with make_vec_env(cfg.env, num_workers=0) as venv:
        team, manifest = load_team(path, venv.groups)
        teacher = np.mean(
            [r.team_return for r in run_episodes(venv, team, 16, seed=1000, deterministic=True)]
        )
        rand = np.mean(
            [
                r.team_return
                for r in run_episodes(venv, uniform_team(venv), 16, seed=1000, deterministic=False)
            ]
        )
    # random: 1/3 of 25 steps matched ~ 8.3; copying the neighbour's symbol gets most steps right
    assert rand == pytest.approx(25 / 3, abs=1.5)
    assert teacher > rand + 6.0
    assert manifest["role"] == "teacher"
    assert manifest["config"]["teacher"]["total_agent_steps"] == 12000
    assert team.normalizers["agent"].count > 0  # normaliser statistics were collected and saved


def test_saved_teacher_files(relay_run):
    _, run_dir, path = relay_run
    assert path == run_dir / "policies" / "teacher"
    assert sorted(p.name for p in path.iterdir()) == ["agent.safetensors", "agent.zip", "manifest.json"]
    m = read_manifest(path)
    assert m["env"]["name"] == "relay" and m["env"]["target"] == "envs.relay.parallel_env"
    assert m["networks"]["agent"]["hidden_sizes"] == [16]
    assert read_manifest(run_dir / "checkpoint")["role"] == "checkpoint"  # the end's, to continue the run from


def test_tensorboard_scalars_show_learning(relay_run):
    _, run_dir, _ = relay_run
    ea = _scalars(run_dir / "tb")
    tags = ea.Tags()["scalars"]
    for tag in (
        "charts/episodic_return",
        "charts/episodic_length",
        "charts/SPS",
        "losses/agent/value_loss",
        "losses/agent/policy_loss",
        "losses/agent/entropy_loss",
        "charts/episodic_return/agent_3",
    ):
        assert tag in tags, tag
    ret = ea.Scalars("charts/episodic_return")
    steps = [e.step for e in ret]
    assert steps == sorted(steps) and steps[-1] == 12000
    assert all(e.value == 25 for e in ea.Scalars("charts/episodic_length"))
    values = np.array([e.value for e in ret])
    assert values[-3:].mean() > values[:3].mean() + 5.0  # team return improves during training
    assert len(ea.Scalars("losses/agent/value_loss")) == 30  # one per iteration (12000 / 400)


def test_checkpoint_and_resume_continue_agent_steps(tmp_path, monkeypatch):
    run1 = tmp_path / "run1"
    cfg = compose_config(
        tiny(
            "env=relay",
            f"teacher.checkpoint_every={2 * PER_ITER}",
            f"teacher.total_agent_steps={3 * PER_ITER}",
        )
    )
    saved_at, save = [], TeacherTrainer.save_checkpoint
    monkeypatch.setattr(TeacherTrainer, "save_checkpoint", lambda self, p: saved_at.append(self.agent_steps) or save(self, p))
    train_stage.run(cfg, run1)
    assert saved_at == [2 * PER_ITER, 3 * PER_ITER]  # every 2 iterations, and at the end
    ckpt = run1 / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "agent.safetensors",
        "manifest.json",
        "trainer_state.pt",
    ]
    assert read_manifest(ckpt)["role"] == "checkpoint"
    state = _state(ckpt)
    assert state["agent_steps"] == 3 * PER_ITER and state["iteration"] == 3  # the end's
    assert state["optimizers"]["agent"]["state"]  # Adam moments were saved
    ckpt_weights = load_file(str(ckpt / "agent.safetensors"))
    final_weights = load_file(str(run1 / "policies" / "teacher" / "agent.safetensors"))
    assert all(torch.equal(ckpt_weights[k], final_weights[k]) for k in ckpt_weights)

    cfg2 = compose_config(
        tiny("env=relay", f"teacher.resume={ckpt}", f"teacher.total_agent_steps={5 * PER_ITER}")
    )
    spec = env_spec(cfg2.env)
    tb = TBLogger(tmp_path / "run2" / "tb")
    with make_vec_env(cfg2.env, spec) as venv:
        trainer = TeacherTrainer(cfg2, venv, spec, torch.device("cpu"), tb)
        assert trainer.agent_steps == 3 * PER_ITER and trainer.iteration == 3
        model = trainer.learners["agent"].model
        opt = model.policy.optimizer.state_dict()
        assert opt["state"], "optimizer state was not restored"
        for k, saved in state["optimizers"]["agent"]["state"].items():
            for name in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(opt["state"][k][name], saved[name], rtol=0, atol=0)
        restored = trainer.team["agent"].state_dict()
        for k, v in ckpt_weights.items():
            torch.testing.assert_close(restored[k], v, rtol=0, atol=0)
        saved_norm = read_manifest(ckpt)["normalizers"]["agent"]
        np.testing.assert_allclose(trainer.team.normalizers["agent"].mean, saved_norm["mean"])
        assert trainer.team.normalizers["agent"].count == saved_norm["count"] > 0
        assert update_count(model) == state["n_updates"]["agent"] > 0
        trainer.train(tmp_path / "run2")
    tb.close()
    assert trainer.agent_steps == 5 * PER_ITER and trainer.iteration == 5
    logged = [e.step for e in _scalars(tmp_path / "run2" / "tb").Scalars("charts/SPS")]
    assert logged == [4 * PER_ITER, 5 * PER_ITER]  # two more iterations, not five


def test_resume_from_a_non_checkpoint_is_a_user_error(relay_run, tmp_path):
    from madistill.errors import MadistillError

    _, _, teacher_path = relay_run
    cfg = compose_config(tiny(*RELAY, f"teacher.resume={teacher_path}"))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, pytest.raises(MadistillError, match="checkpoint"):
        TeacherTrainer(cfg, venv, spec, torch.device("cpu"), None)


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_ctrl_c_saves_a_checkpoint_and_reraises(tmp_path, monkeypatch, mode):
    cfg = compose_config(tiny("env=relay", f"teacher.total_agent_steps={10 * PER_ITER}", f"teacher.update_mode={mode}"))
    calls = {"n": 0}
    orig_step = Rollout.step

    def step_then_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 25 + 10:  # in the middle of the second rollout
            raise KeyboardInterrupt
        return orig_step(self)

    monkeypatch.setattr(Rollout, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(cfg, tmp_path)
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "manifest.json").is_file() and (ckpt / "agent.safetensors").is_file()
    assert _state(ckpt)["agent_steps"] == PER_ITER  # the one finished iteration ...
    assert _state(ckpt)["n_updates"]["agent"] > 0  # ... with its update (the background one's, when pending)
    assert not (tmp_path / "policies").exists()  # no final teacher for an interrupted run
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    monkeypatch.setattr(Rollout, "step", orig_step)
    cfg2 = compose_config(tiny("env=relay", f"teacher.resume={ckpt}"))
    spec = env_spec(cfg2.env)
    with make_vec_env(cfg2.env, spec) as venv:
        assert TeacherTrainer(cfg2, venv, spec, torch.device("cpu"), None).agent_steps == PER_ITER


def test_two_groups_train_together_and_save_one_file_each(tmp_path):
    cfg = compose_config(
        tiny("env=simple_speaker_listener_v4", "teacher.total_agent_steps=200", "teacher.ppo.n_steps=50")
    )
    path = train_stage.run(cfg, tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [
        "listener.safetensors",
        "listener.zip",
        "manifest.json",
        "speaker.safetensors",
        "speaker.zip",
    ]
    ea = _scalars(tmp_path / "tb")
    assert {"losses/speaker/value_loss", "losses/listener/value_loss"} <= set(ea.Tags()["scalars"])
    m = json.loads((path / "manifest.json").read_text())
    assert [g["name"] for g in m["groups"]] == ["speaker", "listener"]


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_a_central_critic_sees_the_team_and_the_saved_actor_acts_on_its_own(tmp_path, mode):
    """teacher.critic=central (MAPPO-style): each group's critic input is its own observation followed by every
    agent's observation of the same env copy; the actor reads only its own, so the saved teacher acts,
    distils and is attacked like any other; it has no decentralised value."""
    cfg = compose_config(tiny("env=simple_speaker_listener_v4", "teacher.critic=central", "teacher.total_agent_steps=200",
                              "teacher.ppo.n_steps=50", f"teacher.update_mode={mode}"))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None) as trainer:
        trainer.train(tmp_path)
        (speaker, listener), state_dim = venv.groups, 3 + 11
        obs = {g.name: trainer.learners[g.name].model.rollout_buffer.observations for g in venv.groups}
        path = trainer.save_checkpoint(tmp_path / "checkpoint")
    assert obs["speaker"].shape[-1] == speaker.obs_dim + state_dim and obs["listener"].shape[-1] == listener.obs_dim + state_dim
    for g in (speaker, listener):  # [step, copy, :] = own | the speaker's | the listener's
        state = obs[g.name][..., g.obs_dim :]
        np.testing.assert_array_equal(state[..., :3], obs["speaker"][..., :3])
        np.testing.assert_array_equal(state[..., 3:], obs["listener"][..., :11])
    assert np.abs(obs["listener"]).sum() > 0
    team, manifest = load_team(path)
    assert {n["team_state_dim"] for n in manifest["networks"].values()} == {state_dim}
    x = torch.zeros(4, listener.obs_dim)
    assert team["listener"](x).shape == (4, 5) and team["listener"].value(x) is None
    assert team["listener"].critic_value(torch.zeros(4, listener.obs_dim + state_dim)).shape == (4,)


def test_a_truncated_agent_bootstraps_from_the_team_as_it_is_at_that_step():
    """walker_0 is cut off by a time limit at step 2 while walker_1 plays on to step 5: the state its value is
    bootstrapped from has walker_1's live observation; at the episode's end, walker_1's has walker_0 gone (zeros),
    not its next episode's first observation."""
    toy = ToyEnv(early_end="truncated")
    seen = []
    with MultiAgentVecEnv(EnvSpec(TOY, {"early_end": "truncated"}, "toy"), 2, num_workers=0) as venv:
        Rollout(venv, uniform_team(venv)).run(steps=5, on_step=lambda tr: seen.append((tr.result, bootstrap_obs(tr))))
    (r2, at2), (r5, at5) = seen[1], seen[4]
    assert r2.truncated["walker"][:, 0].all() and not r2.dones["walker"][:, 1].any()
    np.testing.assert_array_equal(at2["walker"], np.stack([[toy.obs_of("walker_0", 2), toy.obs_of("walker_1", 2)]] * 2))
    assert r5.truncated["walker"][:, 1].all()
    np.testing.assert_array_equal(at5["walker"][:, 1], np.stack([toy.obs_of("walker_1", 5)] * 2))
    np.testing.assert_array_equal(at5["walker"][:, 0], 0)


@pytest.mark.parametrize("bootstrap", [True, False])
def test_a_time_limit_adds_the_critics_value_of_the_final_observation_only_when_asked(tmp_path, monkeypatch, bootstrap):
    """teacher.bootstrap_truncated: a Box-action agent cut off by the time limit (EchoEnv: reward 0, truncated at
    step 6) gets gamma * V(its final observation) as reward when on; off, its return ends there as at a
    termination, so every Monte Carlo return is the env's 0 (what continuous spread needs, docs/continuous_actions.md)."""
    cfg = compose_config(tiny("env=custom", "env.target=test_envs.EchoEnv", "env.name=echo", "teacher.normalize_obs=false",
                              "teacher.ppo.n_steps=6", "teacher.ppo.batch_size=24", "teacher.total_agent_steps=24",
                              "teacher.ppo.gae_lambda=1.0", f"teacher.bootstrap_truncated={bootstrap}"))
    finals = []
    monkeypatch.setattr(teacher_module, "bootstrap_obs", lambda tr: finals.append(bootstrap_obs(tr)) or finals[-1])
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None) as trainer:
        critic = copy.deepcopy(trainer.team["echo"])  # the critic the rollout bootstraps with, before the update
        trainer.train(tmp_path)
        buf = trainer.learners["echo"].model.rollout_buffer
    np.testing.assert_array_equal(buf.rewards[:-1], 0)
    if bootstrap:
        (final,) = finals  # one time limit, at the rollout's last step
        with torch.no_grad():
            expected = cfg.teacher.ppo.gamma * critic.critic_value(torch.as_tensor(final["echo"]).reshape(4, 2))
        np.testing.assert_allclose(buf.rewards[-1], expected.numpy(), rtol=1e-5)
        assert np.abs(buf.rewards[-1]).min() > 1e-4
    else:
        assert finals == []
        np.testing.assert_array_equal(buf.rewards[-1], 0)
        np.testing.assert_allclose(buf.returns, 0, atol=1e-6)  # Monte Carlo (gae_lambda=1) returns of zero rewards


def test_resuming_with_another_critic_is_a_one_line_error(relay_run):
    _, run_dir, _ = relay_run
    cfg = compose_config(tiny(*RELAY, "teacher.critic=central", f"teacher.resume={run_dir / 'checkpoint'}"))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, pytest.raises(MadistillError, match="teacher.critic=local"):
        TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None)


def _acting_weights_per_rollout(cfg, monkeypatch) -> list[torch.Tensor]:
    """Trains ``cfg`` and returns the acting policy's first weight matrix at the start of every rollout."""
    seen = []
    orig_run = Rollout.run

    def run_and_record(self, *a, **k):
        seen.append(next(iter(self.team["agent"].state_dict().values())).clone())
        return orig_run(self, *a, **k)

    monkeypatch.setattr(Rollout, "run", run_and_record)
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, TeacherTrainer(cfg, venv, spec, torch.device("cpu"), None) as trainer:
        trainer.train(Path("unused"))
    monkeypatch.setattr(Rollout, "run", orig_run)
    learner = next(iter(trainer.learners["agent"].model.policy.state_dict().values()))
    seen.append(next(iter(trainer.team["agent"].state_dict().values())).clone())
    return seen, learner


def test_overlapped_update_acts_one_update_behind_and_ends_in_sync(monkeypatch):
    steps = f"teacher.total_agent_steps={4 * PER_ITER}"
    sync, _ = _acting_weights_per_rollout(compose_config(tiny("env=relay", steps)), monkeypatch)
    lagged, learner = _acting_weights_per_rollout(
        compose_config(tiny("env=relay", steps, "teacher.update_mode=thread")), monkeypatch
    )
    assert len(sync) == len(lagged) == 5  # four rollouts, then the final team
    assert not torch.equal(sync[0], sync[1])  # on-policy: each rollout follows an update
    assert torch.equal(lagged[0], lagged[1])  # rollout 1 is collected while update 0 runs
    assert not torch.equal(lagged[1], lagged[2]) and not torch.equal(lagged[3], lagged[4])
    torch.testing.assert_close(lagged[-1], learner, rtol=0, atol=0)  # the saved team has every update


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_every_update_logs_its_losses_once_at_the_step_of_its_data(tmp_path, mode):
    """Overlapped updates are taken by the loop, by checkpoints and at the end; each logs wherever taken."""
    cfg = compose_config(tiny("env=relay", f"teacher.total_agent_steps={4 * PER_ITER}",
                              f"teacher.checkpoint_every={2 * PER_ITER}", f"teacher.update_mode={mode}"))
    train_stage.run(cfg, tmp_path)
    steps = [e.step for e in _scalars(tmp_path / "tb").Scalars("losses/agent/value_loss")]
    assert steps == [PER_ITER, 2 * PER_ITER, 3 * PER_ITER, 4 * PER_ITER]


def test_overlapped_update_learns_and_is_deterministic(tmp_path):
    cfgs = [compose_config(tiny(*RELAY, "teacher.update_mode=thread")) for _ in range(2)]
    paths = [train_stage.run(cfg, tmp_path / f"run{i}") for i, cfg in enumerate(cfgs)]
    weights = [load_file(str(p / "agent.safetensors")) for p in paths]
    for k in weights[0]:  # the same updates, bit for bit, whenever the thread runs
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=0)
    cfg = cfgs[0]
    with make_vec_env(cfg.env, num_workers=0) as venv:
        team, _ = load_team(paths[0], venv.groups)
        ret = np.mean([r.team_return for r in run_episodes(venv, team, 16, seed=1000, deterministic=True)])
    assert ret > 25 / 3 + 6.0  # as the on-policy relay teacher: far above random (~8.3)


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_group_settings_and_annealing_reach_each_groups_ppo_update(tmp_path, mode):
    """The speaker's own entropy bonus, and linear annealing of it and of the learning rate, as each update sees them."""
    per_iter = 50 * 2 * 2  # n_steps x num_envs x agents
    cfg = compose_config(tiny(
        "env=simple_speaker_listener_v4", "env.num_envs=2", "teacher.ppo.n_steps=50", "teacher.ppo.batch_size=100",
        f"teacher.total_agent_steps={4 * per_iter}", "teacher.ppo.ent_coef=0.001", "teacher.ppo.learning_rate=1e-3",
        "+teacher.group_ppo.speaker.ent_coef=0.01", "teacher.anneal.ent_coef=0.5", "teacher.anneal.learning_rate=0",
        f"teacher.update_mode={mode}",
    ))
    train_stage.run(cfg, tmp_path)
    ea = _scalars(tmp_path / "tb")
    done = np.array([0.0, 0.25, 0.5, 0.75])  # share of training behind each update
    for group, start in (("speaker", 0.01), ("listener", 0.001)):
        ent = [e.value for e in ea.Scalars(f"losses/{group}/ent_coef")]
        np.testing.assert_allclose(ent, start * (1 - 0.5 * done), rtol=1e-6)
        lr = [e.value for e in ea.Scalars(f"losses/{group}/learning_rate")]
        np.testing.assert_allclose(lr, 1e-3 * (1 - done), rtol=1e-6)


def test_group_settings_for_a_group_the_env_does_not_have_are_a_user_error():
    cfg = compose_config(tiny("env=simple_speaker_listener_v4", "+teacher.group_ppo.speakr.ent_coef=0.01"))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, pytest.raises(MadistillError, match=r"unknown group.*speakr.*\['speaker', 'listener'\]"):
        TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None)


@pytest.mark.parametrize(("batch", "said"), [(64, None), (48, "1 minibatch(es) of 48 and one of 16"), (100, "one minibatch of 64")])
def test_minibatches_that_do_not_tile_a_rollout_are_said_in_madistills_terms(caplog, recwarn, batch, said):
    """relay: 4 agents x 2 copies x 8 steps = 64 agent-steps per update; SB3's own warning (which counts agent
    slots as envs) is replaced by one line naming teacher.ppo.batch_size."""
    cfg = compose_config(tiny("env=relay", "env.num_envs=2", "teacher.ppo.n_steps=8", f"teacher.ppo.batch_size={batch}"))
    spec = env_spec(cfg.env)
    with caplog.at_level("WARNING", logger="madistill.teacher"), make_vec_env(cfg.env, spec) as venv, \
            TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None):
        pass
    lines = [r.getMessage() for r in caplog.records]
    assert not [w for w in recwarn if "mini-batch size" in str(w.message)]
    if said is None:
        assert lines == []
    else:
        assert len(lines) == 1 and said in lines[0] and "teacher.ppo.batch_size" in lines[0] and "divisor of 64" in lines[0]


def test_teacher_optimiser_is_sb3_ppos_adam():
    """Adam with SB3 PPO's eps of 1e-5 (SB3 only sets it when given no optimizer_kwargs), run as foreach."""
    cfg = compose_config(tiny("env=relay"))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None) as trainer:
        opt = next(iter(trainer.learners.values())).model.policy.optimizer
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["eps"] == 1e-5 and opt.param_groups[0]["foreach"] is True


def test_agents_with_a_policy_each_start_from_different_weights():
    cfg = compose_config(tiny("env=relay", "env.grouping=per_agent"))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None) as trainer:
        first = [next(lr.model.policy.parameters()).detach() for lr in trainer.learners.values()]
    assert len(first) == 4
    assert all(not torch.equal(first[0], w) for w in first[1:])


def _played_seeds(monkeypatch) -> list[int]:
    seeds: list[int] = []
    run = Rollout.run

    def record(self, *a, **k):
        episodes = run(self, *a, **k)
        seeds.extend(e.seed for e in episodes)
        return episodes

    monkeypatch.setattr(Rollout, "run", record)
    return seeds


def test_a_resumed_run_plays_only_episodes_it_has_not_played(tmp_path, monkeypatch):
    """Two episodes per copy and iteration: resuming at the iteration count alone would replay half of them."""
    per_iter = 50 * 2 * 4
    seeds = _played_seeds(monkeypatch)
    cfg = compose_config(tiny("env=relay", "teacher.ppo.n_steps=50", f"teacher.total_agent_steps={2 * per_iter}"))
    train_stage.run(cfg, tmp_path / "run1")
    before = list(seeds)
    assert len(before) == 2 * 2 * 2  # iterations x copies x episodes per copy
    seeds.clear()
    cfg2 = compose_config(tiny("env=relay", "teacher.ppo.n_steps=50", f"teacher.total_agent_steps={4 * per_iter}",
                               f"teacher.resume={tmp_path / 'run1' / 'checkpoint'}"))
    train_stage.run(cfg2, tmp_path / "run2")
    assert len(seeds) == 8 and not set(seeds) & set(before)


@pytest.mark.parametrize("damage", ["architecture", "state", "missing"])
def test_resume_from_a_bad_checkpoint_is_a_one_line_user_error(tmp_path, damage):
    cfg = compose_config(tiny("env=relay", f"teacher.total_agent_steps={PER_ITER}"))
    train_stage.run(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint"
    extra, match = ["teacher.hidden_sizes=[32]"], r"teacher.hidden_sizes=\[16\]"
    if damage == "state":
        (ckpt / "trainer_state.pt").write_bytes(b"not a torch file")
        extra, match = [], "corrupt checkpoint state"
    elif damage == "missing":
        ckpt = tmp_path / "nowhere"
        extra, match = [], "no such policy or run directory"
    cfg2 = compose_config(tiny("env=relay", f"teacher.resume={ckpt}", *extra))
    spec = env_spec(cfg2.env)
    with make_vec_env(cfg2.env, spec) as venv, pytest.raises(MadistillError, match=match) as err:
        TeacherTrainer(cfg2, venv, spec, torch.device("cpu"), None)
    assert "\n" not in str(err.value)


def test_resuming_a_checkpoint_already_at_the_budget_says_to_raise_it(relay_run, tmp_path):
    _, run_dir, _ = relay_run
    cfg = compose_config(tiny(*RELAY, f"teacher.resume={run_dir / 'checkpoint'}"))  # the same budget it finished
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv, pytest.raises(MadistillError, match="raise teacher.total_agent_steps"):
        TeacherTrainer(cfg, venv, spec, torch.device("cpu"), None)


def test_teacher_ppo_fast_update_trains_the_weights_sb3s_update_trains(tmp_path, monkeypatch):
    """A speaker-listener run (Discrete, two groups) with madistill's fast update saves the weights of the same
    run with SB3's train() (``teacher.ppo.fast_update=false``), and the setting decides which update runs."""
    from madistill import sb3_adapter

    calls = []
    fast_train = sb3_adapter.fast_train
    monkeypatch.setattr(sb3_adapter, "fast_train", lambda model: calls.append(model) or fast_train(model))
    weights = {}
    for fast in (True, False):
        calls.clear()
        cfg = compose_config(tiny("env=simple_speaker_listener_v4", "teacher.ppo.n_steps=50", "teacher.ppo.batch_size=64",
                                  "teacher.total_agent_steps=600", f"teacher.ppo.fast_update={fast}"))
        path = train_stage.run(cfg, tmp_path / str(fast))
        assert len(calls) == (6 if fast else 0)  # 3 updates of 2 groups
        weights[fast] = {g: load_file(str(path / f"{g}.safetensors")) for g in ("speaker", "listener")}
    for g, ours in weights[True].items():
        for k, v in ours.items():
            torch.testing.assert_close(v, weights[False][g][k], rtol=0, atol=1e-6)
