"""Config traps (unknown settings with or without +, + on a set key) and per-stage help from the schemas."""

from __future__ import annotations

import pytest
from conftest import REPO, tiny

from madistill.cli import compose_config
from madistill.config import Config, settings
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
