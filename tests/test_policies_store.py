"""Policies and the policy store: round trips, manifest, compatibility checks, corruption, no pickle, atomicity."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import madistill
from madistill.envs import AgentGroup, EnvSpec, group_agents, make_env
from madistill.errors import MadistillError
from madistill.normalize import ObsNormalizer
from madistill.policies import MLPPolicy, SB3Policy, TeamPolicy, UniformPolicy
from madistill.policies.store import MANIFEST, find_policy_dir, load_team, read_manifest, save_team

SPEAKER = EnvSpec(
    "mpe2.simple_speaker_listener_v4.parallel_env", {"max_cycles": 25}, name="simple_speaker_listener_v4"
)
SPREAD_BOX = EnvSpec("mpe2.simple_spread_v3.parallel_env", {"N": 3, "continuous_actions": True})
ARCH = {"hidden_sizes": [16, 8], "activation": "tanh"}


def _groups(spec: EnvSpec) -> list[AgentGroup]:
    env = make_env(spec)
    try:
        return group_agents(env)
    finally:
        env.close()


def _normalizers(groups: list[AgentGroup], seed: int = 0) -> dict[str, ObsNormalizer]:
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups:
        n = ObsNormalizer(g.obs_dim)
        n.update(rng.normal(2.0, 3.0, size=(50, g.obs_dim)))
        out[g.name] = n
    return out


def _team(kind: str, spec: EnvSpec) -> TeamPolicy:
    torch.manual_seed(0)
    groups = _groups(spec)
    if kind == "sb3":
        policies = {g.name: SB3Policy.from_arch(g, ARCH) for g in groups}
    elif kind == "mlp":
        policies = {g.name: MLPPolicy(g, ARCH) for g in groups}
    else:
        policies = {g.name: UniformPolicy(g) for g in groups}
    for p in policies.values():  # move parameters away from their init so a fresh build would not match
        with torch.no_grad():
            for prm in p.parameters():
                prm.add_(torch.randn_like(prm) * 0.1)
    return TeamPolicy(groups, policies, _normalizers(groups))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, TeamPolicy]:
    team = _team("sb3", SPEAKER)
    return save_team(tmp_path / "teacher", team, SPEAKER, "teacher", config={"seed": 3}), team


def _obs_batch(g: AgentGroup, seed: int = 1) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).normal(size=(32, g.obs_dim)), dtype=torch.float32)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", ["sb3", "mlp", "uniform"])
@pytest.mark.parametrize("spec", [SPEAKER, SPREAD_BOX], ids=["discrete", "box"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, kind, spec):
    team = _team(kind, spec)
    path = save_team(tmp_path / "p", team, spec, "student")
    loaded, manifest = load_team(path, _groups(spec))
    assert [g.name for g in loaded.groups] == [g.name for g in team.groups]
    assert manifest["role"] == "student"
    for g in team.groups:
        a, b = team[g.name], loaded[g.name]
        assert type(b) is type(a)
        x = _obs_batch(g)
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        da, db = a.dist(x), b.dist(x)
        if g.discrete:
            torch.testing.assert_close(db.probs, da.probs, rtol=0, atol=0)
        else:
            torch.testing.assert_close(db.mean, da.mean, rtol=0, atol=0)
            torch.testing.assert_close(db.stddev, da.stddev, rtol=0, atol=0)
        if not g.discrete and kind != "uniform":
            torch.testing.assert_close(b.log_std(), a.log_std(), rtol=0, atol=0)
        if kind == "sb3":
            torch.testing.assert_close(b.value(x), a.value(x), rtol=0, atol=0)
        na, nb = team.normalizers[g.name], loaded.normalizers[g.name]
        np.testing.assert_array_equal(nb.mean, na.mean)
        np.testing.assert_array_equal(nb.var, na.var)
        assert nb.count == na.count == 50
        torch.testing.assert_close(nb.normalize(x), na.normalize(x), rtol=0, atol=0)


def test_manifest_contents(saved):
    path, team = saved
    m = read_manifest(path)
    assert m["madistill_version"] == madistill.__version__
    assert m["role"] == "teacher" and m["config"] == {"seed": 3}
    assert m["env"] == {
        "target": SPEAKER.target,
        "kwargs": {"max_cycles": 25},
        "name": "simple_speaker_listener_v4",
    }
    assert [g["name"] for g in m["groups"]] == ["speaker", "listener"]
    speaker = m["groups"][0]
    assert speaker["agents"] == ["speaker_0"]
    assert speaker["observation_space"]["type"] == "Box" and speaker["observation_space"]["shape"] == [3]
    assert speaker["action_space"] == {"type": "Discrete", "n": 3, "start": 0}
    assert m["groups"][1]["observation_space"]["shape"] == [11]
    for g in team.groups:
        net = m["networks"][g.name]
        assert net["class"] == "sb3_actor_critic"
        assert net["hidden_sizes"] == [16, 8] and net["activation"] == "tanh"
        assert net["num_parameters"] == team[g.name].num_parameters > 0
        norm = m["normalizers"][g.name]
        np.testing.assert_allclose(norm["mean"], team.normalizers[g.name].mean)
        np.testing.assert_allclose(norm["var"], team.normalizers[g.name].var)
        assert norm["count"] == 50 and norm["enabled"] is True
    assert sorted(p.name for p in path.iterdir()) == ["listener.safetensors", MANIFEST, "speaker.safetensors"]


def test_run_directory_is_accepted(tmp_path):
    team = _team("mlp", SPEAKER)
    save_team(tmp_path / "run" / "policies" / "student", team, SPEAKER, "student")
    assert find_policy_dir(tmp_path / "run") == tmp_path / "run" / "policies" / "student"
    loaded, _ = load_team(tmp_path / "run")
    assert isinstance(loaded["speaker"], MLPPolicy)


def test_a_save_in_progress_or_left_by_a_crash_is_not_a_policy(tmp_path):
    from madistill.evaluate.evaluator import discover_policies

    team = _team("mlp", SPEAKER)
    save_team(tmp_path / "run" / "policies" / "student", team, SPEAKER, "student")
    shutil.copytree(tmp_path / "run" / "policies" / "student", tmp_path / "run" / "policies" / ".student.old-123")
    assert find_policy_dir(tmp_path / "run") == tmp_path / "run" / "policies" / "student"
    assert [r.name for r in discover_policies(tmp_path)] == ["student"]
    # runs are named by their path under the directory searched, or by that directory's name (never '.')
    assert [r.run for r in discover_policies(tmp_path)] == ["run"]
    assert [r.run for r in discover_policies(tmp_path / "run")] == ["run"]


# ------------------------------------------------------------------ failures
def test_loading_into_another_env_names_the_saved_env(saved):
    path, _ = saved
    with pytest.raises(MadistillError, match="simple_speaker_listener_v4"):
        load_team(path, _groups(EnvSpec("mpe2.simple_spread_v3.parallel_env", {"N": 3})))
    # same agents and observations, other actions (continuous): the message shows the action spaces
    with pytest.raises(MadistillError, match="its action space for 'speaker_0' differs from this env's "
                                             r"\(\{'type': 'Discrete'.*'Box'.*env=simple_speaker_listener_v4"):
        load_team(path, _groups(EnvSpec(SPEAKER.target, {"continuous_actions": True})))


def test_corrupt_manifest_json(saved):
    path, _ = saved
    (path / MANIFEST).write_text('{"format_version": 1, "groups": [')
    with pytest.raises(MadistillError, match="corrupt manifest"):
        load_team(path)


def test_manifest_missing_fields_or_wrong_format(saved):
    path, _ = saved
    m = json.loads((path / MANIFEST).read_text())
    del m["networks"]
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MadistillError, match="corrupt policy"):
        load_team(path)
    (path / MANIFEST).write_text(json.dumps([1, 2, 3]))
    with pytest.raises(MadistillError, match="manifest"):
        load_team(path)


def test_a_normaliser_of_the_wrong_length_is_a_corrupt_policy_not_a_broadcast(saved):
    path, _ = saved
    m = json.loads((path / MANIFEST).read_text())
    m["normalizers"]["listener"]["mean"] = m["normalizers"]["listener"]["mean"][:1]
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MadistillError, match=r"corrupt policy .*the normaliser of 'listener' has \(1,\) means"):
        load_team(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "wrong_shapes", "nan"])
def test_damaged_weights(saved, damage):
    path, _ = saved
    f = path / "listener.safetensors"
    if damage == "nan":  # a diverged training run: a valid file of NaN weights
        from safetensors.torch import load_file, save_file

        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(f)).items()}, str(f))
    elif damage == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(b"\x00\xff not a safetensors file" * 10)
    elif damage == "delete":
        f.unlink()
    else:  # weights of the other group: valid file, wrong tensors
        (path / "speaker.safetensors").replace(f)
    with pytest.raises(MadistillError, match=str(path)) as e:
        load_team(path)
    assert "\n" not in str(e.value)  # one line, also for torch's list of mismatched weights


def test_nan_outputs_are_an_error_not_a_greedy_action_0():
    """Greedy argmax over NaN logits would pick action 0 for everyone; the policy refuses instead."""
    (group,) = [g for g in _groups(SPEAKER) if g.name == "listener"]
    policy = MLPPolicy(group, ARCH)
    with torch.no_grad():
        next(policy.parameters()).fill_(float("nan"))
    with pytest.raises(MadistillError, match="'listener' policy returned NaN/inf"):
        policy.act(torch.zeros(3, group.obs_dim), deterministic=True)


def test_missing_directory(tmp_path):
    with pytest.raises(MadistillError, match="no such policy"):
        load_team(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MadistillError, match=MANIFEST):
        load_team(tmp_path / "empty")


def test_loading_never_unpickles(saved, monkeypatch):
    path, team = saved

    def boom(*args, **kwargs):
        raise AssertionError("load_team must not unpickle")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    loaded, _ = load_team(path)
    x = _obs_batch(team.groups[1])
    torch.testing.assert_close(loaded["listener"](x), team["listener"](x), rtol=0, atol=0)


# ------------------------------------------------------------------ atomic writes
def test_failed_save_keeps_the_previous_policy_and_leaves_no_temp_dir(saved):
    path, team = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    other = _team("mlp", SPEAKER)

    def half_then_fail(p: Path) -> None:
        p.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_team(path, other, SPEAKER, "student", extra_files={"extra.bin": half_then_fail})
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp or old dirs left behind
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    loaded, m = load_team(path)
    assert m["role"] == "teacher" and isinstance(loaded["speaker"], SB3Policy)


def test_successful_save_replaces_the_directory(saved):
    path, _ = saved
    (path / "stale.txt").write_text("from an older save")
    save_team(
        path,
        _team("mlp", SPEAKER),
        SPEAKER,
        "student",
        extra_files={"notes.txt": lambda p: p.write_text("hi")},
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "listener.safetensors",
        MANIFEST,
        "notes.txt",
        "speaker.safetensors",
    ]
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert read_manifest(path)["role"] == "student"


# ------------------------------------------------------------------ normaliser
def test_obs_normalizer_batches_equal_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.normal(5.0, 2.0, size=(n, 4)) for n in (7, 0, 31, 1)]
    parts[2][:, 3] = 1.0  # a constant feature in one batch
    n = ObsNormalizer(4)
    for p in parts:
        n.update(p)
    full = np.concatenate(parts)
    assert n.count == len(full) == 39
    np.testing.assert_allclose(n.mean, full.mean(0), rtol=1e-12)
    np.testing.assert_allclose(n.var, full.var(0), rtol=1e-10)
    z = n.normalize(torch.as_tensor(full, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)


def test_obs_normalizer_constant_feature_and_disabled():
    n = ObsNormalizer(2, clip=5.0)
    n.update(np.array([[1.0, 3.0], [1.0, -3.0]]))
    assert n.var[0] == 0.0
    z = n.normalize(torch.tensor([[1.0, 300.0]]))
    assert z[0, 0].item() == 0.0 and z[0, 1].item() == 5.0  # constant feature -> 0, clipped at 5
    off = ObsNormalizer(2, enabled=False)
    off.update(np.ones((3, 2)))
    assert off.count == 0
    x = torch.tensor([[4.0, -2.0]])
    assert torch.equal(off.normalize(x), x)
    state = ObsNormalizer.from_state_dict(json.loads(json.dumps(n.state_dict())))
    torch.testing.assert_close(
        state.normalize(torch.tensor([[2.0, 1.0]])), n.normalize(torch.tensor([[2.0, 1.0]]))
    )



def test_policy_labels_name_the_run_when_policies_come_from_several(tmp_path):
    from madistill.evaluate.evaluator import PolicyRef
    from madistill.stages.policies import policy_labels

    one_run = [PolicyRef("teacher", tmp_path, "s0"), PolicyRef("student", tmp_path, "s0")]
    assert policy_labels(one_run) == ["teacher", "student"]
    # a sweep, or a student with its teacher from another run: every label names its run, so a student pairs
    # with its own run's teacher (madistill.cascade.report.baseline, experiments/summarise.py)
    mixed = [PolicyRef("teacher", tmp_path, "a"), PolicyRef("teacher", tmp_path, "b"), PolicyRef("student", tmp_path, "b")]
    assert policy_labels(mixed) == ["teacher@a", "teacher@b", "student@b"]


def test_a_full_disk_reported_by_another_writer_is_an_oserror_and_nothing_is_left(tmp_path):
    """safetensors reports a full disk as its own error: the store raises the OSError the CLI reports in one line."""
    import errno

    from madistill.policies.store import write_dir

    class SafetensorError(Exception):
        pass

    def write(tmp: Path) -> None:
        (tmp / "part").write_text("x")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" }) (os error 28)")

    with pytest.raises(OSError) as e:
        write_dir(tmp_path / "policy", write)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "policy")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):  # other failures stay as they are
        write_dir(tmp_path / "policy", lambda tmp: (_ for _ in ()).throw(ValueError("bad")))


def test_a_figure_that_fails_to_save_leaves_no_file(tmp_path):
    from madistill.tb import TBLogger, pyplot

    fig = pyplot().figure()
    fig.savefig = lambda target, **kw: (Path(target).write_bytes(b"\x89PNG partial"), (_ for _ in ()).throw(OSError(28, "full")))
    with TBLogger(tmp_path / "tb", tmp_path / "reports", enabled=False) as tb, pytest.raises(OSError):
        tb.figure("eval/curve", fig)
    assert list((tmp_path / "reports").iterdir()) == []
