"""Config traps (unknown settings with or without +, + on a set key, values outside a choice or a range), seed
namespaces, conf/ files that hold only what differs from the schemas, and per-stage help from the schemas."""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass
from typing import Any, get_type_hints

import pytest
import yaml
from conftest import REPO, tiny
from omegaconf import OmegaConf

from madistill import seeds
from madistill.cli import compose_config
from madistill.config import (
    AttackConfig,
    AttackMethod,
    Config,
    DistillConfig,
    Divergence,
    EvalConfig,
    UpdateMode,
    ValidationAttack,
    root_schema,
    settings,
)
from madistill.errors import MadistillError
from madistill.stages.registry import stages


def _error_line(err: str, stage: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"madistill {stage}: error: "), err
    return lines[0].removeprefix(f"madistill {stage}: error: ")


# ------------------------------------------------------------------ unknown settings
@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_a_misspelt_setting_is_refused_with_or_without_plus(cli, tmp_path, prefix):
    """Hydra suggests ``+teacher.totl_agent_steps=10`` for the misspelt key, and would then run the defaults."""
    run = tmp_path / "run"
    rc, out, err = cli("train", *tiny("env=relay", "teacher.total_agent_steps=200"),
                       f"{prefix}teacher.totl_agent_steps=10", f"hydra.run.dir={run}")
    assert rc == 2 and out == ""
    line = _error_line(err, "train")
    assert line.startswith("unknown setting 'teacher.totl_agent_steps'")
    assert line.endswith("did you mean teacher.total_agent_steps?")
    assert ("a + adds keys only under dict settings" in line) == bool(prefix)
    assert not run.exists()


def test_a_misspelt_setting_in_a_sweep_is_refused_before_any_job(cli, tmp_path):
    rc, _, err = cli("train", "-m", "+teacher.ppo.n_epoch=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert rc == 2 and _error_line(err, "train").endswith("did you mean teacher.ppo.n_epochs?")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("override,message", [
    ("+sed=1", "unknown setting 'sed' (a + adds keys only under dict settings such as env.kwargs): did you mean seed?"),
    ("+attack.scal.listener.message=0.5", "unknown setting 'attack.scal' (a + adds keys only under dict settings "
                                          "such as env.kwargs): did you mean attack.scale?"),
    ("teacher.anneal.xyz=1", "unknown setting 'teacher.anneal.xyz': teacher.anneal has learning_rate, clip_range, "
                             "ent_coef"),
])
def test_unknown_settings_name_the_closest_or_list_the_section(override, message):
    with pytest.raises(MadistillError) as e:
        compose_config(["env=relay", override])
    assert str(e.value) == message


@pytest.mark.parametrize("override,key,value", [
    ("+env.kwargs.n_symbols_extra=3", "env.kwargs.n_symbols_extra", 3),
    ("+env.features.agent.target=[0,1]", "env.features.agent.target", [0, 1]),
    ("+teacher.group_ppo.agent.ent_coef=0.01", "teacher.group_ppo.agent.ent_coef", 0.01),
    ("+teacher.message_bonus.agent=0.05", "teacher.message_bonus.agent", 0.05),
    ("+attack.exclude.agent=[target]", "attack.exclude.agent", ["target"]),
    ("+attack.scale.agent.target=0.5", "attack.scale.agent.target", 0.5),
    ("+attack.learned_ppo.n_epochs=3", "attack.learned_ppo.n_epochs", 3),
    ("+experiment=sl_long", "teacher.total_agent_steps", 4_000_000),
])
def test_dict_settings_and_config_groups_still_take_plus(override, key, value):
    from omegaconf import OmegaConf

    cfg = compose_config(["env=relay", override])
    assert OmegaConf.to_container(OmegaConf.select(cfg, key)) == value if isinstance(value, list) else \
        OmegaConf.select(cfg, key) == value


@pytest.mark.parametrize("key", ["env.kwargs.n_agents", "teacher.total_agent_steps"])
def test_plus_on_a_set_key_says_to_drop_the_plus(cli, tmp_path, key):
    rc, out, err = cli("train", "env=relay", f"+{key}=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 2 and out == ""
    assert _error_line(err, "train") == f"{key} is already set: drop the + ({key}=<value> replaces it)"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ choices (enums)
@pytest.mark.parametrize("stage, override, line", [
    ("train", "teacher.update_mode=bogus",
     "teacher.update_mode cannot be 'bogus': use teacher.update_mode=<one of inline, thread>"),
    ("train", "teacher.update_mode=process",  # the learner process mode is gone (docs/architecture.md)
     "teacher.update_mode cannot be 'process': use teacher.update_mode=<one of inline, thread>"),
    ("distill", "distill.divergence=bogus",  # every registered divergence, so adding one keeps this
     f"distill.divergence cannot be 'bogus': use distill.divergence=<one of {', '.join(d.value for d in Divergence)}>"),
    ("train", "env.backend=jax", "env.backend cannot be 'jax': use env.backend=<one of auto, batched, pettingzoo>"),
    ("attack", "attack.methods=[pgd,fgsn]",  # every registered attack, so adding one (docs/extending.md) keeps this
     f"attack.methods cannot be 'fgsn': use attack.methods=[<any of {', '.join(m.value for m in AttackMethod)}>]"),
    ("finetune", "finetune.select_attacks=[transfer]",  # validation attacks need no surrogate
     "finetune.select_attacks cannot be 'transfer': use finetune.select_attacks=[<any of "
     f"{', '.join(a.value for a in ValidationAttack)}>]"),
])
def test_a_value_outside_a_choice_is_refused_in_one_line_listing_the_choices(cli, tmp_path, stage, override, line):
    run = tmp_path / "run"
    rc, out, err = cli(stage, "env=relay", override, f"hydra.run.dir={run}")
    assert rc == 2 and out == ""
    assert _error_line(err, stage) == line
    assert not run.exists()
    rc, out, err = cli(stage, "--help", override)
    assert rc == 2 and out == "" and _error_line(err, stage) == line


def test_choices_read_compare_and_save_as_their_plain_names():
    cfg = compose_config(["env=relay", "teacher.update_mode=thread", "finetune.select_attacks=[pgd,random]"])
    mode = cfg.teacher.update_mode
    assert isinstance(mode, UpdateMode) and mode == "thread" and f"{mode}" == str(mode) == "thread"
    saved = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))  # as policy manifests record it
    assert saved["teacher"]["update_mode"] == "thread" and saved["finetune"]["select_attacks"] == ["pgd", "random"]


# ------------------------------------------------------------------ ranges: one validate() per schema
@pytest.mark.parametrize("overrides, message", [
    (["env.num_envs=0"], "env.num_envs must be at least 1, got 0"),
    (["teacher.total_agent_steps=0"], "teacher.total_agent_steps must be at least 1, got 0"),
    (["teacher.ppo.batch_size=0"], "teacher.ppo.batch_size must be at least 1, got 0"),
    (["teacher.ppo.learning_rate=-1"], "teacher.ppo.learning_rate must be above 0, got -1.0"),
    (["teacher.ppo.gamma=1.5"], "teacher.ppo.gamma must be in [0, 1], got 1.5"),
    (["teacher.ppo.ent_coef=-1"], "teacher.ppo.ent_coef must be at least 0, got -1.0"),
    (["teacher.ppo.n_steps=1", "env.num_envs=1"], "teacher.ppo.n_steps * env.num_envs must be at least 2, got 1 * 1"),
    (["teacher.anneal.ent_coef=-0.5"], "teacher.anneal.ent_coef must be at least 0, got -0.5"),
    (["distill.rounds=0"], "distill.rounds must be at least 1, got 0"),
    (["distill.adv_collect=1.5"], "distill.adv_collect must be in [0, 1], got 1.5"),
    (["distill.lr_final=0"], "distill.lr_final must be in (0, 1], got 0.0"),
    (["distill.weight_average=1"], "distill.weight_average must be in [0, 1), got 1.0"),
    (["distill.temperature=0"], "distill.temperature must be above 0, got 0.0"),
    (["finetune.ramp=2"], "finetune.ramp must be in [0, 1], got 2.0"),
    (["finetune.attack_fraction=-0.1"], "finetune.attack_fraction must be in [0, 1], got -0.1"),
    (["finetune.select_robust_weight=1.5"], "finetune.select_robust_weight must be in [0, 1], got 1.5"),
    (["finetune.eps=-0.1"], "finetune.eps must be at least 0, got -0.1"),
    (["saliency.image_patch=0"], "saliency.image_patch must be at least 1, got 0"),
    (["attack.eps=[0.1,-1]"], "attack.eps must be a non-empty list of finite radii at least 0, got [0.1, -1.0]"),
    (["attack.eps=[]"], "attack.eps must be a non-empty list of finite radii at least 0, got []"),
    (["attack.eps=[inf]"], "attack.eps must be a non-empty list of finite radii at least 0, got [inf]"),
    (["attack.victims=[]"], "attack.victims must be a non-empty list of victim sets (all, each, an agent id, ...), got []"),
    (["seed=-1"], "seed must be in [0, 4294967295], got -1"),
    (["seed=99999999999"], "seed must be in [0, 4294967295], got 99999999999"),
    (["torch_threads=-2"], "torch_threads must be at least 1, got -2"),
    (["eval.seed=-5"], "eval.seed must be at least 0, got -5"),
    (["teacher.hidden_sizes=[-5]"], "teacher.hidden_sizes must be a list of layer widths of at least 1, got [-5]"),
    (["student.hidden_sizes=[64,0]"], "student.hidden_sizes must be a list of layer widths of at least 1, got [64, 0]"),
    (["teacher.ppo.learning_rate=inf"], "teacher.ppo.learning_rate must be a finite number, got inf"),
    (["distill.learning_rate=-1"], "distill.learning_rate must be above 0, got -1.0"),
    (["distill.max_grad_norm=-1"], "distill.max_grad_norm must be above 0, got -1.0"),
    (["distill.topk=0"], "distill.topk must be at least 1, got 0"),
    (["+attack.scale.agent.target=-1"], "attack.scale must be multiples of eps at least 0, got {'agent': {'target': -1.0}}"),
    (["attack.frequency=1.5"], "attack.frequency must be in [0, 1], got 1.5"),
    (["attack.methods=[pgd,offsets]", "attack.frequency=0.5"],
     "attack.frequency must be 1 with offsets in attack.methods (or drop offsets), got 0.5"),
    (["attack.target_candidates=0"], "attack.target_candidates must be at least 1, got 0"),
    (["attack.learned_envs=0"], "attack.learned_envs must be at least 1, got 0"),
    (["eval.episodes=0"], "eval.episodes must be at least 1, got 0"),
])
def test_a_setting_out_of_range_is_refused_at_composition_naming_it(overrides, message):
    with pytest.raises(MadistillError) as e:
        compose_config(["env=relay", *overrides])
    assert str(e.value) == message


def test_a_setting_out_of_range_stops_the_cli_before_any_work(cli, tmp_path):
    run = tmp_path / "run"
    rc, out, err = cli("train", *tiny("env=relay", "teacher.total_agent_steps=200"), "distill.adv_collect=2",
                       f"hydra.run.dir={run}")
    assert rc == 2 and _error_line(err, "train") == "distill.adv_collect must be in [0, 1], got 2.0"
    assert not run.exists()


def test_per_group_ppo_settings_are_checked_as_teacher_ppo_is(make_cfg):
    from madistill.teacher import group_ppo_settings

    cfg = make_cfg("env=relay", "+teacher.group_ppo.agent.batch_size=0")
    with pytest.raises(MadistillError) as e:
        group_ppo_settings(cfg.teacher, ["agent"])
    assert str(e.value) == "teacher.group_ppo.agent.batch_size must be at least 1, got 0"


# ------------------------------------------------------------------ seed namespaces
def test_seed_namespaces_keep_their_numbers_and_stay_apart():
    assert EvalConfig().seed == seeds.EVAL_SEED == 10_000 and AttackConfig().seed == seeds.ATTACK_SEED == 20_000
    assert [seeds.dagger_round_seed(s, r) for s, r in ((0, 0), (0, 3), (2, 1))] == [1_000_000, 1_300_000, 3_100_000]
    assert [seeds.finetune_episode_seed(s) for s in (0, 2)] == [10_000_000, 30_000_000]
    assert seeds.finetune_validation_seed(1) == 25_000_000
    # run seeds 0..8, each block as long as the gap its namespace leaves before the next one
    blocks = [(seeds.EVAL_SEED, EvalConfig().episodes), (seeds.ATTACK_SEED, AttackConfig().episodes)]
    for s in range(9):
        blocks += [(seeds.dagger_round_seed(s, r), seeds.DAGGER_ROUND) for r in range(DistillConfig().rounds + 1)]
        blocks += [(seeds.finetune_episode_seed(s), seeds.FINETUNE_VALIDATION),
                   (seeds.finetune_validation_seed(s), seeds.FINETUNE_VALIDATION)]
    blocks.sort()
    assert all(start + length <= later for (start, length), (later, _) in zip(blocks, blocks[1:]))


# ------------------------------------------------------------------ conf/ holds only what differs
def _restated(node: dict[str, Any], schema: type, default: Any, path: str) -> list[str]:
    """The keys of a conf/ file's ``node`` (a section of ``schema``, whose default is ``default``) that restate it."""
    out = []
    hints = get_type_hints(schema)
    for key, value in node.items():
        # the file must name these; a fault preset names its fault (conf/fault/<name>.yaml: name: <name>)
        if key == "defaults" or path + key in ("hydra", "fault.name"):
            continue
        tp, current = hints[key], getattr(default, key)
        if is_dataclass(tp):
            section = current if is_dataclass(current) else tp()  # Config leaves sections to the defaults list
            out += _restated(value, tp, section, f"{path}{key}.")
        elif value == current:
            out.append(f"{path}{key}")
    return out


def test_conf_files_hold_only_what_differs_from_the_schema_defaults():
    """A value in conf/ is a choice (its comment says why); the schema's default lives in madistill/config.py."""
    stages()  # the sections the stages add (conf/purify/) are part of the schema
    schema = root_schema()
    restated = {}
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        text = path.read_text()
        node = yaml.safe_load(text) or {}
        group = path.parent.relative_to(REPO / "conf").as_posix()
        root = node if group == "." or text.startswith("# @package _global_") else {group: node}
        found = _restated(root, schema, schema(), "")
        if found:
            restated[path.relative_to(REPO).as_posix()] = found
    assert restated == {}
    assert {f.name for f in fields(Config)} >= {"env", "teacher", "attack"}


# ------------------------------------------------------------------ per-stage help
def _sections() -> list[str]:
    from dataclasses import fields, is_dataclass
    from typing import get_type_hints

    hints = get_type_hints(Config)
    return ["", *(f.name for f in fields(Config) if is_dataclass(hints[f.name]))]


def test_every_setting_has_a_description_in_its_schema():
    """The comments in madistill/config.py are the help's descriptions: a new setting needs one."""
    keys = [(key, text) for section in _sections() for key, text in settings(section)]
    assert len(keys) > 100 and len({k for k, _ in keys}) == len(keys)
    assert [k for k, text in keys if not text] == []
    described = dict(keys)
    assert described["teacher.ppo.n_epochs"] == "passes over each rollout per update"
    assert described["env.features"].startswith("Named feature groups per agent group for saliency")
    # a choice setting lists its values first (they left the comments when the settings became enums)
    assert described["teacher.update_mode"].startswith("(inline | thread) When each PPO update runs")
    assert described["finetune.select_attacks"] == (f"({' | '.join(a.value for a in ValidationAttack)}) validation "
                                                    "attacks (all agents victims, radius eps)")


@pytest.mark.parametrize("stage", list(stages()))
def test_stage_help_shows_its_own_settings_with_values_and_descriptions(cli, stage):
    rc, out, err = cli(stage, "--help")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"madistill {stage}: {stages()[stage].summary}"
    shown = {ln.split(" = ")[0].strip() for ln in lines if ln.startswith("  ") and " = " in ln}
    own = {key for section in (*stages()[stage].sections, "", "logger") for key, _ in settings(section)}
    assert shown == own
    assert f"madistill {stage} --cfg job [overrides]" in out and "madistill/config.py" in out
    assert len(lines) < 140  # the full composed config of every stage is over 200 lines


def test_stage_help_applies_the_overrides(cli):
    rc, out, _ = cli("train", "-m", "env=relay", "teacher.ppo.n_epochs=3", "seed=4,5", "--help")
    assert rc == 0
    rows = {ln.split(" = ")[0].strip(): ln.split(" = ", 1)[1] for ln in out.splitlines() if " = " in ln}
    assert rows["seed"].startswith("0 ")  # a swept setting keeps its default
    assert rows["teacher.ppo.n_epochs"].split() == ["3", "passes", "over", "each", "rollout", "per", "update"]
    assert rows["env.kwargs"].startswith("{n_agents: 4, n_symbols: 3, topology: chain")
    assert rows["teacher.total_agent_steps"].startswith("500000 ")  # relay's budget from conf/env/relay.yaml
    envs = ", ".join(sorted(p.stem for p in (REPO / "conf" / "env").glob("*.yaml")))
    assert f"env.*  [env=<{envs}> in conf/env/]" in out and "attack.eps" not in out


def test_stage_help_with_a_bad_override_exits_2_in_one_line(cli):
    rc, out, err = cli("attack", "--help", "attack.epz=[0.1]")
    assert rc == 2 and out == ""
    assert _error_line(err, "attack") == "unknown setting 'attack.epz': did you mean attack.eps?"


def test_stage_help_skips_the_values_of_hydra_flags(cli):
    rc, out, err = cli("train", "--help", "--cfg", "job", "teacher.ppo.n_epochs=3")
    assert rc == 0 and err == ""
    assert "teacher.ppo.n_epochs = 3 " in out


def test_the_hparams_tab_lists_the_settings_a_run_sets(monkeypatch):
    """Those that differ from the schemas' defaults, and those its command line names (a sweep's varied setting
    at its default value too), not the couple of hundred every run leaves at their defaults."""
    from madistill.stages import rundir

    cfg = compose_config(["env=relay", "teacher.ppo.learning_rate=0.001", "seed=0"])
    monkeypatch.setattr(rundir, "_command_line_keys", lambda: ["env", "teacher.ppo.learning_rate", "seed"])
    h = rundir.flat_hparams(cfg)
    assert h["teacher.ppo.learning_rate"] == 0.001 and h["seed"] == 0
    assert h["env.name"] == "relay" and h["teacher.total_agent_steps"] == 500_000 and h["env.kwargs.n_agents"] == 4
    assert "teacher.ppo.gamma" not in h and "attack.learned_ppo.n_steps" not in h and len(h) == 10, sorted(h)
    monkeypatch.setattr(rundir, "_command_line_keys", lambda: [])
    assert "seed" not in rundir.flat_hparams(cfg)
