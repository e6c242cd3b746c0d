"""The console script: imports the CLI inside a guard, so Ctrl-C during the imports is one line, not a traceback."""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(main())
