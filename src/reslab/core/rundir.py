"""The run directory: its file names, and reading and writing them. Everything that reads a run goes through here.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per epoch, then one line of
accuracy marks), ``last.pt`` (everything needed to resume) and, at the end, ``model.safetensors`` (the weights and
what is needed to use them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .locks import ProcessLock, pid_alive, writer_pid
from .log import say

CONFIG_FILE, METRICS_FILE = "config.yaml", "metrics.jsonl"
MACHINE_FILE = "machine.json"
HISTORY_DIR = "checkpoints"  # --keep-checkpoints: step-NNNNNNNN.pt
CHECKPOINT_FILE, MODEL_FILE = "last.pt", "model.safetensors"
LOCK_FILE = ".reslab.lock"  # held by the process training the run; its presence also marks a folder reslab made
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, MODEL_FILE)
SPLIT_FILE = "split.json"  # one folder of class folders: the images the run held out (reslab.data.split)
PROTECTED_FILES = (*RUN_FILES, MACHINE_FILE, SPLIT_FILE)  # what no other command may write over in a run directory


@contextlib.contextmanager
def own(run: str | Path, new: bool, force: bool = False) -> Iterator[None]:
    """Hold the run directory ``run`` for this process while it trains (created if missing).

    A second writer or resumer is refused in one line naming the holder; the lock of a process that died is taken
    over (one line). ``new``: a new run, which must not write over files reslab did not make for a run (a folder
    holding someone's ``config.yaml`` or ``metrics.jsonl``) unless ``force``. Under torchrun only rank 0 holds it.
    """
    run = Path(run)
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    made = not run.exists()
    if new and not made and not force and not (run / LOCK_FILE).exists():
        foreign = [f for f in PROTECTED_FILES if (run / f).exists()]
        if foreign:
            raise UserError(f"{run} holds {', '.join(foreign)} that no reslab run made there: choose another --out, "
                            f"or add --force to write over them")
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a folder: choose a folder for the run")
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock = ProcessLock(run / LOCK_FILE)
        got = lock.acquire()
    except OSError as exc:
        raise UserError(f"cannot write the run directory {run}: {exc.strerror or exc}") from None
    if not got:
        holder = lock.holder()
        raise UserError(f"{run} is in use by another reslab process ({holder or 'PID unknown'}): wait for it to "
                        f"end, or choose another --out")
    try:
        if lock.previous is not None and lock.previous.pid != os.getpid():
            say(f"reslab: {run} was left by {lock.previous}, which ended without releasing it (killed?); taking it "
                f"over")
        remove_stale_temps(run)
        yield
    finally:
        lock.release()
        if made and not any(f.name != LOCK_FILE for f in run.iterdir()):  # nothing came of it: leave no trace
            with contextlib.suppress(OSError):
                (run / LOCK_FILE).unlink()
                run.rmdir()


def temp_prefix(kind: str) -> str:
    """The name prefix of a temporary folder a ``kind`` of writer makes (``.reslab-export.tmp<PID>.``): the PID
    lets ``remove_stale_temps`` tell a killed writer's leftovers from a running one's."""
    return f".reslab-{kind}.tmp{os.getpid()}."


def remove_stale_temps(folder: str | Path) -> None:
    """Remove the temporary files and folders that killed reslab writers left in ``folder`` (a checkpoint's
    ``.last.pt.tmp<PID>``, an export's ``.reslab-export.tmp<PID>.*``): those whose process is gone."""
    for tmp in Path(folder).glob(".*.tmp[0-9]*"):
        pid = writer_pid(tmp.name)
        if pid is None or pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def is_run_file(path: str | Path) -> bool:
    """Whether ``path`` is one of a run directory's own files (``PROTECTED_FILES`` in a folder a run made)."""
    path = Path(path)
    return path.name in PROTECTED_FILES and ((path.parent / CONFIG_FILE).exists()
                                             or (path.parent / LOCK_FILE).exists())


def check_output(out: str | Path, kinds: tuple[str, ...], *, force: bool = False, source: Path | None = None,
                 option: str = "--out") -> None:
    """Refuse to write ``out`` over a file users need: the model being read (``source``), a run directory's own
    files, or (without ``force``) any existing file that is not of the ``kinds`` reslab writes there."""
    out = Path(out)
    if not out.exists():
        return
    if out.is_dir():
        raise UserError(f"{option} {out} is a folder: give a file name")
    if (source is not None and out.resolve() == Path(source).resolve()) or is_run_file(out):
        raise UserError(f"{option} {out} is a file of a run: choose another {option}")
    if out.suffix.lower() not in kinds and not force:
        raise UserError(f"{option} {out} exists and is not a {'/'.join(kinds)} file reslab wrote: choose another "
                        f"{option}" + (", or add --force" if source is not None else ""))


def is_finished(run: str | Path) -> bool:
    """Whether the run wrote its final model."""
    return (Path(run) / MODEL_FILE).is_file()


def has_checkpoint(run: str | Path) -> bool:
    """Whether the run can be resumed (or was started)."""
    return (Path(run) / CHECKPOINT_FILE).is_file()


def write_config(run: str | Path, config: dict[str, Any]) -> None:
    Path(run, CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def write_machine(run: str | Path, info: dict[str, Any]) -> None:
    """Record the machine a run trains on (``machine.json``; a resumed run adds its machine to the list)."""
    path = Path(run, MACHINE_FILE)
    seen = read_machines(run)
    if not seen or seen[-1] != info:
        path.write_text(json.dumps([*seen, info], indent=1))


def read_machines(run: str | Path) -> list[dict[str, Any]]:
    """The machines a run trained on, first to last (empty for runs of an older reslab)."""
    try:
        machines = json.loads(Path(run, MACHINE_FILE).read_text())
    except (OSError, ValueError):
        return []
    return machines if isinstance(machines, list) else []


def read_config(run: str | Path) -> dict[str, Any] | None:
    """The run's resolved config, or None when it has none (a damaged one is one line)."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is damaged: not a mapping of options")
    return config


def append_metrics(run: str | Path, row: dict[str, Any]) -> None:
    """Add one line to ``metrics.jsonl`` (on a line of its own, after a line a killed writer left torn)."""
    path = Path(run) / METRICS_FILE
    torn = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(row) + "\n")


def _metric_lines(run: str | Path) -> list[dict[str, Any]]:
    """The parsed lines of ``metrics.jsonl``; a torn or foreign line is skipped with one warning."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = "bad"
        if isinstance(row, dict):
            rows.append(row)
        elif row is not None:
            bad += 1
    if bad:
        say(f"reslab: warning: skipped {bad} damaged line(s) of {path}")
    return rows


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch lines of ``metrics.jsonl``, by epoch (the last line of an epoch, if a resume repeated one)."""
    by_epoch = {row["epoch"]: row for row in _metric_lines(run) if "epoch" in row}
    return [by_epoch[e] for e in sorted(by_epoch)]


def read_marks(run: str | Path) -> dict[str, Any]:
    """The accuracy marks the run recorded (mark -> seconds, step, test_acc), or {}."""
    marks = [row["accuracy_marks"] for row in _metric_lines(run) if "accuracy_marks" in row]
    return marks[-1] if marks else {}


def read_model_meta(run: str | Path) -> dict[str, Any]:
    """The metadata saved with the run's model (arch, classes, normalisation, ...), without loading the weights."""
    from safetensors import safe_open

    with safe_open(str(Path(run) / MODEL_FILE), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("reslab", "{}"))
