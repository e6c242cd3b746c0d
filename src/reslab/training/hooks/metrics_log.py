"""``metrics.jsonl``: one line per epoch (rank 0), written after the checkpoint, and TensorBoard scalars with
``--tensorboard``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...core import rundir
from ...core.errors import UserError
from ..loop import Hook, Run


class _Null:
    def write(self, _text: str) -> None: ...

    def flush(self) -> None: ...


class MetricsLog(Hook):
    """One line per epoch in ``metrics.jsonl`` (rank 0), and TensorBoard scalars with ``--tensorboard``."""

    name = "metrics"

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.out, self.writer = out, _tensorboard_writer(out) if tensorboard else None

    def on_epoch_end(self, run: Run, metrics: dict[str, Any]) -> None:
        if not run.dist.main:
            return
        rundir.append_metrics(self.out, metrics)
        if self.writer is not None:
            for key, value in metrics.items():
                if key not in ("epoch", "step"):
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'reslab[tensorboard]'") from None
    return SummaryWriter(log_dir=str(out))
