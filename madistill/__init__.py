"""madistill: distil, attack and explain multi-agent RL teams, and watch failures cascade."""

from madistill.version import __version__

__all__ = ["__version__"]


def __getattr__(name: str) -> object:
    """``madistill.load_team`` and ``madistill.Team`` (docs/python_api.md), imported on first use so the
    command line starts without torch."""
    if name in ("load_team", "Team"):
        from madistill import api

        return getattr(api, name)
    raise AttributeError(f"module 'madistill' has no attribute {name!r}")
