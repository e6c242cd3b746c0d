"""The console script: the CLI inside a guard, so Ctrl-C while it imports or builds its parser is one line, not a
traceback (``cli.commands.main`` catches it once a command runs)."""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from .commands import main

        code = main()
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code)
