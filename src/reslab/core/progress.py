"""A progress line that works with and without a terminal (no ``stty``, no curses)."""

from __future__ import annotations

import sys
import time

import torch


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Running loss, lr, img/s and ETA on stderr.

    On a terminal one line is redrawn a few times a second; otherwise (a log file, CI) a line is printed every
    ``every`` steps with the mean loss since the last line, as the seed printed every 100 batches.
    """

    def __init__(self, total: int, every: int = 100, start: int = 0, stream=None) -> None:
        self.total, self.every, self.start = total, every, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self.last_draw = time.perf_counter()
        self.loss_sum, self.count = None, 0

    def update(self, step: int, loss: torch.Tensor, lr: float, images_per_sec: float) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.count += 1
        now = time.perf_counter()
        due = (now - self.last_draw > 0.25) if self.tty else (step % self.every == 0)
        if not due and step < self.total:
            return
        mean_loss = self.loss_sum.item() / self.count  # the only sync with the device, a few times a second
        self.loss_sum, self.count, self.last_draw = None, 0, now
        rate = (step - self.start) / (now - self.t0)
        eta = (self.total - step) / rate if rate > 0 else 0
        line = (f"step {step}/{self.total} loss {mean_loss:.4f} lr {lr:.3g} {images_per_sec:.0f} img/s "
                f"ETA {_fmt_time(eta)}")
        self.stream.write(("\r" + line + " " * 8) if self.tty else line + "\n")
        self.stream.flush()

    def epoch_done(self, metrics: dict) -> None:
        parts = [f"epoch {metrics['epoch']}", f"train loss {metrics['train_loss']:.4f}",
                 f"train acc {metrics['train_acc']:.4f}"]
        parts += [f"{k.replace('_', ' ')} {metrics[k]:.4f}" for k in ("val_acc", "test_loss", "test_acc")
                  if k in metrics]
        parts.append(f"{metrics['seconds']:.1f}s")
        self.stream.write(("\r" if self.tty else "") + " | ".join(parts) + " " * 8 + "\n")
        self.stream.flush()


class CountProgress:
    """``label: done/total (pct) rate/s ETA`` for long one-off work (decoding a folder), silent when it is quick.

    Nothing is shown in the first ``quiet`` seconds; then a redrawn line on a terminal, or a line every ~10 % in a log.
    """

    def __init__(self, total: int, label: str, quiet: float = 2.0, stream=None) -> None:
        self.total, self.label, self.quiet = total, label, quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self.shown, self.next_pct = False, 10

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.t0 < self.quiet:
            return
        pct = 100 * done // max(1, self.total)
        if self.tty and now - self.last < 0.25 and done < self.total:
            return
        if not self.tty and pct < self.next_pct and done < self.total:
            return
        self.last, self.shown, self.next_pct = now, True, pct // 10 * 10 + 10
        rate = done / (now - self.t0)
        eta = (self.total - done) / rate if rate > 0 else 0
        line = f"{self.label}: {done}/{self.total} ({pct}%) {rate:.0f}/s ETA {_fmt_time(eta)}"
        self.stream.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        self.stream.flush()

    def done(self) -> None:
        """End the redrawn line (if one was shown)."""
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
