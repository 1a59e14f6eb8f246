"""File names made from report labels and figure tags, which may be longer than a file name may be."""

from __future__ import annotations

import hashlib


def short_name(name: str) -> str:
    """``name`` as it is where it leaves room in a file name (255 bytes at most: a report named by a label of many
    settings or a long path), else its first 100 characters and a hash of the whole."""
    if len(name.encode()) <= 120:
        return name
    return f"{name[:100]}_{hashlib.sha1(name.encode()).hexdigest()[:12]}"
