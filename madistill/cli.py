"""``madistill <stage> [Hydra overrides]``: one Hydra app, the stage picks what runs."""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import io
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import madistill
from madistill import interrupts, sweeps
from madistill.config import check_overrides, config_dir
from madistill.errors import MadistillError
from madistill.stages.registry import stages

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Settings every stage reads besides its own sections: the top-level ones ("") and logger.*.
COMMON_SECTIONS = ("", "logger")

USAGE = """usage: madistill <stage> [overrides ...] [-m] [--cfg job] [--help]

stages:
{stages}

Overrides are Hydra's: `madistill train env=simple_spread_v3 teacher.total_agent_steps=2000000 seed=1`.
Sweeps: `madistill train -m seed=0,1,2 +launcher=local` (joblib, local cores; +launcher=slurm / ray for clusters).
Any PettingZoo env without a config file: `env=custom env.target=<module>.parallel_env env.name=<id>`.
`madistill <stage> --help [overrides]` lists the stage's settings with their values and meanings.
"""


_LAUNCHER_EXTRAS = {"submitit_slurm": "slurm", "ray": "ray"}  # Hydra launcher -> the pyproject extra installing it


def config_groups() -> set[str]:
    """The config groups (``env``, ``attack``, ``experiment``, ...): directories of conf/, and Hydra's own."""
    return {p.name for p in Path(config_dir()).iterdir() if p.is_dir()} | {"hydra"}


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``madistill <stage> <overrides>`` would see, without Hydra's runtime section (for scripts
    and tests that call the stages directly), validated as ``run`` validates it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from madistill.config import check_overrides, register_configs, validate

    stages()  # the sections the stages add are part of the config
    check_overrides(overrides, config_groups())
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    validate(cfg)
    return cfg


def run(cfg) -> object:  # noqa: ANN001 - Hydra passes a DictConfig
    """The Hydra task: dispatch on the job name, which the CLI sets to the stage."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    from madistill.config import validate
    from madistill.stages.faults import check_fault_victims

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    _STARTED.append(str(run_dir))
    # torch's INFO records (its compiler's caches) and matplotlib's (its font cache, once per machine) are not ours
    for library in ("torch", "matplotlib"):
        logging.getLogger(library).setLevel(logging.WARNING)
    # Hydra's record of this job is in it already; a resumed run's files are there too, with their times
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    sweep = hc.mode == RunMode.MULTIRUN
    record = run_dir / hc.output_subdir if hc.output_subdir else None
    drop = functools.partial(_drop_failed_start, run_dir, before, record, run_dir / f"{hc.job.name}.log",
                             Path(hc.runtime.cwd))
    if sweep and sweeps.interrupted():  # the sweep was interrupted before this job began: it does not start
        drop()
        sweeps.record_job(hc, run_dir, sweeps.NOT_STARTED)
        return None
    resumed = str(hc.output_subdir or "").startswith(".hydra/resumed_")
    if not resumed and ((run_dir / "policies").is_dir() or (run_dir / "reports").is_dir()):
        print(f"madistill {hc.job.name}: note: {run_dir} holds an earlier run: the files this run writes replace "
              "its files of the same names, and TensorBoard shows both runs' curves as one: pass another "
              f"hydra.{'sweep' if sweep else 'run'}.dir to keep them apart", file=sys.stderr)
    try:
        # a sweep's job also stops where its launcher alone was interrupted (it marks the sweep's record)
        with (interrupts.handled(interrupts.raise_interrupt), _LogTee(sys.stdout) as out, contextlib.redirect_stdout(out),
              interrupts.polled(sweeps.interrupted) if sweep else contextlib.nullcontext()):
            validate(cfg)
            _check_env_file(hc.runtime.choices.get("env"), str(cfg.env.name))
            if not stages()[hc.job.name].faults_each_agent:
                check_fault_victims(cfg, list(hc.overrides.task))
            result = stages()[hc.job.name].run(cfg, run_dir)
    except (MadistillError, OmegaConfBaseException, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # the stage's own failure: the whole story
        drop()
        # reported in one line from main() (a sweep's: every failed job's, after the sweep) rather than with
        # Hydra's "Error executing job" preamble, which a sweep prints for its first failed job only
        error = _user_error(e)
        if not sweep:
            _FAILED.append(error)
        elif not sweeps.record_job(hc, run_dir, sweeps.FAILED, error):
            raise  # no record to report it from: Hydra marks the job failed and reports it
        return None
    except KeyboardInterrupt:
        drop()  # interrupted before it saved anything: no run directory stays behind
        # a sweep's job ends there and the sweep goes on, to end its other jobs as they save their checkpoints
        # and start no new one (the launcher would kill the other jobs' processes on an exception)
        if not sweep or not sweeps.record_job(hc, run_dir, sweeps.INTERRUPTED):
            raise
        return None
    if sweep:
        sweeps.record_job(hc, run_dir, sweeps.DONE)
    return result


def _user_error(e: Exception) -> str:
    """The one line a job's user error is reported in: madistill's own, Hydra's or OmegaConf's, a full disk."""
    if isinstance(e, MadistillError):
        return str(e)
    if isinstance(e, OSError):
        full = "no space left on the device" if e.errno == errno.ENOSPC else "the disk quota is used up"
        return (f"{full} for {e.filename or 'the run'}: free some, or pass hydra.run.dir=<a directory on another "
                "disk> (what was being written was not kept)")
    return _one_line(e)


class _LogTee(io.TextIOBase):
    """Standard output that also copies each printed line into the job's log file (Hydra's ``<stage>.log``
    in the run directory), so the log holds the stage's progress lines and results next to its log records."""

    def __init__(self, out: TextIO):
        self.out = out
        self.files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        self._partial = ""

    def write(self, text: str) -> int:
        self._to_out(self.out.write, text)
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._log(line)
        return len(text)

    def _log(self, line: str) -> None:
        if line.strip():
            record = logging.LogRecord("madistill", logging.INFO, __file__, 0, line, None, None)
            for handler in self.files:
                handler.handle(record)

    def flush(self) -> None:
        self._to_out(self.out.flush)

    @staticmethod
    def _to_out(write: Callable[..., object], *args: str) -> None:
        try:
            write(*args)
        except BrokenPipeError:  # the reader left (`madistill train | head`): the stage goes on, its lines still
            _drop_stdout()  # reach the log, and its exit code is its own

    def fileno(self) -> int:  # for code that hands standard output on to a child process or a terminal query
        return self.out.fileno()

    def isatty(self) -> bool:
        return self.out.isatty()

    def __exit__(self, *exc: object) -> None:
        self._log(self._partial)
        self._partial = ""
        self.flush()  # stays open: it is only a view of the real standard output


def _drop_stdout() -> None:
    """Point standard output at /dev/null once its reader is gone, so later writes and Python's flush at exit
    do not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())


def _drop_failed_start(run_dir: Path, before: dict[Path, int], record: Path | None, log_file: Path, cwd: Path) -> None:
    """After a user error, leave no half-written run behind: unless the stage saved a policy, checkpoint or
    report, remove what this job added to ``run_dir``, and the directory itself when it held only Hydra's
    record (``record``, this job's ``.hydra`` folder) and its log, with the folders above it that it leaves
    empty in the default runs folder under ``cwd`` (``runs/<stage>/<env>/``; folders elsewhere may be the
    user's own). A resumed run's directory, or another run's a stage was run into, keeps the files it had."""
    saved = [p for d in ("policies", "checkpoint", "reports") for p in (run_dir / d).rglob("*")
             if before.get(p) != p.stat().st_mtime_ns]  # new, or replaced in place (a resumed run's checkpoint)
    if saved:
        return
    hydra_own = {record, log_file} | ({p for p in before if record in p.parents} if record else set())
    if before.keys() <= hydra_own:
        shutil.rmtree(run_dir, ignore_errors=True)
        root = (cwd / Path(_run_dir_patterns()["run"]).parts[0]).resolve()  # runs/
        for parent in run_dir.resolve().parents:
            if parent != root and root not in parent.parents:
                break
            try:
                parent.rmdir()  # only an empty folder goes
            except OSError:
                break
        return
    if record is not None and record.parent != run_dir:  # a nested record: the resumed run's own
        shutil.rmtree(record, ignore_errors=True)
    for p in sorted(set(run_dir.rglob("*")) - before.keys() - {log_file}, reverse=True):  # files before their folders
        if p.is_dir():
            with contextlib.suppress(OSError):
                p.rmdir()
        else:
            p.unlink(missing_ok=True)
    # Hydra opens the job's log before the job starts, so it is among the files found there: an empty one is this
    # job's (the same stage's earlier log there holds its lines, which this job appended to)
    if log_file.is_file() and log_file.stat().st_size == 0:
        log_file.unlink()


_FAILED: list[str] = []
_STARTED: list[str] = []  # the run directories whose stage began


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines; keep the part that says what and where."""
    text = str(exc)
    missing = re.search(
        r"Could not find '([\w/]+)/([^']+)'.*?Available options in '[\w/]+':\s*(.*?)(?:\n\s*\n|\nConfig search path|$)",
        text,
        re.S,
    )
    if missing:
        group, name = missing.group(1), missing.group(2)
        opts = " ".join(o for o in missing.group(3).split() if not o.startswith("base_"))
        hint = " (or env=custom env.target=<module>.parallel_env)" if group == "env" else ""
        if group == "launcher":
            return f"unknown launcher {name!r}: use +launcher=<one of: {opts}>"
        if group == "hydra/launcher" and name in _LAUNCHER_EXTRAS:
            return f"the {name} launcher is not installed: pip install -e '.[{_LAUNCHER_EXTRAS[name]}]'"
        return f"unknown {group} {name!r}: use {group}=<one of: {opts}>{hint}"
    choice = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]\s*full_key: ([\w.]+)(\[)?",
                       f"{text}\n{exc.__cause__ or ''}")
    if choice:  # a choice setting (an enum of madistill/config.py) given another value
        value, options, key, item = choice.groups()
        use = f"{key}=[<any of {options}>]" if item else f"{key}=<one of {options}>"
        return f"{key} cannot be {value!r}: use {use}"
    listed = re.search(r"Error merging override ([\w.]+)=(.*)\n?[\s\S]*is not a ListConfig", f"{text}\n{exc.__cause__ or ''}")
    if listed:  # a list setting given one value
        key, value = listed.groups()
        return f"{key} takes a list: use \"{key}=[{value.strip()}]\""
    if re.match(r"Missing mandatory value: env\.target", text):  # env=custom without the env's import path
        return "env=custom needs the env's import path: add env.target=<module>.parallel_env (and env.name=<id>)"
    added = re.search(r"An item is already at '([^']+)'", text)
    if added:  # Hydra's `+key=value` on a key the config already has
        return f"{added.group(1)} is already set: drop the + ({added.group(1)}=<value> replaces it)"
    skip = ("full_key", "object_type", "reference_type", "Set the environment variable")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    if exc.__cause__ is not None:  # OmegaConf's reason ("could not be converted to Float") sits in the cause
        lines += [ln.strip() for ln in str(exc.__cause__).splitlines()[:1] if ln.strip()]
    return "; ".join(lines[:3]) + " (fix the override; `madistill <stage> --help` lists the settings)"


# Hydra flags that take a value as the next argument.
_MULTIRUN = {"-m", "--multirun"}
_MODE_FLAGS = {*_MULTIRUN, "--cfg", "-c", "--info", "-i", "--run", "-r", "--shell-completion", "-sc"}
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--info", "--experimental-rerun"}
_OTHER_FLAGS = {"--resolve", "--hydra-help", "--version", "--help", "-h"}  # Hydra's remaining flags


def _hydra_flag(arg: str) -> bool:
    """Whether Hydra's argument parser takes ``arg`` as one of its flags, as argparse reads them: ``--cfg=job``,
    a long flag's unambiguous prefix (``--multi``), a short flag with its value attached (``-cjob``)."""
    flags = _MODE_FLAGS | _VALUE_FLAGS | _OTHER_FLAGS
    name = arg.split("=", 1)[0]
    if name.startswith("--"):
        return name in flags or len([f for f in flags if f.startswith(name)]) == 1
    return name in flags or any(name.startswith(f) for f in flags & _VALUE_FLAGS if not f.startswith("--"))


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """The command line's overrides, and Hydra's flags with the values of those that take one."""
    overrides: list[str] = []
    flags: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            takes_value = a in _VALUE_FLAGS and i + 1 < len(args)
            flags.extend(args[i : i + 2] if takes_value else [a])
            i += 2 if takes_value else 1
        else:
            overrides.append(a)
            i += 1
    return overrides, flags


def _with_job_name(args: list[str], stage: str) -> list[str]:
    """Overrides first (argparse wants them contiguous), then the stage as job name, then Hydra's flags."""
    overrides, flags = _split_args(args)
    unknown = [f for f in flags if f.startswith("-") and not _hydra_flag(f)]
    if unknown:
        raise MadistillError(f"unknown option {unknown[0]!r}: settings are key=value overrides (`madistill {stage} "
                             "--help` lists them)")
    modes = [f for f in flags if f in _MODE_FLAGS]
    if len(modes) > 1:
        raise MadistillError(f"{' and '.join(modes)} cannot be combined: pass only one of them")
    if any(re.fullmatch(r"\+?hydra\.launcher\.n_jobs=0", o) for o in overrides):
        raise MadistillError("hydra.launcher.n_jobs=0 runs no job: pass the number of jobs to run at a time, or -1 for "
                             "one per core")
    empty = next((o.split("=", 1)[0] for o in overrides if re.fullmatch(r"\+?hydra\.(run|sweep)\.dir=['\"]{0,2}", o)), None)
    if empty:  # Hydra would write the run into the current directory
        raise MadistillError(f"{empty.lstrip('+')} is empty: pass a directory ({empty.lstrip('+')}=<dir>), or leave it out "
                             "for the default under runs/")
    if _MULTIRUN & set(modes) and any(o.lstrip("+").startswith("hydra.run.dir=") for o in overrides):
        raise MadistillError("hydra.run.dir names one run's directory, which a sweep (-m) does not use: pass "
                             "hydra.sweep.dir=<dir> instead (each job runs in <dir>/<job number>)")
    return [*overrides, f"hydra.job.name={stage}", *flags]


def _check_env_file(choice: str | None, name: str) -> None:
    """Refuse an env config file whose ``env.name`` is not its own name: a saved policy finds its env's file
    (feature groups, ``lambda_igr``, teams) by ``env.name``, so a mismatch would lose them in every later stage."""
    if choice and choice != "custom" and choice != name:
        raise MadistillError(f"env.name is {name!r} but its config file is {choice}.yaml: saved policies find their "
                             f"env file by env.name, so the two must agree: rename the file to {name}.yaml or set "
                             f"env.name: {choice} in it (another env goes in a file of its own, or env=custom)")


def _with_saved_env(overrides: list[str], stage: str) -> list[str]:
    """Prepend ``env=<id>`` of the policies a stage reads, so their env file's settings (``lambda_igr``,
    feature groups, budgets, the run directory's name) follow them instead of the default env's. Only when
    every listed or swept policy path names the same env that has a config file. Their ``env.grouping``
    follows them too, as their groups are the grouping's."""
    from madistill.config import changes_env

    key = stages()[stage].policy_key
    if key is None or changes_env(overrides):
        return overrides
    value = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")), "")
    paths = [p.strip().strip("'\"") for p in value.strip("[]").split(",") if p.strip() not in ("", "null", "~")]
    if not paths:
        return overrides
    inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    missing = [p for p in paths if not Path(p).exists()]
    if missing and not set("()[]{}$*?'\"\\") & set(inner):  # plain paths: no sweep function, nesting or quoting
        raise MadistillError(f"no such policy or run directory: {missing[0]} ({key}); pass the path printed at the "
                             "end of a run")
    from madistill.envs.factory import EnvSpec
    from madistill.evaluate.evaluator import discover_policies
    from madistill.policies.store import read_manifest

    try:
        manifests = [read_manifest(discover_policies(p)[0].path) for p in paths]
        ids = {EnvSpec.from_dict(m["env"]).id for m in manifests}
        groupings = {m.get("config", {}).get("env", {}).get("grouping", "auto") for m in manifests}
    except (MadistillError, OSError, ValueError, KeyError, IndexError, AttributeError, TypeError):
        return overrides  # the stage itself reports a missing or corrupt policy, in one line
    if len(ids) != 1:
        return overrides
    if not (Path(config_dir()) / "env" / f"{next(iter(ids))}.yaml").is_file():
        return [*_run_dirs_named(ids.pop(), overrides), *overrides]
    grouping = [f"env.grouping={g}" for g in groupings if len(groupings) == 1 and g != "auto"
                and not any(o.lstrip("+").startswith("env.grouping=") for o in overrides)]
    return [f"env={ids.pop()}", *grouping, *overrides]


def stage_help(stage: str, cfg: DictConfig) -> str:
    """``madistill <stage> --help``: the settings the stage reads, each with its value in ``cfg`` and the
    first sentence of its description in madistill/config.py, then where the other settings are."""
    from omegaconf import OmegaConf

    from madistill.config import section_description, settings

    h = stages()[stage]
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)
    groups = {g: sorted(p.stem for p in (Path(config_dir()) / g).glob("*.yaml")) for g in config_groups() - {"hydra"}}
    out = [f"madistill {stage}: {h.summary}", f"writes {h.writes} in its run directory", ""]
    for section in (*h.sections, *COMMON_SECTIONS):
        if section:
            about = _first_sentence(section_description(section)).replace("``", "`")
            preset = f"  [{section}=<{', '.join(groups[section])}> in conf/{section}/]" if section in groups else ""
            out.append(f"{section}.*{': ' + about if about else ''}{preset}")
        else:
            out.append("every stage:")
        rows = [(f"  {key} = {_shown(values, key)}", _first_sentence(text)) for key, text in settings(section)]
        width = min(max(len(r) for r, _ in rows), 56)
        out += [f"{r:<{width}}  {text}".rstrip() for r, text in rows]
        out.append("")
    where = [(f"madistill {stage} --cfg job [overrides]", "prints the whole config this command would run with"),
             ("conf/", "the defaults: config.yaml and one directory per config group"),
             ("madistill/config.py", "every setting's type and description"),
             ("madistill <stage> --help", "another stage's settings (`madistill --help` lists the stages)"),
             (", ".join(f"+{g}=<{', '.join(groups[g])}>" for g in ("experiment", "launcher") if g in groups), "presets")]
    width = max(len(w) for w, _ in where[:-1])
    out += ["examples:", *(f"  {e}" for e in h.examples), "", "other settings:",
            *(f"  {w:<{width}}  {text}" for w, text in where)]
    return "\n".join(out) + "\n"


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0]


def _shown(values: object, key: str) -> str:
    """The value at dotted ``key`` of a config container, written as an override would write it."""
    import yaml

    for part in key.split("."):
        values = values[part]  # type: ignore[index]
    return yaml.safe_dump(values, default_flow_style=True, width=1 << 30, sort_keys=False).removesuffix("...\n").strip()


def _print_stage_help(stage: str, args: list[str]) -> int:
    """``madistill <stage> --help [overrides]``: print the stage's help with the overrides applied (swept ones,
    ``-m key=a,b``, keep their defaults); returns the exit code (2 and one line for an override that does not
    compose)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(_split_args(args)[0])
        overrides = [o.input_line for o in parsed if not o.is_sweep_override()]
        text = stage_help(stage, compose_config(_with_saved_env(overrides, stage)))
    except (MadistillError, HydraException, OmegaConfBaseException) as e:
        print(f"madistill {stage}: error: {e if isinstance(e, MadistillError) else _one_line(e)}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    sys.stdout.flush()  # a closed pipe (`--help | head`) raises here, for main() to report in one line
    return 0


def _run_dirs_named(env_id: str, overrides: list[str]) -> list[str]:
    """``hydra.run.dir`` and ``hydra.sweep.dir`` as conf/config.yaml names them, with ``env_id`` for the env's
    name: runs of policies saved for an env without a config file are filed under that env, not the default
    one (unless the command line names the directories)."""
    dirs = _run_dir_patterns()
    return [f"hydra.{mode}.dir={dirs[mode].replace('${env.name}', env_id)}" for mode in ("run", "sweep")
            if not any(o.startswith(f"hydra.{mode}.dir=") for o in overrides)]


def _run_dir_patterns() -> dict[str, str]:
    """``hydra.run.dir`` and ``hydra.sweep.dir`` as conf/config.yaml writes them, interpolations unresolved."""
    from omegaconf import OmegaConf

    hydra = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "config.yaml").hydra, resolve=False)
    return {mode: str(hydra[mode]["dir"]) for mode in ("run", "sweep")}  # type: ignore[index]


def _run_overrides(run_dir: Path, overrides: list[str]) -> list[str]:
    """``overrides`` after the command-line settings the run in ``run_dir`` last ran with (the newest
    ``.hydra/resumed_*/`` record of a resumed run, else ``.hydra/``'s ``overrides.yaml``: env, experiment,
    budgets, ...) that ``overrides`` does not set again, so a resumed run keeps them unless told otherwise. A
    setting the run added (``+key=``) stays when ``overrides`` changes it (``key=``), so that the change has a
    key to change; removing it (``~key``) drops it, and with it the removal, as there is then nothing to remove."""
    import yaml

    records = sorted(run_dir.glob(".hydra/resumed_*/overrides.yaml")) or [run_dir / ".hydra" / "overrides.yaml"]
    if not records[-1].is_file():
        return overrides

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    changed = {key(o) for o in overrides}
    plain = {key(o) for o in overrides if not o.startswith(("+", "~"))}
    saved = [str(o) for o in yaml.safe_load(records[-1].read_text()) or []]  # as written: no interpolation resolved
    added = {key(o) for o in saved if o.startswith("+")}
    kept = [o for o in saved if not key(o).startswith("hydra.")
            and (key(o) not in changed or (o.startswith("+") and key(o) in plain))]
    return [*kept, *(o for o in overrides if not (o.startswith("~") and key(o) in added))]


def _resume_in_place(overrides: list[str], stage: str) -> list[str]:
    """``teacher.resume=<run>/checkpoint`` continues that run with its command-line settings
    (:func:`_run_overrides`) in its own directory (one TensorBoard curve, its policies replaced at the end),
    unless the command line names another ``hydra.run.dir``. Hydra's record of the resumed job goes to
    ``.hydra/resumed_<time>/`` so the run's original ``.hydra/`` stays as it was."""
    resume = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("teacher.resume=")), "")
    if resume.strip("'\"") not in ("", "null") and not stages()[stage].resumes:
        resuming = [s.name for s in stages().values() if s.resumes]
        raise MadistillError(f"teacher.resume continues a teacher's training ({' or '.join(resuming)}); {stage} does not "
                             "resume: run it again without teacher.resume")
    ckpt = Path(resume.strip("'\""))
    if stages()[stage].resumes and ckpt.name != "checkpoint" and (ckpt / "checkpoint").is_dir():  # a run directory
        ckpt = ckpt / "checkpoint"
        overrides = [f"teacher.resume={ckpt}" if o.lstrip("+").startswith("teacher.resume=") else o for o in overrides]
        resume = str(ckpt)
    if not stages()[stage].resumes or not resume or ckpt.name != "checkpoint" or not ckpt.is_dir():
        return overrides
    from madistill.policies.store import MANIFEST, finish_hint, resumes

    if (ckpt / MANIFEST).is_file() and not resumes(ckpt):
        raise MadistillError(f"{ckpt} is an interrupted fine-tune's checkpoint, which teacher.resume cannot continue: "
                             f"{finish_hint(ckpt)}, or pass the checkpoint as a policy")
    overrides = _run_overrides(ckpt.parent, overrides)
    if any(o.startswith(("hydra.run.dir=", "hydra.output_subdir=")) or o in _MULTIRUN for o in overrides):
        return overrides
    run_dir = ckpt.resolve().parent
    if stage == "train" and (run_dir / "policies" / "student").is_dir():
        raise MadistillError(f"{run_dir} holds a student distilled from the teacher that resuming there would replace: "
                             f"resume it with `madistill pipeline teacher.resume={ckpt}`, or train into another "
                             "directory with hydra.run.dir=<dir>")
    return [f"hydra.run.dir={run_dir}", "hydra.output_subdir=.hydra/resumed_${now:%Y-%m-%d_%H-%M-%S}", *overrides]


def _beside_another_stage(overrides: list[str], stage: str) -> list[str]:
    """A stage that trains no teacher run into the directory of another stage's run (``hydra.run.dir=<run>``:
    evaluating into a pipeline's run, say) records its job in ``.hydra/<stage>_<time>/``, so the run's own
    ``.hydra/`` record, whose settings a resume of that run reads back (:func:`_run_overrides`), stays as it was.
    A run of the same stage there, or of a stage that trains a teacher, replaces the run, and its record too."""
    import yaml

    if stages()[stage].resumes or any(o.startswith("hydra.output_subdir=") or o in _MULTIRUN for o in overrides):
        return overrides  # a stage that trains a teacher replaces the run: its settings are the ones to resume with
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), "")
    record = Path(run_dir.strip("'\"")) / ".hydra" / "hydra.yaml"
    if not run_dir or not record.is_file():
        return overrides
    try:
        earlier = yaml.safe_load(record.read_text())["hydra"]["job"]["name"]
    except (yaml.YAMLError, KeyError, TypeError):
        return overrides
    if earlier == stage:
        return overrides
    return [*overrides, f"hydra.output_subdir=.hydra/{stage}_${{now:%Y-%m-%d_%H-%M-%S}}"]


def main(argv: list[str] | None = None) -> int:
    """``madistill <stage> [overrides]``: run one stage; returns the exit code (0, 2 for a user error, 130 when interrupted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # an env module beside the user (env.target=mymodule.parallel_env) imports as under `python -m madistill`;
    # after the installed packages, so a local folder cannot shadow one
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return _main(args)
    except BrokenPipeError:  # `madistill train --help | head`: the reader left; say so once, where it can be seen
        _drop_stdout()
        who = f"madistill {args[0]}" if args and args[0] in stages() else "madistill"
        print(f"{who}: error: the output pipe closed before madistill finished writing: "
              "pipe into `less` to read all of it", file=sys.stderr)
        return 2


def _main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.format(stages="\n".join(f"  {s.name:<10} {s.summary}" for s in stages().values())))
        return 0 if args else 2
    if args[0] == "--version":
        print(f"madistill {madistill.__version__}")
        return 0
    stage, rest = args[0], args[1:]
    if stage not in stages():
        close = difflib.get_close_matches(stage, stages(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(f"madistill: error: unknown stage {stage!r}: {hint}use one of {', '.join(stages())}", file=sys.stderr)
        return 2
    if "--help" in rest or "-h" in rest:
        return _print_stage_help(stage, rest)
    try:
        hydra_args = _with_job_name(rest, stage)
        check_overrides(hydra_args, config_groups())
        hydra_args = _with_saved_env(hydra_args, stage)
        hydra_args = _resume_in_place(hydra_args, stage)
        hydra_args = _beside_another_stage(hydra_args, stage)
    except MadistillError as e:
        print(f"madistill {stage}: error: {e}", file=sys.stderr)
        return 2

    import hydra

    from madistill.config import register_configs

    register_configs()
    # Let Hydra's composition errors reach us so we can print one line (instead of its multi-line report).
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    sys.argv = [f"madistill-{stage}", *hydra_args]
    _FAILED.clear()
    _STARTED.clear()
    sweep = bool(_MULTIRUN & set(_split_args(hydra_args)[1]))
    app = hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(run)
    # a caller in this process (a test, a notebook) gets its own handlers back after
    with interrupts.handled(sweeps.interrupt_sweep if sweep else interrupts.raise_interrupt):
        return _run_app(stage, app, _swept_keys(hydra_args) if sweep else None)


def _run_app(stage: str, app: Callable[[], object], swept: set[str] | None) -> int:
    """Run the Hydra app and turn what ends it into an exit code and one line; a sweep's (``swept``: the keys it
    sweeps) into its report too, also where a job's crash ends it."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    jobs: list[dict] = []
    try:
        with sweeps.sweep_record() as record:
            try:
                with sweeps.launching() if swept is not None else contextlib.nullcontext():
                    app()
            except (Exception, KeyboardInterrupt):  # what the other jobs did, also when a job's crash ends the sweep
                if swept is not None:
                    sweeps.report(stage, sweeps.read(record), swept, stages()[stage].resumes, closing=False)
                raise
            jobs = sweeps.read(record)
    except SystemExit as e:  # Hydra's --help / --info end with sys.exit; main() returns codes instead
        if isinstance(e.code, str):
            print(f"madistill {stage}: error: {e.code}", file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except MadistillError as e:
        print(f"madistill {stage}: error: {e}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as e:
        print(f"madistill {stage}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        checkpoints = [Path(d) / "checkpoint" for d in _STARTED if (Path(d) / "checkpoint").is_dir()]
        resume = f": resume with teacher.resume={checkpoints[-1]}" if checkpoints and stages()[stage].resumes else ""
        print(f"madistill {stage}: interrupted{resume}", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        # Before the stage begins, an OSError is Hydra's at the run directory: creating it, or its log file there
        # (which logging reports as a ValueError caused by it). Past that it is the stage's (not a user error: keep
        # the whole story); a closed pipe is main()'s to report.
        cause = e if isinstance(e, OSError) else e.__cause__
        if _STARTED or not isinstance(cause, OSError) or cause.filename is None or isinstance(cause, BrokenPipeError):
            raise
        made = isinstance(e, OSError) and not Path(cause.filename).suffix  # not a file Hydra writes there
        what = "create the run directory" if made else "write in the run directory:"
        print(f"madistill {stage}: error: cannot {what} {cause.filename} ({cause.strerror}): "
              "pass hydra.run.dir=<a writable directory> (hydra.sweep.dir=... with -m)", file=sys.stderr)
        return 2
    for msg in _FAILED:
        print(f"madistill {stage}: error: {msg}", file=sys.stderr)
    return sweeps.report(stage, jobs, swept or set(), stages()[stage].resumes) or (2 if _FAILED else 0)


def _swept_keys(hydra_args: list[str]) -> set[str]:
    """The keys a sweep's command line gives several values (``seed=0,1,2``, ``glob(...)``, ``range(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(_split_args(hydra_args)[0])
    except Exception:  # noqa: BLE001 - a malformed override: Hydra reports it in its turn
        return set()
    return {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


if __name__ == "__main__":
    sys.exit(main())
