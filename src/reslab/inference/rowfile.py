"""Prediction rows on disk: ``reslab predict --output FILE.csv|.jsonl``, written as they are made and continued by
``--resume``.

A file is continued only when it is provably one this tool wrote for the same model and ``--topk``: every complete
row must read back and write out again byte for byte, and every row names the model's weights. Anything else is
refused *before* the file is touched; the one change ``--resume`` ever makes is to cut a last row that a kill left
half-written. Cells that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, carriage return) are
written with a leading ``'``, as OWASP's CSV-injection guidance says; a cell that itself starts with ``'`` gets one
too, so reading back is exact.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, UserError

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value: Any) -> Any:
    """``value`` safe for a spreadsheet: text that would start a formula gets a leading ``'``."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def csv_text(cell: str) -> str:
    """The text ``csv_cell`` wrote as ``cell``."""
    return cell[1:] if cell.startswith("'") else cell


def resolved(path: str | Path) -> str:
    """The key of a row: its path resolved (``./a.png``, ``a.png`` and ``/abs/a.png`` are one file)."""
    return str(Path(path).resolve())


class RowWriter:
    """Rows written to ``--output FILE.csv`` or ``.jsonl`` as they are made, each flushed at once, so a killed
    run keeps every row it wrote; ``resume`` continues a file of the same ``model`` (its weights' digest), and
    ``done`` holds the resolved paths it already has. A file this writer made and left without a row is removed
    on ``close``, so that a failed run does not block its retry."""

    def __init__(self, path: str | Path, topk: int, model: str, resume: bool = False) -> None:
        self.path, self.topk, self.model = Path(path), topk, model
        self.kind = self.path.suffix.lower()
        if self.kind not in (".csv", ".jsonl"):
            raise ConfigError(f"--output {self.path}: the file name must end in .csv or .jsonl")
        if self.path.is_dir():
            raise ConfigError(f"--output {self.path} is a folder: give a file name")
        if self.path.exists() and not resume:
            raise ConfigError(f"--output {self.path} exists: add --resume to skip the files it holds and append, or "
                              f"choose another file")
        self.done: set[str] = set()
        keep = None
        if resume and self.path.exists():
            self.done, keep = self._read_done()  # raises before anything is written
        self.rows, self.made = 0, not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if keep is not None:
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
            self.file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (open for the run)
        except OSError as exc:
            raise UserError(f"cannot write --output {self.path}: {exc.strerror or exc}") from None
        if self.path.stat().st_size == 0 and self.kind == ".csv":
            self.file.write(self._csv_line(self.header()))
            self.file.flush()

    def header(self) -> list[str]:
        return ["path", *(f"{w}_{k}" for k in range(1, self.topk + 1) for w in ("class", "prob")), "error", "model"]

    def _cells(self, r: dict[str, Any]) -> list[Any]:
        cells = [c for t in r.get("top", []) for c in (t["class"], t["prob"])]
        return [csv_cell(c) for c in (r["path"], *cells, *[""] * (2 * self.topk - len(cells)), r.get("error", ""),
                                      self.model)]

    def _line(self, r: dict[str, Any]) -> str:
        if self.kind == ".jsonl":
            return json.dumps({**r, "model": self.model}) + "\n"
        return self._csv_line(self._cells(r))

    def _read_done(self) -> tuple[set[str], int | None]:
        """The resolved paths of the complete rows and, when a kill cut the last row short, the length to keep.
        Raises (and leaves the file as it is) unless every complete row is one this writer would write."""
        data = self.path.read_bytes()
        refuse = f"--output {self.path} is not a reslab predictions file: choose another file"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(refuse) from None
        if not text:
            return set(), None
        records = self._records(text, refuse)
        done, pos = set(), 0
        for i, (path, model, line) in enumerate(records):
            if line is not None and text.startswith(line, pos):
                if path is not None:
                    self._same_model(model)
                    done.add(resolved(path))
                pos += len(line)
            elif i == len(records) - 1 and not text.endswith("\n"):
                break  # the last row, cut short by a kill: it is written again
            else:
                raise ConfigError(refuse)
        return done, (len(text[:pos].encode("utf-8")) if pos < len(text) else None)

    def _records(self, text: str, refuse: str) -> list[tuple[str | None, Any, str | None]]:
        """Each row of ``text`` read back: (path, model, the exact text this writer would write for it); the
        header has no path, and a row that cannot be read back no text."""
        if self.kind == ".jsonl":
            out: list[tuple[str | None, Any, str | None]] = []
            for raw in text.split("\n"):
                try:
                    row = json.loads(raw) if raw else None
                except ValueError:
                    row = None
                ok = isinstance(row, dict) and isinstance(row.get("path"), str)
                out.append((row["path"], row.get("model"), json.dumps(row) + "\n") if ok else (None, None, None))
            if text.endswith("\n"):
                return out[:-1]
            cut, start = text.rsplit("\n", 1)[-1], '{"path": '
            if not (cut.startswith(start) or start.startswith(cut)):  # not the beginning of a row this writer wrote
                raise ConfigError(refuse)
            return out
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if not rows or rows[0][:1] != ["path"] or rows[0][-1:] not in (["model"], ["error"]):
            raise ConfigError(refuse)
        if rows[0] != self.header():
            if rows[0][-1] == "error":
                raise ConfigError(f"--output {self.path} was written by an older reslab, which did not record the "
                                  f"model: choose another file")
            raise ConfigError(f"--output {self.path} holds the top {(len(rows[0]) - 3) // 2}, not --topk "
                              f"{self.topk}: give that --topk to continue it")
        return [(None, None, self._csv_line(rows[0])),
                *((csv_text(r[0]) if r else "", r[-1] if r else None, self._csv_line(r)) for r in rows[1:])]

    @staticmethod
    def _csv_line(cells: list[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf).writerow(cells)
        return buf.getvalue()

    def _same_model(self, model: Any) -> None:
        if model != self.model:
            raise ConfigError(f"--output {self.path} holds predictions of another model ({model}, not "
                              f"{self.model}): choose another file to predict with this one")

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.file.writelines(self._line(r) for r in rows)
        self.file.flush()
        self.rows += len(rows)

    def close(self) -> None:
        self.file.close()
        if self.made and not self.rows:
            self.path.unlink(missing_ok=True)  # only a header: it would make the retry ask for --resume

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
