"""File names made from report labels and figure tags, which may be longer than a file name may be."""

from __future__ import annotations

import hashlib


def short_name(name: str) -> str:
    """``name`` as it is where it leaves room in a file name (255 bytes at most: a report named by a label of many
    settings or a long path), else its first 100 bytes and a hash of the whole."""
    encoded = name.encode()
    if len(encoded) <= 120:
        return name
    head = encoded[:100].decode(errors="ignore")  # whole characters only
    return f"{head}_{hashlib.sha1(encoded).hexdigest()[:12]}"
