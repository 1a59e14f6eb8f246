"""The stage registry: the CLI, its help and the config come from it; docs/extending.md's example stage runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from madistill import cli
from madistill.config import ConfigSection, use_sections
from madistill.stages import registry
from madistill.stages.registry import stages


def _doc_files() -> dict[str, str]:
    """The files docs/extending.md shows in full: path -> text (a backquoted path, a colon, then its block)."""
    text = (REPO / "docs" / "extending.md").read_text()
    return dict(re.findall(r"^`([\w/.]+)`:\n\n```\w+\n(.*?)^```", text, re.S | re.M))


@pytest.fixture
def agents_stage(tmp_path, monkeypatch):
    """docs/extending.md's `agents` stage added as the page says: its module, its preset file in conf/ (a copy
    of the project's) and one more entry in STAGE_MODULES. Yields the stage's module name."""
    added = [m for m in registry.STAGE_MODULES if m.rsplit(".", 1)[1] == "agents"]
    if added:
        yield added[0]  # a checkout that added the example as the page says: the tests run that copy
        return
    files = _doc_files()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "agents_example.py").write_text(files["madistill/stages/agents.py"])
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    (tmp_path / "conf" / "agents").mkdir()
    (tmp_path / "conf" / "agents" / "brief.yaml").write_text(files["conf/agents/brief.yaml"])
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setattr(cli, "config_dir", lambda: str(tmp_path / "conf"))
    original = registry.STAGE_MODULES
    monkeypatch.setattr(registry, "STAGE_MODULES", (*original, "agents_example"))
    stages.cache_clear()
    yield "agents_example"
    monkeypatch.setattr(registry, "STAGE_MODULES", original)
    stages.cache_clear()
    stages()  # the config loses the example's section again


def test_the_stages_are_the_registered_modules():
    found = stages()
    built_in = ["train", "evaluate", "distill", "finetune", "saliency", "explain", "attack", "cascade", "repair", "purify",
                "pipeline"]
    # the project's stages in registry order; a stage a user registers (docs/extending.md) joins them
    assert [n for n in found if n in built_in] == built_in and len(found) == len(registry.STAGE_MODULES)
    for module, (name, stage) in zip(registry.STAGE_MODULES, found.items()):
        assert module.rsplit(".", 1)[1] == name and stage.run is sys.modules[module].run
    assert {n for n, s in found.items() if s.resumes and n in built_in} == {"train", "pipeline"}
    assert {n: s.policy_key for n, s in found.items() if s.policy_key and n in built_in} == {
        "evaluate": "eval.policy", "distill": "distill.teacher", "finetune": "finetune.policy",
        "saliency": "saliency.policy", "explain": "explain.policy", "attack": "attack.policy",
        "cascade": "cascade.policy", "repair": "repair.policy", "purify": "purify.teacher"}


def test_listing_the_stages_imports_no_torch():
    """`madistill --help` lists the stages from their modules, which keep torch and friends inside functions."""
    code = ("import sys\nfrom madistill.cli import main\nmain(['--help'])\n"
            "print(sorted(m for m in ('torch', 'stable_baselines3', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "  attack     robustness of saved policies" in out
    assert out.splitlines()[-1] == "[]"


def test_a_stage_added_as_the_docs_say_is_listed_helped_configured_and_run(agents_stage, cli, tmp_path):
    rc, out, _ = cli("--help")
    assert rc == 0
    assert "  agents     list the env's agents, grouped as the policies group them" in out.splitlines()

    rc, out, err = cli("agents", "--help", "env=relay")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "madistill agents: list the env's agents, grouped as the policies group them"
    assert "agents.*: What `madistill agents` says about each agent group.  [agents=<brief> in conf/agents/]" in lines
    spaces = next(ln for ln in lines if ln.startswith("  agents.spaces = "))
    assert spaces.split() == ["agents.spaces", "=", "true", "also", "show", "each", "group's", "observation", "and",
                              "action", "space"]
    assert "  madistill agents agents=brief" in lines
    rc, out, _ = cli("agents", "--help", "agents=brief")
    assert rc == 0 and "  agents.spaces = false" in out

    for i, (extra, shows_spaces) in enumerate([((), True), (("agents.spaces=false",), False), (("agents=brief",), False)]):
        run = tmp_path / f"run{i}"
        rc, out, err = cli("agents", "env=relay", *extra, f"hydra.run.dir={run}")
        assert rc == 0, err
        agents = [f"agent_{i}" for i in range(4)]
        assert json.loads((run / "reports" / "agents.json").read_text()) == {"agent": agents}
        assert out.startswith(f"agent ({', '.join(agents)})")
        assert ("observes Box(" in out) == shows_spaces, (extra, out)
        assert (run / "agents.log").is_file()  # Hydra's job name is the stage's

    rc, out, err = cli("agents", "agents.space=false", f"hydra.run.dir={tmp_path / 'bad'}")
    assert (rc, out) == (2, "")
    assert err.strip() == "madistill agents: error: unknown setting 'agents.space': did you mean agents.spaces?"
    assert not (tmp_path / "bad").exists()


def test_a_section_cannot_be_added_twice():
    from dataclasses import dataclass

    @dataclass
    class Other:
        x: int = 0  # a setting

    with pytest.raises(ValueError, match=r"\['attack'\] are added twice"):
        use_sections([ConfigSection("attack", Other)])
    with pytest.raises(ValueError, match=r"\['other'\] are added twice"):
        use_sections([ConfigSection("other", Other), ConfigSection("other", Other)])


def test_a_sections_preset_is_composed_by_default(agents_stage, monkeypatch):
    import dataclasses
    import importlib

    module = importlib.import_module(agents_stage)
    brief = ConfigSection("agents", module.AgentsConfig, preset="brief")
    monkeypatch.setattr(module, "STAGE", dataclasses.replace(module.STAGE, adds=(brief,)))
    stages.cache_clear()
    assert cli.compose_config(["env=relay"]).agents.spaces is False
    assert cli.compose_config(["env=relay", "agents=base_agents"]).agents.spaces is True
    assert cli.compose_config(["env=relay", "agents.spaces=true"]).agents.spaces is True
