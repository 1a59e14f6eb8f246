"""Batched numpy ports of mpe2 scenarios: every env copy of a vector env stepped in one set of array
operations, with the same numbers as mpe2 (``tests/test_batched_mpe.py`` compares them step by step).

``env.backend`` chooses: ``batched`` (a port, for the envs in ``PORTS``), ``pettingzoo`` (one PettingZoo env
per copy, any env) or ``auto`` (batched where a port exists and models the env's arguments).
"""

from __future__ import annotations

import re
from typing import Any

from madistill.envs.batched.scenario import BatchedScenario
from madistill.envs.batched.simple_adversary import SimpleAdversary
from madistill.envs.batched.simple_reference import SimpleReference
from madistill.envs.batched.simple_speaker_listener import SimpleSpeakerListener
from madistill.envs.batched.simple_spread import SimpleSpread
from madistill.envs.batched.simple_world_comm import SimpleWorldComm
from madistill.envs.factory import EnvSpec
from madistill.errors import MadistillError

# mpe2 module -> its port. ``parallel_env`` and ``env`` are the same env (the vector env drives ``env`` as
# parallel); ``raw_env`` is not ported, since it skips the clipping of Box actions the other two do.
PORTS: dict[str, type[BatchedScenario]] = {
    "mpe2.simple_adversary_v3": SimpleAdversary,
    "mpe2.simple_spread_v3": SimpleSpread,
    "mpe2.simple_speaker_listener_v4": SimpleSpeakerListener,
    "mpe2.simple_reference_v3": SimpleReference,
    "mpe2.simple_world_comm_v3": SimpleWorldComm,
}


def port_for(spec: EnvSpec) -> type[BatchedScenario] | None:
    """The port of the env ``spec`` builds, or None."""
    return PORTS.get(re.sub(r"\.(parallel_env|env)$", "", spec.target))


def choose_backend(spec: EnvSpec, backend: str, render_mode: str | None = None) -> str:
    """``batched`` or ``pettingzoo`` for env.backend=``backend``; a one-line error where the choice cannot be
    honoured (``batched`` for an env or arguments without a port)."""
    if backend == "pettingzoo":
        return backend
    port = port_for(spec)
    unported = port.unported(spec.kwargs) if port is not None else []
    if render_mode is not None:
        unported.append("render_mode")
    if backend == "auto":
        return "batched" if port is not None and not unported else "pettingzoo"
    if port is None:
        ported = ", ".join(k.rsplit(".", 1)[-1] for k in PORTS)
        raise MadistillError(f"env.backend=batched: env {spec.id!r} ({spec.target}) has no batched port (ported: "
                             f"{ported}); use env.backend=pettingzoo or env.backend=auto")
    if unported:
        raise MadistillError(f"env.backend=batched: the port of {spec.id!r} does not model {', '.join(unported)}; "
                             "use env.backend=pettingzoo or env.backend=auto")
    return backend


def batched_copies() -> Any:
    """The copies class of the batched backend (imported here: it builds on the vector env's bookkeeping)."""
    from madistill.envs.batched.copies import BatchedCopies

    return BatchedCopies
