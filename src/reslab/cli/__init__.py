"""The cli layer: the reslab command: flags from type hints and docstrings, one function per command."""

from typing import Any

__all__ = ["COMMANDS", "main"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the console script imports ``reslab.cli.console`` before its Ctrl-C guard, and the
    # commands module (jsonargparse, the config) must load inside that guard.
    if name in __all__:
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'reslab.cli' has no attribute {name!r}")
