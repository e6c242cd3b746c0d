"""``reslab compare``: train several models (or schedules) with one recipe, then report and plot them side by side.

This is the experiment of He et al. 2015, Fig. 6: plain nets get *worse* with depth (the degradation problem),
residual nets do not; and the seed's comparison of training with and without the StepLR decay.
Each run is an ordinary run directory ``OUT/<name>/``; finished runs are reused and interrupted ones resumed, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from . import rundir
from .config import TrainConfig
from .errors import ConfigError
from .models import count_macs, count_params, create_model, model_info

# Options that change where and how visibly a run trains, not its result: a finished run that differs from the
# requested recipe only in these is still the same experiment.
NOT_RECIPE = frozenset({"out", "device", "threads", "workers", "loader", "log_every", "tensorboard",
                        "checkpoint_every", "strict", "data_dir", "compile"})


def recipe_differences(saved: dict[str, Any], requested: TrainConfig) -> list[str]:
    """The options (as flags) on which a saved run's config differs from ``requested``, outside ``NOT_RECIPE``.

    Options requested as ``None`` (chosen by reslab, e.g. the augmentation) match what the saved run chose."""
    want = requested.to_dict()
    return [f"--{k.replace('_', '-')} {saved.get(k)!r} (asked {v!r})" for k, v in want.items()
            if k not in NOT_RECIPE and v is not None and saved.get(k) != v]


def _variants(base: TrainConfig, archs: list[str], schedules: list[str], budgets: list[float],
              seeds: list[int]) -> dict[str, TrainConfig]:
    if sum(map(bool, (archs, schedules, budgets))) > 1:
        raise ConfigError("give one of --archs, --schedules or --budgets")
    if seeds and not budgets:
        raise ConfigError("--seeds goes with --budgets")
    if budgets:
        return {f"{b:g}min-seed{s}": dataclasses.replace(base, time_budget=b, seed=s)
                for b in budgets for s in (seeds or [base.seed])}
    if schedules:
        return {s: dataclasses.replace(base, schedule=s) for s in schedules}
    if not archs:
        raise ConfigError("give --archs (e.g. plain20,resnet20,plain56,resnet56), --schedules (e.g. step,constant) "
                         "or --budgets (minutes, e.g. 2.5,5,10)")
    for a in archs:
        model_info(a)  # unknown names fail before anything trains
    return {a: dataclasses.replace(base, arch=a) for a in archs}


def _summary_row(name: str, cfg: TrainConfig, run: Path) -> dict[str, Any]:
    rows = rundir.read_metrics(run)
    info = model_info(cfg.arch)
    classes = rundir.read_model_meta(run).get("classes") or range(10)
    model = create_model(cfg.arch, num_classes=len(classes), **cfg.model_kwargs)
    test = [r["test_acc"] for r in rows if "test_acc" in r]
    last = rows[-1] if rows else {}
    return {"name": name, "arch": cfg.arch, "schedule": cfg.schedule, "residual": info.residual,
            "depth": info.depth, "params": count_params(model),
            "macs": count_macs(model, (rundir.read_config(run) or {}).get("image_size") or cfg.input_size),
            "epochs": last.get("epoch"), "steps": last.get("step"),
            "final_test_error": 1 - test[-1] if test else None, "best_test_error": 1 - max(test) if test else None,
            "final_train_error": 1 - last["train_acc"] if last else None,
            "final_train_loss": last.get("train_loss"), "wall_seconds": round(sum(r["seconds"] for r in rows), 1),
            "time_budget": cfg.time_budget, "seed": cfg.seed, "final_test_acc": test[-1] if test else None,
            "seconds_to_result": last.get("wall_seconds"), "accuracy_marks": rundir.read_marks(run), "run": str(run)}


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per time budget: final test accuracy over seeds (mean, sample std, min, max) and the median time to each
    accuracy mark among the seeds that reached it."""
    import statistics

    table = []
    for budget in sorted({r["time_budget"] for r in rows}):
        runs = [r for r in rows if r["time_budget"] == budget and r["final_test_acc"] is not None]
        accs = [r["final_test_acc"] for r in runs]
        if not accs:
            continue
        marks = {}
        for mark in sorted({m for r in runs for m in r["accuracy_marks"]}, key=float):
            times = [r["accuracy_marks"][mark]["seconds"] for r in runs
                     if (r["accuracy_marks"].get(mark) or {}).get("seconds") is not None]
            marks[mark] = {"reached": len(times), "median_seconds": statistics.median(times) if times else None}
        table.append({"time_budget": budget, "seeds": len(accs), "mean": statistics.fmean(accs),
                      "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs), "max": max(accs),
                      "mean_seconds_to_result": statistics.fmean(r["seconds_to_result"] or 0 for r in runs),
                      "marks": marks})
    return table


def compare(config: TrainConfig, *, archs: list[str] | None = None, schedules: list[str] | None = None,
            budgets: list[float] | None = None, seeds: list[int] | None = None, out: str | Path = "runs/compare",
            plots: bool = True) -> dict[str, Any]:
    """Train every variant with the same recipe and seed into ``out/<name>/``, then write the report.

    Args:
        config: the shared recipe (its ``arch`` is the model for a schedule comparison).
        archs: model names to compare (e.g. ``["plain20", "resnet20", "plain56", "resnet56"]``).
        schedules: schedule names to compare on ``config.arch`` (e.g. ``["step", "constant"]``).
        budgets: ``--time-budget`` minutes to compare (e.g. ``[2.5, 5, 10]``), each with every seed of ``seeds``:
            the accuracy-against-time frontier of a recipe such as ``--preset fast``.
        out: the comparison directory.
        plots: draw the PNG figures (needs matplotlib).

    Returns:
        The summary: one row per run (also written to ``out/summary.json`` and ``out/report.md``).
    """
    from .train import train

    variants = _variants(config, archs or [], schedules or [], budgets or [], seeds or [])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, cfg in variants.items():
        run = out / name
        saved = rundir.read_config(run) if rundir.has_checkpoint(run) or rundir.is_finished(run) else None
        differences = recipe_differences(saved, dataclasses.replace(cfg, out=str(run))) if saved else []
        if differences:
            raise ConfigError(f"{run} holds a run of another recipe ({'; '.join(differences[:3])}): delete it or "
                              f"compare into another --out")
        if rundir.is_finished(run):
            print(f"compare: {name}: finished run found in {run}, reused", flush=True)
        elif rundir.has_checkpoint(run):
            print(f"compare: {name}: resuming the interrupted run in {run}", flush=True)
            train(resume=str(run))
        else:
            print(f"compare: {name}: training into {run}", flush=True)
            train(dataclasses.replace(cfg, out=str(run)))
    rows = [_summary_row(name, cfg, out / name) for name, cfg in variants.items()]
    kind = "budgets" if budgets else "schedules" if schedules else "archs"
    summary = {"kind": kind, "runs": rows,
               "recipe": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("arch", "out")}}
    if budgets:
        summary["frontier"] = frontier(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    figures = []
    if plots:
        from .plots import plot_depth, plot_frontier, plot_runs

        if budgets:
            figures.append(plot_frontier(summary["frontier"], rows, out / "frontier.png"))
        elif schedules:
            figures.append(plot_runs([out / n for n in variants], out / "loss.png", metric="loss",
                                     labels=list(variants)))
        else:
            figures.append(plot_runs([out / n for n in variants], out / "curves.png", metric="error",
                                     labels=list(variants), split_plain=True))
            figures.append(plot_depth(rows, out / "depth.png"))
    (out / "report.md").write_text(_report(summary, [f.name for f in figures]))
    return summary


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _report(summary: dict[str, Any], figures: list[str]) -> str:
    recipe = summary["recipe"]
    lines = ["# reslab comparison", "",
             f"Recipe: data `{recipe['data']}`, train samples {recipe['train_samples'] or 'all'}, "
             f"augment `{recipe['augment']}`, batch {recipe['batch_size']}, lr {recipe['lr']}, "
             f"schedule `{recipe['schedule']}`, epochs {recipe['epochs']}, steps {recipe['steps']}, "
             f"seed {recipe['seed']}.", "",
             "| run | depth | params | MACs | final test err % | best test err % | final train err % | "
             "final train loss | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["runs"]:
        loss = "-" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}"
        lines.append(f"| {r['name']} | {r['depth']} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | "
                     f"{_pct(r['final_test_error'])} | {_pct(r['best_test_error'])} | "
                     f"{_pct(r['final_train_error'])} | {loss} | {r['wall_seconds']} |")
    lines += ["", "Best test error is the minimum over epochs and is shown for reference only: choosing an epoch "
              "on the test set is model selection on the test set. Training error is measured on the augmented "
              "training batches during each epoch, as in He et al. Fig. 6.", ""]
    if summary["kind"] == "budgets":
        lines += _frontier_report(summary["frontier"])
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _frontier_report(table: list[dict[str, Any]]) -> list[str]:
    marks = sorted({m for t in table for m in t["marks"]}, key=float)
    head = "| budget (min) | seeds | test acc % mean ± std | min | max | s to result |"
    lines = ["## Accuracy against time budget", "", head + "".join(f" s to {float(m):.0%} |" for m in marks),
             "| ---: " * (6 + len(marks)) + "|"]
    for t in table:
        cells = [f"{t['time_budget']:g}", str(t["seeds"]), f"{100 * t['mean']:.2f} ± {100 * t['std']:.2f}",
                 _pct(t["min"]), _pct(t["max"]), f"{t['mean_seconds_to_result']:.0f}"]
        for m in marks:
            r = t["marks"].get(m) or {}
            cells.append(f"{r['median_seconds']:.0f} ({r['reached']}/{t['seeds']})" if r.get("median_seconds")
                         else f"- (0/{t['seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Seconds count from process start to the final (test-time augmented) accuracy; a mark's time is "
              "the median over the seeds that reached it, scored on weight snapshots after training.", ""]
    return lines
