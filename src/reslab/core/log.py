"""Messages: one logger, ``reslab``, written to stderr as they are (no prefix added), by rank 0 only under torchrun.

The progress lines keep their own writer (they rewrite one line on a terminal); everything else a run says goes
through ``say``, so there is one rank-zero rule instead of a guard at every message.
"""

from __future__ import annotations

import logging
import os
import sys


class _Stderr(logging.Handler):
    """Writes to the current ``sys.stderr``, looked up at each message (redirections and test captures see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


class RankZero(logging.Filter):
    """Under torchrun only rank 0 speaks (every rank says the same things)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") in ("", "0")


log = logging.getLogger("reslab")
if not log.handlers:
    _handler = _Stderr()
    _handler.addFilter(RankZero())
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def say(message: str) -> None:
    """Tell the user ``message`` on stderr (rank 0 only)."""
    log.info(message)
