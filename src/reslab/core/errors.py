"""The errors a user can fix. The CLI prints any ``UserError`` as one line; every other exception is a bug and
keeps its traceback."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), at most 200 characters."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class UserError(Exception):
    """A problem the user can fix (a bad option, a missing file); printed as one line, exit status 1."""


class ConfigError(UserError, ValueError):
    """An invalid or contradictory option (also a ``ValueError``, as for any bad argument)."""


class DataError(UserError):
    """A problem with the data: a missing folder, no images, unreadable files, no download."""


class ModelError(UserError):
    """An unknown model name, or weights that do not fit the architecture."""


class CheckpointError(UserError):
    """A checkpoint or model file that is missing, damaged, unsafe or from another run."""


class Interrupted(UserError):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was saved (exit status 130)."""


class AlreadyFinished(UserError):
    """A resumed run has already trained the steps it is asked for."""


class PeerLost(UserError):
    """Under torchrun, another rank stopped answering (hung, stopped or dead) within ``--collective-timeout``."""
