"""Figures (matplotlib, drawing into files: no display needed)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core import rundir
from ..core.errors import UserError


def pyplot():
    """matplotlib's pyplot on the file-only backend; a broken install is one line, before any training."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("figures need matplotlib, a dependency of reslab that is missing here: pip install "
                        "matplotlib") from None
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def plain_text(draw: Callable[..., Path]) -> Callable[..., Path]:
    """``draw`` with every label as plain text: class names are folder names, and ``under $5 ^_^ over $10`` is not
    TeX for matplotlib to parse (or fail on)."""
    @functools.wraps(draw)
    def drawn(*args: Any, **kwargs: Any) -> Path:
        import matplotlib

        pyplot()
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


@plain_text
def plot_confusion(confusion: list[list[int]], classes: list[str], out: str | Path) -> Path:
    """Draw a confusion matrix (rows: true class, columns: predicted; cells: share of the true class) to PNG."""
    import numpy as np

    plt = pyplot()
    m = np.asarray(confusion, dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = max(4.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the true class")
    ax.set_title(f"confusion matrix (accuracy {np.trace(m) / max(m.sum(), 1):.1%}, n={int(m.sum())})")
    fig.tight_layout()
    return _save(fig, out)


def plot_runs(runs: list[str | Path], out: str | Path, metric: str = "error", labels: list[str] | None = None,
              split_plain: bool = False) -> Path:
    """Curves of runs' ``metrics.jsonl`` against epochs, in the style of He et al. Fig. 6 (see ``plot_groups``)."""
    labels = labels or [Path(r).name for r in runs]
    return plot_groups({label: [run] for label, run in zip(labels, runs)}, out, metric, split_plain)


@plain_text
def plot_groups(groups: dict[str, list[str | Path]], out: str | Path, metric: str = "error",
                split_plain: bool = False) -> Path:
    """Curves against epochs, one per group of runs (e.g. one model over several seeds): the mean over the runs as a
    line and their range (min to max) as a shaded band.

    Args:
        groups: legend name -> run directories.
        out: PNG file to write.
        metric: ``error`` (training error dashed, test error bold, in %), ``loss`` (training loss, log scale) or
            ``lr`` (learning rate, log scale).
        split_plain: put plain nets in a left panel and residual nets in a right one (Fig. 6).
    """
    plt = pyplot()
    data = [(label, [rundir.read_metrics(r) for r in runs], _is_plain(runs[0])) for label, runs in groups.items()]
    panels = [("plain networks", [d for d in data if d[2]]), ("residual networks", [d for d in data if not d[2]])]
    panels = [p for p in panels if p[1]] if split_plain else [("", data)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = any(len(runs) > 1 for runs in groups.values())
    for ax, (title, items) in zip(axes[0], panels):
        for i, (label, runs, _) in enumerate(items):
            c = colours[i % len(colours)]
            if metric == "error":
                _band(ax, runs, lambda r: 100 * (1 - r["train_acc"]), c, "--", 0.9, f"{label} train")
                _band(ax, runs, lambda r: 100 * (1 - r["test_acc"]) if "test_acc" in r else None, c, "-", 2.4,
                      f"{label} test")
                ax.set_ylabel("error (%)")
            else:
                key = "train_loss" if metric == "loss" else "lr"
                _band(ax, runs, lambda r, key=key: r[key], c, "-", 1.8, label, marker="o")
                ax.set_yscale("log")
                ax.set_ylabel("training loss (cross-entropy, log scale)" if metric == "loss"
                              else "learning rate (log scale)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title)
    spread = " (lines: mean over seeds; bands: min to max)" if several else ""
    if metric == "error":
        fig.suptitle(f"training error (dashed) and test error (bold){spread}", fontsize=10)
    elif spread:
        fig.suptitle(spread.strip(" ()"), fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _band(ax, runs: list[list[dict]], value, colour: str, ls: str, lw: float, label: str, marker=None) -> None:
    """Mean of ``value(row)`` over runs at each epoch they all reached, with the min-max band when several."""
    import numpy as np

    per_epoch: dict[int, list[float]] = {}
    for rows in runs:
        for r in rows:
            try:  # metrics.jsonl may have been edited: a row without the number is not drawn
                v = value(r)
            except (KeyError, TypeError):
                v = None
            if isinstance(v, (int, float)) and isinstance(r.get("epoch"), int):
                per_epoch.setdefault(r["epoch"], []).append(v)
    points = sorted((e, vs) for e, vs in per_epoch.items() if len(vs) == len(runs))
    if not points:
        return
    epochs = [e for e, _ in points]
    values = [np.asarray(vs) for _, vs in points]
    ax.plot(epochs, [v.mean() for v in values], color=colour, ls=ls, lw=lw, label=label, marker=marker, ms=3)
    if len(runs) > 1:
        ax.fill_between(epochs, [v.min() for v in values], [v.max() for v in values], color=colour, alpha=0.15,
                        lw=0)


@plain_text
def plot_depth(groups: list[dict], out: str | Path) -> Path:
    """Final training and test error against depth, plain and residual nets as two lines (mean ± std over seeds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for residual, colour, name in ((False, "tab:red", "plain"), (True, "tab:blue", "ResNet")):
        pts = sorted((g["depth"], g) for g in groups if g["residual"] == residual and g["test_error"] is not None)
        if not pts:
            continue
        depths = [d for d, _ in pts]
        for key, ls, marker, lw, what in (("train_error", "--", "o", 1.5, "train"), ("test_error", "-", "s", 2.4,
                                                                                     "test")):
            ax.errorbar(depths, [100 * g[key]["mean"] for _, g in pts], yerr=[100 * g[key]["std"] for _, g in pts],
                        color=colour, ls=ls, marker=marker, lw=lw, capsize=3, label=f"{name} {what}")
    return _finish_line_plot(fig, ax, "depth (weighted layers)", "final error (%)", "error against depth", out)


def _is_plain(run: str | Path) -> bool:
    from ..models import list_models, model_info

    arch = (rundir.read_config(run) or {}).get("arch")
    return arch in list_models() and not model_info(arch).residual


def _finish_line_plot(fig, ax, xlabel: str, ylabel: str, title: str, out: str | Path) -> Path:
    """Labels, title, grid and legend of a one-axes line plot, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    plt = pyplot()
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as exc:
        plt.close(fig)
        raise UserError(f"cannot write the figure {out}: {exc.strerror or exc}") from None
    plt.close(fig)
    return out


@plain_text
def plot_frontier(table: list[dict], rows: list[dict], out: str | Path) -> Path:
    """Final test accuracy against the time budget: every seed as a dot, the mean as a line with its spread."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    dots = [(r["time_budget"], 100 * r["final_test_acc"]) for r in rows if r["final_test_acc"] is not None]
    ax.scatter(*zip(*dots), color="tab:blue", alpha=0.45, s=18, label="one seed")
    budgets = [t["time_budget"] for t in table]
    ax.errorbar(budgets, [100 * t["mean"] for t in table], yerr=[100 * t["std"] for t in table], color="tab:blue",
                lw=2, marker="s", capsize=4, label="mean ± std")
    for t in table:  # the model (and TTA) each budget ran: the preset picks them by budget
        ax.annotate(f"{t.get('arch', '')} {t.get('tta', '')}".strip(), (t["time_budget"], 100 * t["min"]),
                    textcoords="offset points", xytext=(0, -16), ha="center", fontsize=7, color="0.3")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # no "3 x 10^0" labels between the budgets
    ax.margins(y=0.12)
    return _finish_line_plot(fig, ax, "time budget (minutes, whole run)", "test accuracy (%)", "accuracy against time",
                             out)


@plain_text
def plot_lr_find(result: Any, out: str | Path) -> Path:
    """The range test's loss (raw, faint; smoothed, bold) against the learning rate (log scale), with the suggested,
    the minimum's and the config's own learning rates marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed")
    finite = [v for v in result.smoothed if v == v and abs(v) != float("inf")]
    low = min(finite)
    ax.set_ylim(low - 0.1 * abs(low), min(max(finite), 3 * low + 1e-3) * 1.05)
    for lr, colour, text in ((result.suggested_lr, "C2", "suggested"), (result.min_loss_lr, "C3", "minimum"),
                             (result.preset_lr, "0.3", "config's --lr")):
        ax.axvline(lr, color=colour, ls="--", lw=1, label=f"{text} {lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test: {result.arch}, batch {result.batch_size}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


@plain_text
def plot_image_grid(tiles: list[Any], out: str | Path, title: str, columns: int = 6) -> Path:
    """Images with a caption each (``(uint8 array, caption)``; ``None`` leaves a cell blank) in a grid."""
    plt = pyplot()
    rows = max(1, -(-len(tiles) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.2 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(tiles) and tiles[k] is not None:
            image, caption = tiles[k]
            ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 64 else "antialiased")
            ax.set_title(caption, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


@plain_text
def plot_class_metrics(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """Precision, recall and F1 of every class as grouped horizontal bars (worst F1 at the top)."""
    import numpy as np

    plt = pyplot()
    rows = sorted(rows, key=lambda r: r["f1"], reverse=True)
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6.4, 0.42 * len(rows) + 1.2))
    for k, (key, colour) in enumerate((("precision", "C0"), ("recall", "C1"), ("f1", "C2"))):
        ax.barh(y + (k - 1) * 0.27, [r[key] or 0 for r in rows], height=0.27, color=colour, label=key)
    ax.set_yticks(y, [f"{r['class']} (n={r['support']})" for r in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("per class: precision, recall, F1")
    fig.tight_layout()
    return _save(fig, out)
