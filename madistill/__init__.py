"""madistill: distil, attack and explain multi-agent RL teams, and watch failures cascade."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("madistill")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"


def __getattr__(name: str) -> object:
    """``madistill.load_team`` and ``madistill.Team`` (docs/python_api.md), imported on first use so the
    command line starts without torch."""
    if name in ("load_team", "Team"):
        from madistill import api

        return getattr(api, name)
    raise AttributeError(f"module 'madistill' has no attribute {name!r}")
