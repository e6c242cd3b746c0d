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

from ..config.schema import NOT_RECIPE, TrainConfig, budget_rule_fields, rule_chooses
from ..core import rundir
from ..core.errors import ConfigError
from ..core.log import say
from ..models import count_macs, count_params, create_model, model_info
from .report import compare_report, percent


def recipe_differences(saved: dict[str, Any], requested: TrainConfig) -> list[str]:
    """The options (as flags) on which a saved run's config differs from ``requested``, outside ``config.NOT_RECIPE``
    (execution and the run directory).

    Options requested as ``None`` (chosen by reslab, e.g. the augmentation) match what the saved run chose."""
    want = requested.to_dict()
    # What a budget rule chose at the start of the saved run (from the epochs the budget bought there) is its own.
    chosen = rule_chooses(requested.budget_rule)
    chosen = chosen - set(requested.budget_keep) if saved.get("budget_rule") == requested.budget_rule else set()
    return [f"--{k.replace('_', '-')} {saved.get(k)!r} (asked {v!r})" for k, v in want.items()
            if k not in NOT_RECIPE | chosen and v not in (None, "auto") and saved.get(k) != v]


# What ``reslab compare --preset NAME`` compares when no --archs/--schedules/--budgets are given.
COMPARISONS: dict[str, dict[str, list]] = {
    "degradation": {"archs": ["plain20", "plain56", "resnet20", "resnet56"]},
    "decay": {"schedules": ["step", "cosine", "constant"]},
}


def _variants(base: TrainConfig, archs: list[str], schedules: list[str], budgets: list[float],
              seeds: list[int], preset: str | None = None,
              given: frozenset[str] = frozenset()) -> dict[str, tuple[str, TrainConfig]]:
    """Run name -> (the group it belongs to, its config). With several seeds each group has one run per seed.
    A budget run is handed to ``preset``'s budget rule (``budget_rule_fields``), which keeps the options in
    ``given``."""
    if sum(map(bool, (archs, schedules, budgets))) > 1:
        raise ConfigError("give one of --archs, --schedules or --budgets")
    if budgets:
        return {f"{b:g}min-seed{s}": (f"{b:g}", dataclasses.replace(base, time_budget=b, seed=s,
                                                                    **budget_rule_fields(preset, b, given)))
                for b in budgets for s in (seeds or [base.seed])}
    if schedules:
        groups = {s: dataclasses.replace(base, schedule=s) for s in schedules}
    elif archs:
        for a in archs:
            model_info(a)  # unknown names fail before anything trains
        groups = {a: dataclasses.replace(base, arch=a) for a in archs}
    else:
        raise ConfigError("give --archs (e.g. plain20,resnet20,plain56,resnet56), --schedules (e.g. step,constant) "
                          "or --budgets (minutes, e.g. 2.5,5,10), or a --preset with a comparison "
                          f"({', '.join(COMPARISONS)})")
    if not seeds:
        return {g: (g, cfg) for g, cfg in groups.items()}
    return {f"{g}-seed{s}": (g, dataclasses.replace(cfg, seed=s)) for g, cfg in groups.items() for s in seeds}


def _summary_row(name: str, group: str, cfg: TrainConfig, run: Path) -> dict[str, Any]:
    rows = rundir.read_metrics(run)
    saved = rundir.read_config(run) or {}
    # What a budget rule chose for the run, from its saved config.
    cfg = dataclasses.replace(cfg, **{k: saved[k] for k in ("arch", "tta", "tta_fraction", "optimizer") if k in saved})
    info = model_info(cfg.arch)
    classes = rundir.read_model_meta(run).get("classes") or range(10)
    model = create_model(cfg.arch, num_classes=len(classes), **cfg.model_kwargs)
    test = [r["test_acc"] for r in rows if "test_acc" in r]
    last = rows[-1] if rows else {}
    return {"name": name, "group": group, "arch": cfg.arch, "schedule": cfg.schedule, "residual": info.residual,
            "depth": info.depth, "params": count_params(model),
            "macs": count_macs(model, (rundir.read_config(run) or {}).get("image_size") or cfg.input_size),
            "epochs": last.get("epoch"), "steps": last.get("step"),
            "final_test_error": 1 - test[-1] if test else None, "best_test_error": 1 - max(test) if test else None,
            "final_train_error": 1 - last["train_acc"] if last else None,
            "final_train_loss": last.get("train_loss"), "wall_seconds": round(sum(r["seconds"] for r in rows), 1),
            "time_budget": cfg.time_budget, "seed": cfg.seed, "optimizer": cfg.optimizer,
            "tta": cfg.tta if cfg.tta_fraction == 1 else f"{cfg.tta}@{cfg.tta_fraction:g}",
            "final_test_acc": test[-1] if test else None, "seconds_to_result": last.get("wall_seconds"),
            "accuracy_marks": rundir.read_marks(run), "run": str(run)}


def _stats(values: list[float]) -> dict[str, float]:
    import statistics

    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


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
        models = {r["arch"] + (" + Muon" if r.get("optimizer") == "muon" else "") for r in runs}
        table.append({"time_budget": budget, "arch": "/".join(sorted(models)),
                      "tta": "/".join(sorted({r["tta"] for r in runs})), "seeds": len(accs), **_stats(accs),
                      "mean_seconds_to_result": statistics.fmean(r["seconds_to_result"] or 0 for r in runs),
                      "marks": marks})
    return table


def group_stats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group (a model or schedule, over its seeds): final training/test error and training loss statistics."""
    table = []
    for group in dict.fromkeys(r["group"] for r in rows):
        runs = [r for r in rows if r["group"] == group and r["final_train_error"] is not None]
        if not runs:
            continue
        first = runs[0]
        entry = {k: first[k] for k in ("group", "arch", "schedule", "residual", "depth", "params", "macs")}
        entry.update(seeds=len(runs), wall_seconds=sum(r["wall_seconds"] for r in runs) / len(runs),
                     train_error=_stats([r["final_train_error"] for r in runs]),
                     train_loss=_stats([r["final_train_loss"] for r in runs]))
        tests = [r["final_test_error"] for r in runs if r["final_test_error"] is not None]
        entry["test_error"] = _stats(tests) if tests else None
        table.append(entry)
    return table


def depth_lessons(groups: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """He et al. Fig. 6, checked: for plain nets and for residual nets, does the deepest end with more (plain) or
    less (residual) final training and test error than the shallowest? On the means, and seed by seed."""
    lessons = []
    for residual in (False, True):
        family = sorted((g for g in groups if g["residual"] == residual), key=lambda g: g["depth"])
        if len(family) < 2 or family[0]["depth"] == family[-1]["depth"]:
            continue
        shallow, deep = family[0], family[-1]
        sign = -1 if residual else 1  # residual: deeper should be better; plain: worse
        d_train = deep["train_error"]["mean"] - shallow["train_error"]["mean"]
        d_test = (deep["test_error"]["mean"] - shallow["test_error"]["mean"]
                  if deep["test_error"] and shallow["test_error"] else None)
        by_seed = {}
        for r in rows:
            if r["group"] in (shallow["group"], deep["group"]) and r["final_train_error"] is not None:
                by_seed.setdefault(r["seed"], {})[r["group"]] = r["final_train_error"]
        paired = [v for v in by_seed.values() if len(v) == 2]
        held = sum(sign * (v[deep["group"]] - v[shallow["group"]]) > 0 for v in paired)
        shown, meaning = _fig6_verdict(residual, sign * d_train, None if d_test is None else sign * d_test)
        word = "less" if d_train < 0 else "more"
        test = "" if d_test is None else f" (test error {100 * d_test:+.2f} points)"
        text = (f"{deep['group']} ends with {abs(100 * d_train):.2f} points {word} training error than "
                f"{shallow['group']}{test}, in {held} of {len(paired)} seeds: {meaning}.")
        lessons.append({"family": "residual" if residual else "plain", "shallow": shallow["group"],
                        "deep": deep["group"], "train_delta": d_train, "test_delta": d_test, "shown": shown,
                        "seeds_shown": held, "seeds": len(paired), "text": text})
    return lessons


# A difference in final error smaller than this is not called a lesson: one seed of a short run moves by about
# that much (the tiny-folder runs of the tests differ by up to ~0.5 points between seeds).
MARGIN = 0.005


def _fig6_verdict(residual: bool, train_gap: float, test_gap: float | None) -> tuple[bool, str]:
    """Whether the depth lesson is shown, and why (gaps signed so that positive is the way Fig. 6 goes)."""
    figure = "He et al. Fig. 6 (middle) has the deeper ResNet ahead" if residual else \
        "He et al. Fig. 6 (left) has the deeper plain net behind"
    if train_gap <= 0:
        return False, f"NOT SHOWN by this run: {figure}"
    if test_gap is not None and test_gap <= 0:
        return False, (f"NOT SHOWN by this run: the training error is ordered as in Fig. 6, but the test error goes "
                       f"the other way ({figure} on both)")
    if min(train_gap, train_gap if test_gap is None else test_gap) < MARGIN:
        return False, (f"NOT SHOWN by this run: ordered as in Fig. 6, but by less than the {100 * MARGIN:.1f}-point "
                       f"margin this report asks of a difference (the noise of one short run); train longer or on "
                       f"more images, or add seeds")
    if residual:
        return True, "deeper residual nets train better, as in He et al. Fig. 6 (middle)"
    return True, "the degradation problem of He et al. Fig. 6 (left): the deeper plain net trains worse"


def decay_lessons(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed's lesson, checked: does each decaying schedule end with a lower training loss than a constant rate?"""
    constant = next((g for g in groups if g["schedule"] == "constant"), None)
    if constant is None:
        return []
    lessons = []
    for g in groups:
        if g is constant:
            continue
        ours, theirs = g["train_loss"]["mean"], constant["train_loss"]["mean"]
        shown = ours < theirs
        verdict = (f" ({100 * (1 - ours / theirs):.0f} % lower): decaying the rate lets the loss fall further, the "
                   "seed's lesson." if shown else ": NOT SHOWN by this run (the decay did not help here).")
        text = (f"with the `{g['schedule']}` schedule the training loss ends at {ours:.3f} against {theirs:.3f} at a "
                f"constant learning rate{verdict}")
        lessons.append({"schedule": g["schedule"], "train_loss": ours, "constant_train_loss": theirs, "shown": shown,
                        "text": text})
    return lessons


def compare(config: TrainConfig, *, archs: list[str] | None = None, schedules: list[str] | None = None,
            budgets: list[float] | None = None, seeds: list[int] | None = None, out: str | Path = "runs/compare",
            plots: bool = True, preset: str | None = None, given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Train every variant with the same recipe and seed into ``out/<name>/``, then write the report.

    Args:
        config: the shared recipe (its ``arch`` is the model for a schedule comparison).
        archs: model names to compare (e.g. ``["plain20", "resnet20", "plain56", "resnet56"]``).
        schedules: schedule names to compare on ``config.arch`` (e.g. ``["step", "constant"]``).
        budgets: ``--time-budget`` minutes to compare (e.g. ``[2.5, 5, 10]``), each with every seed of ``seeds``:
            the accuracy-against-time frontier of a recipe such as ``--preset fast``.
        out: the comparison directory.
        plots: draw the PNG figures (needs matplotlib).
        preset: the preset ``config`` came from: each budget run is handed to that preset's budget rule
            (``presets.BUDGET_RULES``, e.g. the fast net's width), except the options named in ``given``.

    Returns:
        The summary: one row per run (also written to ``out/summary.json`` and ``out/report.md``).
    """
    if plots:  # checked before hours of training, not after them
        from .plots import pyplot
        pyplot()
    variants = _variants(config, archs or [], schedules or [], budgets or [], seeds or [], preset, given)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _train_all(variants, out, bool(budgets))
    rows = [_summary_row(name, group, cfg, out / name) for name, (group, cfg) in variants.items()]
    kind = "budgets" if budgets else "schedules" if schedules else "archs"
    summary = {"kind": kind, "runs": rows, "groups": group_stats(rows),
               "recipe": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("arch", "out", "seed")},
               "seeds": sorted({r["seed"] for r in rows})}
    if budgets:
        summary["frontier"] = frontier(rows)
    else:
        summary["lessons"] = depth_lessons(summary["groups"], rows) if kind == "archs" else \
            decay_lessons(summary["groups"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    figures = _figures(summary, variants, out) if plots else []
    (out / "report.md").write_text(_report(summary, [f.name for f in figures]))
    compare_report(out)  # report.html beside report.md: the same, in one page with the figures inside
    return summary


def _train_all(variants: dict[str, tuple[str, TrainConfig]], out: Path, budgets: bool) -> None:
    """Train (or resume, or reuse) every variant into ``out/<name>``; each seed of a budget trains what the budget
    rule chose for its first seed, so a frontier row is one recipe."""
    from ..training.train import train

    decided: dict[str, dict[str, Any]] = {}  # budget -> what its rule chose in the first seed's run
    for name, (group, cfg) in variants.items():
        run = out / name
        if group in decided:  # every seed of a budget trains what the first chose: a frontier row is one recipe
            cfg = dataclasses.replace(cfg, **decided[group], budget_keep=sorted({*cfg.budget_keep, *decided[group]}))
            variants[name] = (group, cfg)
        saved = rundir.read_config(run) if rundir.has_checkpoint(run) or rundir.is_finished(run) else None
        differences = recipe_differences(saved, dataclasses.replace(cfg, out=str(run))) if saved else []
        if differences:
            raise ConfigError(f"{run} holds a run of another recipe ({'; '.join(differences[:3])}): delete it or "
                              f"compare into another --out")
        if rundir.is_finished(run):
            say(f"compare: {name}: finished run found in {run}, reused")
        elif rundir.has_checkpoint(run):
            say(f"compare: {name}: resuming the interrupted run in {run}")
            train(resume=str(run))
        else:
            say(f"compare: {name}: training into {run}")
            train(dataclasses.replace(cfg, out=str(run)))
        if budgets and group not in decided:
            saved = rundir.read_config(run) or {}
            decided[group] = {k: saved[k] for k in rule_chooses(cfg.budget_rule) if k in saved}


def _figures(summary: dict[str, Any], variants: dict[str, tuple[str, TrainConfig]], out: Path) -> list[Path]:
    """The comparison's PNG figures: the frontier, the loss curves of the schedules, or the depth lesson's curves."""
    from .plots import plot_depth, plot_frontier, plot_groups

    groups: dict[str, list[Path]] = {}
    for name, (group, _) in variants.items():
        groups.setdefault(group, []).append(out / name)
    if summary["kind"] == "budgets":
        return [plot_frontier(summary["frontier"], summary["runs"], out / "frontier.png")]
    if summary["kind"] == "schedules":
        return [plot_groups(groups, out / "loss.png", metric="loss")]
    return [plot_groups(groups, out / "curves.png", metric="error", split_plain=True),
            plot_depth(summary["groups"], out / "depth.png")]


def _report(summary: dict[str, Any], figures: list[str]) -> str:
    recipe = summary["recipe"]
    lines = ["# reslab comparison", "",
             f"Recipe: data `{recipe['data']}`, train samples {recipe['train_samples'] or 'all'}, "
             f"augment `{recipe['augment']}`, batch {recipe['batch_size']}, lr {recipe['lr']}, "
             f"schedule `{recipe['schedule']}`, warm-up {recipe['warmup']}, epochs {recipe['epochs']}, "
             f"steps {recipe['steps']}, zero-initialised residual branches {recipe['zero_init_residual']}, "
             f"seeds {', '.join(map(str, summary['seeds']))}.", ""]
    if summary.get("lessons"):
        lines += ["## What this comparison shows", ""] + [f"- {x['text']}" for x in summary["lessons"]] + [""]
    if summary["kind"] != "budgets" and len(summary["seeds"]) > 1:
        lines += ["| model / schedule | seeds | final train err % (mean ± std) | final test err % | "
                  "final train loss | wall s (mean) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for g in summary["groups"]:
            test = g["test_error"]
            lines.append(f"| {g['group']} | {g['seeds']} | {_pm(g['train_error'])} | "
                         f"{_pm(test) if test else '-'} | {g['train_loss']['mean']:.4f} | {g['wall_seconds']:.0f} |")
        lines += ["", "Every run:", ""]
    lines += ["| run | depth | params | MACs | final test err % | best test err % | final train err % | "
              "final train loss | wall s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["runs"]:
        loss = "-" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}"
        lines.append(f"| {r['name']} | {r['depth']} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | "
                     f"{percent(r['final_test_error'], '')} | {percent(r['best_test_error'], '')} | "
                     f"{percent(r['final_train_error'], '')} | {loss} | {r['wall_seconds']} |")
    lines += ["", "Best test error is the minimum over epochs and is shown for reference only: choosing an epoch "
              "on the test set is model selection on the test set. Training error is measured on the augmented "
              "training batches during each epoch, as in He et al. Fig. 6.", ""]
    if recipe.get("zero_init_residual"):
        lines += ["Zero-initialised residual branches (Goyal et al. 2017) are a ResNet-only trick: each residual "
                  "block starts as the identity; plain nets have no branch to zero and start as usual.", ""]
    if summary["kind"] == "budgets":
        lines += _frontier_report(summary["frontier"])
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _pm(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def _frontier_report(table: list[dict[str, Any]]) -> list[str]:
    marks = sorted({m for t in table for m in t["marks"]}, key=float)
    head = "| budget (min) | model | TTA | seeds | test acc % mean ± std | min | max | s to result |"
    lines = ["## Accuracy against time budget", "", head + "".join(f" s to {float(m):.0%} |" for m in marks),
             "| ---: | --- | --- " + "| ---: " * (5 + len(marks)) + "|"]
    for t in table:
        cells = [f"{t['time_budget']:g}", t["arch"], t["tta"], str(t["seeds"]),
                 f"{100 * t['mean']:.2f} ± {100 * t['std']:.2f}",
                 percent(t["min"], ""), percent(t["max"], ""), f"{t['mean_seconds_to_result']:.0f}"]
        for m in marks:
            r = t["marks"].get(m) or {}
            cells.append(f"{r['median_seconds']:.0f} ({r['reached']}/{t['seeds']})" if r.get("median_seconds")
                         else f"- (0/{t['seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Seconds count from process start to the final (test-time augmented) accuracy; a mark's time is "
              "the median over the seeds that reached it, scored on weight snapshots after training.", ""]
    return lines
