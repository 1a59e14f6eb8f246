"""Image observations: CNN encoders for teachers and students, their fixed pixel scaling, the policy store,
patch feature groups, and the warning before training an oversized network (envs/pixels.py: 36x36x3 images)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, tiny
from gymnasium import spaces
from omegaconf import OmegaConf
from safetensors.torch import load_file

from envs import pixels
from madistill.distill.trainer import student_team
from madistill.envs import AgentGroup, EnvSpec, group_agents, make_env
from madistill.envs.features import feature_layouts, image_patches
from madistill.errors import MadistillError
from madistill.evaluate.evaluator import run_episodes
from madistill.explain.saliency import SaliencyLabeller
from madistill.finetune import actor_critic_team
from madistill.normalize import ObsNormalizer
from madistill.policies import MLPPolicy, SB3Policy
from madistill.policies.base import warn_if_large
from madistill.policies.cnn import ImageEncoder, ImageFeatures
from madistill.policies.store import load_team, save_team
from madistill.runtime import env_spec, make_vec_env
from madistill.teacher import TeacherTrainer

PIXELS = ("env=pixels", "teacher.total_agent_steps=200")


def _image_group(shape: tuple[int, ...], n_actions: int = 2) -> AgentGroup:
    return AgentGroup("looker", ("looker_0", "looker_1"), spaces.Box(0, 255, shape, np.uint8), spaces.Discrete(n_actions))


def _arch(role: str, *overrides: str) -> dict:
    """The default architecture of ``role`` (teacher, student) as the stages build it."""
    node = compose_config(tiny(*overrides))[role]
    return {"hidden_sizes": list(node.hidden_sizes), "activation": node.activation, "cnn": OmegaConf.to_container(node.cnn)}


def _images(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Flattened observations of ``n`` pixels_v0 steps per agent (raw 0..255 values, float32)."""
    env = pixels.parallel_env()
    obs, _ = env.reset(seed=seed)
    rows = {a: [] for a in env.possible_agents}
    for _ in range(n):
        for a, o in obs.items():
            rows[a].append(o.reshape(-1).astype(np.float32))
        obs, *_ = env.step({a: 0 for a in env.agents})
    return {a: np.stack(r) for a, r in rows.items()}


def test_pixels_groups_are_images_channels_last_and_vector_groups_are_not():
    env = make_env(EnvSpec("envs.pixels.parallel_env", {"size": 36}))
    (g,) = group_agents(env)
    assert g.image_shape == (3, 36, 36) and not g.channels_first and g.obs_dim == 36 * 36 * 3
    assert _image_group((4, 20, 30)).image_shape == (4, 20, 30) and _image_group((4, 20, 30)).channels_first
    floats = AgentGroup("x", ("x",), spaces.Box(0, 1, (36, 36, 3), np.float32), spaces.Discrete(2))
    assert floats.image_shape is None  # SB3's convention: only uint8 in 0..255 is an image


def test_image_normaliser_scales_every_pixel_by_255_and_ignores_data():
    n = ObsNormalizer.for_group(_image_group((36, 36, 3)), enabled=False)
    n.update(np.full((10, 36 * 36 * 3), 7.0))
    x = torch.tensor([[0.0, 51.0, 255.0] * (36 * 36)])
    assert torch.allclose(n.normalize(x)[0, :3], torch.tensor([0.0, 0.2, 1.0]))
    back = ObsNormalizer.from_state_dict(n.state_dict())
    assert back.fixed and torch.equal(back.normalize(x), n.normalize(x))
    vector = ObsNormalizer.for_group(AgentGroup("v", ("v",), spaces.Box(-1, 1, (3,)), spaces.Discrete(2)))
    vector.update(np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    assert not vector.fixed and np.allclose(vector.mean, [2.0, 2.0, 2.0])


def test_teacher_and_student_encode_images_with_cnns_and_the_teacher_stays_small_on_280x480():
    g = _image_group((36, 36, 3))
    teacher = SB3Policy.from_arch(g, _arch("teacher"))
    student = MLPPolicy(g, _arch("student"))
    assert isinstance(teacher.sb3.features_extractor, ImageFeatures)
    assert teacher.sb3.pi_features_extractor is teacher.sb3.vf_features_extractor  # shared, as SB3's CnnPolicy
    assert [m.out_channels for m in teacher.sb3.features_extractor.encoder.cnn if isinstance(m, torch.nn.Conv2d)] == [32, 64, 64]
    assert [m.out_channels for m in student.encoder.cnn if isinstance(m, torch.nn.Conv2d)] == [16, 32]
    assert student.num_parameters * 3 < teacher.acting_parameters  # tiny hidden sizes; 1/8 with the defaults
    x = torch.rand(3, g.obs_dim)
    assert teacher(x).shape == student(x).shape == (3, 2)
    # the flattened MLP of the default teacher would have 403,200 x 256 weights in its first layer alone
    big = _image_group((280, 480, 3), n_actions=5)
    teacher = SB3Policy.from_arch(big, _arch("teacher", "teacher.hidden_sizes=[256,256]"))
    assert teacher.acting_parameters < 2_500_000 and teacher.num_parameters < 2_700_000
    assert teacher(torch.zeros(1, big.obs_dim)).shape == (1, 5)


def test_groups_without_images_ignore_and_do_not_record_the_cnn_settings():
    vector = AgentGroup("speaker", ("speaker_0",), spaces.Box(-np.inf, np.inf, (3,), np.float32), spaces.Discrete(3))
    student = MLPPolicy(vector, _arch("student"))
    assert student.encoder is None and "cnn" not in student.arch and student.net[0].in_features == 3
    teacher = SB3Policy.from_arch(vector, _arch("teacher"))
    assert not isinstance(teacher.sb3.features_extractor, ImageFeatures)


@pytest.mark.parametrize("override, message", [
    ("student.cnn.kernels=[8]", "student.cnn.channels must be a non-empty list as long as kernels and strides, "
                                "got [16, 32]"),
    ("teacher.cnn.channels=[]", "teacher.cnn.channels must be a non-empty list as long as kernels and strides, got []"),
    ("student.cnn.strides=[4,0]", "student.cnn.strides must be positive numbers, got [4, 0]"),
    ("student.cnn.max_grid=0", "student.cnn.max_grid must be at least 1, got 0"),
])
def test_cnn_settings_that_build_no_network_name_the_fix(override, message):
    with pytest.raises(MadistillError) as e:
        compose_config(tiny(override))
    assert str(e.value) == message


def test_the_cnn_reads_each_pixel_value_where_the_image_has_it():
    """The flat (H, W, C) row becomes the (C, H, W) image: a kernel as large as the image weighs every pixel
    value of every channel with its own weight."""
    g = _image_group((12, 12, 3))
    enc = ImageEncoder(g, {"channels": [1], "kernels": [12], "strides": [1], "max_grid": 1, "features_dim": 1}, "x")
    torch.manual_seed(0)
    img = torch.rand(12, 12, 3)
    conv = enc.cnn[0]
    with torch.no_grad():  # every ReLU passes its input on
        conv.bias.fill_(10.0)
        enc.linear[0].weight.fill_(1.0)
        enc.linear[0].bias.zero_()
    expected = torch.relu((conv.weight[0] * img.permute(2, 0, 1)).sum() + conv.bias[0])
    assert torch.allclose(enc(img.reshape(1, -1)), enc.linear(expected.reshape(1, 1)), atol=1e-5)
    shuffled = img.flip(0).reshape(1, -1)  # the same values elsewhere give another feature
    assert not torch.allclose(enc(shuffled), enc(img.reshape(1, -1)))


def test_trained_image_teacher_round_trips_through_the_store_and_evaluates_the_same(tmp_path):
    cfg = compose_config(tiny(*PIXELS))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv:
        with TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None) as trainer:
            team = trainer.train(tmp_path)
        path = trainer.save(tmp_path / "teacher")
        loaded, manifest = load_team(path, venv.groups)
        obs = torch.as_tensor(_images(8)["looker_0"])
        x = team.normalizers["looker"].normalize(obs)
        assert torch.equal(loaded["looker"](loaded.normalizers["looker"].normalize(obs)), team["looker"](x))
        assert torch.equal(loaded["looker"].value(x), team["looker"].value(x))
        before = [e.team_return for e in run_episodes(venv, team, 4, seed=10_000)]
        after = [e.team_return for e in run_episodes(venv, loaded, 4, seed=10_000)]
    assert before == after
    assert manifest["networks"]["looker"]["cnn"]["channels"] == [32, 64, 64]
    assert manifest["normalizers"]["looker"]["fixed"]
    # the shared extractor is stored once, not under SB3's three names for it
    keys = load_file(str(path / "looker.safetensors"))
    assert sum("features_extractor.encoder.linear.0.weight" in k for k in keys) == 1
    assert (path / "looker.safetensors").stat().st_size < 4 * 1.05 * loaded["looker"].num_parameters


@pytest.mark.slow
def test_train_and_distill_on_images_give_a_cnn_teacher_and_a_compact_cnn_student(cli, tmp_path):
    rc, _, err = cli("train", *tiny(*PIXELS, f"hydra.run.dir={tmp_path}/train"))
    assert rc == 0, err
    rc, _, err = cli("distill", *tiny("env=pixels", f"distill.teacher={tmp_path}/train", f"hydra.run.dir={tmp_path}/distill"))
    assert rc == 0, err
    teacher, _ = load_team(tmp_path / "train" / "policies" / "teacher")
    student, manifest = load_team(tmp_path / "distill" / "policies" / "student")
    assert isinstance(teacher["looker"].sb3.features_extractor, ImageFeatures)
    assert isinstance(student["looker"].encoder, ImageEncoder)
    assert manifest["networks"]["looker"]["cnn"] == {"channels": [16, 32], "kernels": [8, 4], "strides": [4, 2],
                                                     "max_grid": 4, "features_dim": 64}
    assert student.normalizers["looker"].fixed
    # saliency and DIGR see 6x6-pixel patches of all channels (saliency.image_patch), not 3888 single values
    assert len(manifest["config"]["features"]["looker"]) == 36
    # attacks and saliency treat the flattened pixels as features: not image-aware, but they run
    rc, out, err = cli("attack", *tiny(f"attack.policy={tmp_path}/distill", "attack.methods=[random,fgsm,pgd,spsa]",
                                       "attack.eps=[0.1]", "attack.victims=[all]", "attack.episodes=2",
                                       "attack.checks=false", "attack.restarts=1", "attack.steps=2", "attack.n_boot=50",
                                       f"hydra.run.dir={tmp_path}/attack"))
    assert rc == 0, err
    clean = [ln.split()[0].split("@")[0] for ln in out.splitlines() if " clean " in ln and "eps 0.1" in ln]
    assert clean == ["teacher", "student"], out
    rc, out, err = cli("saliency", *tiny(f"saliency.policy={tmp_path}/distill", "saliency.episodes=1",
                                         f"hydra.run.dir={tmp_path}/saliency"))
    assert rc == 0, err
    maps = np.load(tmp_path / "saliency" / "reports" / "saliency.npz")
    assert any(v.shape[-1] == 36 for v in maps.values())  # one score per patch


def test_image_patches_group_every_channel_of_square_pixel_blocks():
    last = image_patches(_image_group((12, 18, 3)), 6)
    assert list(last)[:4] == ["patch_0_0", "patch_0_1", "patch_0_2", "patch_1_0"] and len(last) == 6
    # (y, x, c) sits at (y * 18 + x) * 3 + c in an (H, W, C) row
    assert last["patch_0_1"] == sorted((y * 18 + x) * 3 + c for y in range(6) for x in range(6, 12) for c in range(3))
    first = image_patches(_image_group((3, 12, 18)), 6)
    assert first["patch_1_2"] == sorted(c * 216 + y * 18 + x for y in range(6, 12) for x in range(12, 18) for c in range(3))
    assert image_patches(_image_group((12, 18, 3)), 5)["patch_2_3"] == sorted(
        (y * 18 + x) * 3 + c for y in range(10, 12) for x in range(15, 18) for c in range(3))
    layouts = feature_layouts([_image_group((12, 18, 3))], {"looker": {"corner": [0]}}, None, 6)
    assert layouts["looker"].names[0] == "corner" and len(layouts["looker"]) == 12 * 18 * 3  # configured wins


def test_saliency_labels_of_images_are_the_same_in_memory_bounded_chunks():
    g = _image_group((36, 36, 3))
    torch.manual_seed(0)
    student = MLPPolicy(g, _arch("student"))
    layouts = feature_layouts([g], image_patch=6)
    obs = torch.as_tensor(_images(5)["looker_0"]) / 255
    whole = SaliencyLabeller(layouts).heads_and_saliency(student, "looker", obs)
    one_by_one = SaliencyLabeller(layouts, max_values=37 * obs.shape[1]).heads_and_saliency(student, "looker", obs)
    assert whole[1].shape == (5, 36)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, one_by_one))


def test_an_oversized_flattened_network_is_warned_about_with_its_cause_and_fix(caplog):
    g = AgentGroup("cam", ("cam_0",), spaces.Box(0, 1, (60, 80, 3), np.float32), spaces.Discrete(4))
    policy = MLPPolicy(g, {"hidden_sizes": [256, 256], "activation": "tanh"})
    n = 14_400 * 256 + 256 + 256 * 256 + 256 + 256 * 4 + 4
    assert policy.num_parameters == n
    with caplog.at_level("WARNING", logger="madistill.policies.base"):
        warn_if_large(policy, "student", n)
        assert caplog.records == []
        warn_if_large(policy, "student", 1_000_000)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in line
    assert f"group 'cam' has {n:,} parameters" in line and "flattened observation of 14,400 features" in line
    assert "lower student.hidden_sizes" in line and "uint8 Box (H, W, C)" in line and "warn_parameters=1,000,000" in line


def test_teachers_over_warn_parameters_are_warned_about_before_training(caplog):
    cfg = compose_config(tiny(*PIXELS, "warn_parameters=100000"))
    spec = env_spec(cfg.env)
    with caplog.at_level(logging.WARNING, logger="madistill.policies.base"), make_vec_env(cfg.env, spec) as venv, \
            TeacherTrainer(cfg, venv, spec, torch.device("cpu"), tb=None) as trainer:
        n = trainer.team["looker"].num_parameters
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"the teacher network of group 'looker' has {n:,} parameters" in line
    assert "CNN's linear layer reads 64 values" in line and "lower teacher.cnn.max_grid" in line


def test_image_errors_name_the_fix(cli, tmp_path):
    rc, out, err = cli("train", *tiny(*PIXELS, "env.kwargs.size=12", "env.kwargs.square=4", f"hydra.run.dir={tmp_path}/run"))
    assert rc == 2
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert "12x12 images shrink to 2x2 before convolution 1 of teacher.cnn (4x4 kernel)" in line
    assert "lower teacher.cnn.kernels" in line
    assert not (tmp_path / "run" / "policies").exists() and not (tmp_path / "run" / "checkpoint").exists()
    g = _image_group((36, 36, 3))
    with pytest.raises(MadistillError, match="teacher.critic=central cannot join.*use teacher.critic=local"):
        SB3Policy.from_arch(g, {**_arch("teacher"), "team_state_dim": 10})


def test_finetune_refuses_image_students_naming_why(tmp_path: Path):
    g = _image_group((36, 36, 3))
    teacher = SB3Policy.from_arch(g, _arch("teacher"))
    from madistill.policies import TeamPolicy

    team = TeamPolicy([g], {"looker": teacher}, {"looker": ObsNormalizer.for_group(g)})
    students = student_team(team, _arch("student"))
    with pytest.raises(MadistillError, match="encodes image observations with a CNN, which fine-tuning does not support"):
        actor_critic_team(students, team)
    save_team(tmp_path / "s", students, EnvSpec("envs.pixels.parallel_env"), "student")
    again, _ = load_team(tmp_path / "s")
    x = torch.rand(2, g.obs_dim)
    assert torch.equal(again["looker"](x), students["looker"](x))


def test_explain_names_every_setting_an_image_policy_needs_changed_before_any_episode(cli, tmp_path):
    rc, _, err = cli("train", *tiny(*PIXELS), f"hydra.run.dir={tmp_path}/t")
    assert rc == 0, err
    rc, _, err = cli("explain", *tiny(f"explain.policy={tmp_path}/t"), f"hydra.run.dir={tmp_path}/x")
    assert rc == 2 and not (tmp_path / "x").exists()
    assert ("relevance propagation (lrp) and the randomisation check need MLP policies, and the 'looker' policy "
            "(SB3Policy) is not one: drop lrp from explain.methods and set explain.randomisation=false") in err
