"""The cli layer: the reslab command: flags from type hints and docstrings, one function per command."""

from .commands import COMMANDS, main

__all__ = ["COMMANDS", "main"]
