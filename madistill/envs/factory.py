"""Build any PettingZoo environment from a config entry (``target`` import path + kwargs)."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import re
import types
from dataclasses import dataclass, field
from typing import Any

from pettingzoo import AECEnv, ParallelEnv
from pettingzoo.utils.conversions import aec_to_parallel_wrapper, parallel_to_aec_wrapper
from pettingzoo.utils.wrappers import OrderEnforcingWrapper

from madistill.envs.aec_cycle import AECCycleParallelEnv
from madistill.errors import MadistillError


@dataclass(frozen=True)
class EnvSpec:
    """What is needed to rebuild an environment: an import path and its keyword arguments.

    ``target`` names a callable returning a PettingZoo env (``mpe2.simple_spread_v3.parallel_env``),
    or a module exposing ``parallel_env``/``env`` (``mpe2.simple_spread_v3``).
    """

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def id(self) -> str:
        """A short name: the config name, else the module of the factory (``simple_spread_v3``)."""
        if self.name:
            return self.name
        path = re.sub(r"\.(parallel_env|env|raw_env)$", "", self.target)
        return path.rsplit(".", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kwargs": dict(self.kwargs), "name": self.id}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> EnvSpec:
        return EnvSpec(target=d["target"], kwargs=dict(d.get("kwargs") or {}), name=d.get("name", ""))


def _resolve(target: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    candidates = [(target, None)] + ([(module_name, attr)] if module_name else [])
    for mod, att in candidates:
        try:
            obj = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and not (mod == e.name or mod.startswith(e.name + ".")):
                raise MadistillError(f"env {target!r} needs the missing package {e.name!r}: pip install {e.name}") from e
            continue
        if att is None:
            return obj
        if hasattr(obj, att):
            return getattr(obj, att)
        raise MadistillError(f"env target {target!r}: module {mod!r} has no {att!r}; check the spelling of env.target")
    raise MadistillError(
        f"cannot import env target {target!r}{_nearest_modules(target)}: give env.target as an import path such as "
        "mpe2.simple_spread_v3.parallel_env, or pick a config with env=<name>"
    )


def _nearest_modules(target: str) -> str:
    """`` (package 'p' has no 'x'; did you mean ...)`` for the deepest importable package on the path: env
    versions move (``cooperative_pong_v5`` -> ``_v6``), and the package's own list says where."""
    parts = target.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        package, missing = ".".join(parts[:depth]), parts[depth]
        try:
            found = importlib.import_module(package)
        except ImportError:
            continue
        names = [m.name for m in pkgutil.iter_modules(getattr(found, "__path__", []))]
        close = difflib.get_close_matches(missing, names, n=3, cutoff=0.6)
        return f" (package {package!r} has no {missing!r}" + (f"; did you mean {', '.join(close)}?)" if close else ")")
    return ""


# The names PettingZoo gives an env module's factory functions.
FACTORY_NAMES = ("parallel_env", "env", "raw_env")


def _check_factory(factory: Any, name: str, target: str) -> None:
    """Refuse, before calling it, a target that is no env factory: a saved policy's manifest names its env's
    target and keyword arguments, and loading the policy must not call any other function with them. A factory
    is a PettingZoo env class, or a Python function under one of PettingZoo's factory names."""
    if isinstance(factory, type) and issubclass(factory, (ParallelEnv, AECEnv)):
        return
    if isinstance(factory, types.FunctionType) and name in FACTORY_NAMES:
        return
    raise MadistillError(f"env target {target!r} is no PettingZoo env factory: point env.target at a ParallelEnv or "
                         f"AECEnv class, or at a module's {', '.join(f'{n}()' for n in FACTORY_NAMES)} function")


def make_env(spec: EnvSpec, render_mode: str | None = None) -> ParallelEnv:
    """Instantiate the env as a PettingZoo ParallelEnv. AEC envs, and parallel envs that PettingZoo built from
    one (``parallel_wrapper_fn``, as mpe2's are), run through :class:`AECCycleParallelEnv`: same steps, less
    overhead."""
    obj = _resolve(spec.target)
    if isinstance(obj, types.ModuleType):
        name = next((n for n in ("parallel_env", "env") if getattr(obj, n, None) is not None), None)
        if name is None:
            raise MadistillError(f"module {spec.target!r} has no parallel_env() or env(); point env.target at the factory")
        factory = getattr(obj, name)
    else:
        factory, name = obj, spec.target.rpartition(".")[2]
    _check_factory(factory, name, spec.target)
    kwargs = dict(spec.kwargs)
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        env = factory(**kwargs)
    except TypeError as e:
        raise MadistillError(f"env {spec.id!r} rejected its arguments ({e}); fix env.kwargs") from e
    if type(env) is aec_to_parallel_wrapper:
        env = env.aec_env
    # An AEC env that PettingZoo built from a parallel one (``raw_env = parallel_to_aec(...)``): use the
    # parallel env itself, as PettingZoo's own conversion does, rather than converting there and back.
    if isinstance(env, OrderEnforcingWrapper) and isinstance(env.env, parallel_to_aec_wrapper):
        env = env.env.env
    if isinstance(env, AECEnv):
        try:
            env = AECCycleParallelEnv(env)
        except AssertionError as e:
            raise MadistillError(
                f"AEC env {spec.id!r} cannot be run in parallel ({e}); use an env whose agents act simultaneously"
            ) from e
    if not isinstance(env, ParallelEnv) and not hasattr(env, "possible_agents"):
        raise MadistillError(f"env target {spec.target!r} returned {type(env).__name__}, not a PettingZoo env")
    return env
