"""Atomic file writers: a reader (or a crash) never observes a half-written report; and strict JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def strict_json(obj: Any) -> str:
    """``obj`` as JSON any reader parses (jq, JavaScript): a NaN or infinite float (a lag past an episode's end, a
    measure undefined for Box actions) is written null, where Python's json would write the bare NaN they reject."""

    def finite(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(obj), indent=2, allow_nan=False)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and return the path.

    The text goes to a temporary file in the destination directory (created if
    missing), which is flushed, fsynced and then moved over ``path`` with
    :func:`os.replace` (atomic on POSIX and Windows when both are on the same
    filesystem). On error the temporary file is removed and ``path`` is left
    untouched. The final file gets the usual ``0o666 & ~umask`` permissions.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        os.replace(tmp_name, dest)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return dest
