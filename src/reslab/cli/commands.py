"""The ``reslab`` command: subcommand name -> a thin typed function over the library.

Flags, ``--help`` and YAML configs come from type hints and docstrings through jsonargparse. For ``train`` the
precedence is: defaults < ``--preset`` < ``--config FILE.yaml`` < flags (in the order given).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import time
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Optional

from docstring_parser import parse as parse_doc
from jsonargparse import ArgumentParser

from ..config.schema import PRESETS, TrainConfig, budget_rule_fields
from ..core.errors import ConfigError, DataError, Interrupted, UserError
from ..core.log import say
from .options import (
    ClosedUnitInterval,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    Port,
    PositiveFloat,
    PositiveInt,
    command_parser,
    first_pass,
    given_options,
    takes_config,
    usage_message,
    wraps,
)


def _print_json(obj: Any) -> None:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    print(json.dumps(obj, default=str))


def _print_table(rows: list[Any], as_json: bool, header: str, line: Callable[[Any], str]) -> None:
    """One JSON object per row and line (``--json``), else the header and one formatted line per row."""
    if as_json:
        for row in rows:
            _print_json(row)
        return
    print(header)
    for row in rows:
        print(line(row))


def models_cmd(json: bool = False) -> None:
    """List the registered models with their parameters.

    Args:
        json: print one JSON object per model instead of a table.
    """
    from ..models import count_params, create_model, list_models, model_info

    rows = []
    for name in list_models():
        info = model_info(name)
        rows.append({"name": name, "family": info.family, "depth": info.depth, "residual": info.residual,
                     "input_size": info.input_size, "params": count_params(create_model(name))})
    _print_table(rows, json, f"{'model':<12}{'family':<10}{'depth':>6}{'residual':>10}{'input':>7}"
                             f"{'params (10 classes)':>22}",
                 lambda r: f"{r['name']:<12}{r['family']:<10}{r['depth']:>6}{r['residual']!s:>10}"
                           f"{r['input_size']:>7}{r['params']:>22,}")


def summary_cmd(arch: str, image_size: Optional[PositiveInt] = None, num_classes: PositiveInt = 10,
                stem: Optional[str] = None, shortcut: Optional[str] = None, json: bool = False) -> None:
    """Parameters, multiply-accumulates per forward pass and output shape of a model on a random input.

    Args:
        arch: model name (see `reslab models`).
        image_size: input size in pixels (default: the model's natural size).
        num_classes: classifier outputs.
        stem: stem variant of the ImageNet-style nets: imagenet, cifar or seed.
        shortcut: shortcut option A, B or C.
        json: print a JSON object.
    """
    from ..models import create_model, model_info, summarize

    info = model_info(arch)
    kwargs = {k: v for k, v in (("stem", stem), ("shortcut", shortcut)) if v is not None}
    size = image_size or (64 if stem == "seed" else 32 if stem == "cifar" else info.input_size)
    s = {"arch": arch, **kwargs, "num_classes": num_classes, **summarize(create_model(arch, num_classes, **kwargs),
                                                                          size)}
    if json:
        _print_json(s)
        return
    print(f"{arch} {kwargs or ''}".rstrip())
    print(f"  parameters      {s['params']:,} ({s['params'] / 1e6:.2f} M)")
    print(f"  MACs / forward  {s['macs']:,} ({s['macs'] / 1e9:.3f} G) at {size}x{size}")
    print(f"  input  shape    {tuple(s['input_shape'])}")
    print(f"  output shape    {tuple(s['output_shape'])}")


def train_cmd(config: TrainConfig, preset: Optional[str] = None, resume: Optional[str] = None,
              data_changed: Optional[Literal["ok"]] = None, force: bool = False,
              given: frozenset[str] = frozenset()) -> None:
    """Train a model; writes config.yaml, metrics.jsonl, last.pt, model.safetensors.

    Args:
        config: the recipe (every option of the sections below).
        preset: start from a preset (seed, paper, fast, ...); --config and flags override it.
        resume: continue the run in this directory from its last.pt; flags given with it may change its length
            (--epochs, --steps), evaluation, logging and device, nothing else. auto: continue --out if it has a
            checkpoint, else start it (what a torchrun restart does).
        data_changed: with --resume: continue on a data folder whose images changed since the run started.
        force: write over a config.yaml or metrics.jsonl in --out that no reslab run made.
        given: the options given on the command line (and "config" for a --config file).
    """
    if data_changed and not resume:
        raise ConfigError("--data-changed goes with --resume")
    resuming = resume not in (None, "auto")  # auto may start the run: it needs the whole config
    if resuming and "config" in given:
        raise ConfigError("--resume continues a run with its saved config: no --config with it")
    if not resuming:
        config = dataclasses.replace(config, **budget_rule_fields(preset, config.time_budget, given))
    given = given - {"preset", "config", "resume", "data_changed", "force"}
    from ..core.distributed import shutdown
    from ..core.execution import process_age
    from ..training.train import continue_or_start, elastic_restart, train

    started = time.perf_counter() - process_age()  # --time-budget counts the whole command, imports included
    ok = False
    try:
        if resume == "auto" or (resume is None and elastic_restart()):
            continue_or_start(config, given, started=started, force=force)
        elif resume:
            train(resume=resume, preset=preset, started=started, data_changed=data_changed == "ok",
                  **{k: getattr(config, k) for k in given})
        else:
            train(config, started=started, force=force)
        ok = True
    finally:
        shutdown(wait_for_peers=ok)


@wraps("inference.evaluate:evaluate", "insight.gallery:gallery")
def eval_cmd(model: str, data: str, split: str = ..., arch: Optional[str] = ..., device: str = ...,
             precision: str = ..., batch_size: PositiveInt = ..., samples: Optional[PositiveInt] = ...,
             data_dir: Optional[str] = ..., tta: Optional[str] = ..., tta_fraction: Optional[Fraction] = ...,
             labels: Optional[str] = ..., plot: Optional[str] = None, gallery: Optional[str] = None,
             gallery_size: PositiveInt = 24, json: bool = False) -> None:
    """Evaluate a saved model on an image folder (or cifar10, digits): accuracy, per class, confusion matrix.

    Args:
        model: run directory, model.safetensors, last.pt, or a bare state_dict .pth (with --arch).
        data: cifar10, digits or a folder holding <split>/<class>/<images>.
        split: test, val or train.
        arch: architecture of a bare state_dict.
        device: auto, cpu, cuda or cuda:N.
        precision: auto, fp32, bf16 or fp16.
        batch_size: images per forward pass.
        samples: evaluate a seeded, class-balanced subset of this many images.
        data_dir: where cifar10 is stored.
        tta: test-time augmentation none, flip or flip_shift (default: as the model was trained).
        tta_fraction: apply the TTA to this least-confident fraction of the images only (default: as trained).
        labels: a CSV or TSV of the images' classes (default: the run's own --labels, when --data is the folder it
            trained on).
        plot: also draw the confusion matrix into this PNG file.
        gallery: also draw the mistakes into this folder: the most confident mistakes, the most-confused class
            pairs with examples, per-class precision/recall/F1 (PNGs and gallery.json).
        gallery_size: mistakes shown in the gallery's grid.
        json: print one JSON object on stdout (progress and warnings go to stderr).
    """
    from ..inference.evaluate import evaluate

    if plot:
        from ..core.rundir import check_output

        check_output(plot, (".png",), option="--plot")
    options = dict(split=split, arch=arch, device=device, precision=precision, batch_size=batch_size,
                   samples=samples, data_dir=data_dir, tta=tta, tta_fraction=tta_fraction, labels=labels)
    if gallery:
        from ..insight.gallery import gallery as draw_gallery

        g = draw_gallery(model, data, gallery, size=gallery_size, **options)
        r = g.result
        say(f"gallery: {len(g.mistakes)} mistakes, {len(g.pairs)} confused pairs -> {', '.join(g.files)}")
    else:
        r = evaluate(model, data, **options)
    if plot:
        from ..insight.plots import plot_confusion
        plot_confusion(r.confusion, r.classes, plot)
    if json:
        _print_json(r)
        return
    print(f"accuracy {r.accuracy:.4f} ({round(r.accuracy * r.n)}/{r.n})"
          + (f"  top-5 {r.top5:.4f}" if r.top5 is not None else "") + f"  loss {r.loss:.4f}")
    width = max(len(c) for c in r.classes)
    for name, acc in r.per_class.items():
        print(f"  {name:<{width}}  {acc:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    for name, row in zip(r.classes, r.confusion):
        print(f"  {name:<{width}} " + " ".join(f"{v:5d}" for v in row))


@wraps("inference.predict:predict_rows")
def predict_cmd(model: str, inputs: list[str], topk: PositiveInt = ..., arch: Optional[str] = ...,
                device: str = ..., precision: str = ..., batch_size: PositiveInt = ...,
                workers: Optional[NonNegativeInt] = ...,
                output: Optional[str] = None, resume: bool = False, runtime: str = ...,
                cam: Optional[str] = ..., json: bool = False) -> None:
    """Top-k classes and probabilities for image files or folders (of any size: batched, decoded in parallel).

    Args:
        model: run directory, model.safetensors, last.pt or a bare state_dict (with --arch).
        inputs: image files or folders.
        topk: classes to show per image.
        arch: architecture of a bare state_dict.
        device: auto, cpu, cuda or cuda:N.
        precision: fp32, bf16 or auto (bf16 where the CPU or GPU has it).
        batch_size: images per forward pass.
        workers: decoding processes (default: the usable cores, none for a single batch).
        output: write one row per image to this .csv or .jsonl file as they are made (with a progress line).
        resume: continue --output: skip the files it already holds.
        runtime: eager (PyTorch), onnx or onnx-int8 (ONNX Runtime on the run's model.onnx / model.int8.onnx,
            made by reslab export).
        cam: also write a Grad-CAM overlay of each image's top class into this folder.
        json: print one JSON object per image and line.
    """
    from ..inference.predict import RowWriter, check_cam_folder, image_files, predict_rows
    from ..inference.rowfile import resolved
    from ..models.checkpoint import model_digest

    if resume and not output:
        raise ConfigError("--resume continues an --output file: give --output FILE")
    check_cam_folder(cam)
    files = image_files(inputs)
    writer = RowWriter(output, topk, model_digest(model), resume) if output else None
    if writer is not None and writer.done:
        files = [f for f in files if resolved(f) not in writer.done]
        say(f"reslab: {output} holds {len(writer.done)} rows: predicting the other {len(files)} files")
    t0, good, bad = time.perf_counter(), 0, 0
    try:
        for r in predict_rows(model, files, topk=topk, arch=arch, device=device, precision=precision,
                              batch_size=batch_size, workers=workers, cam=cam, progress=writer is not None,
                              runtime=runtime):
            if "error" in r:
                bad += 1
                print(f"reslab: cannot read {r['path']}: {r['error']}", file=sys.stderr)
            else:
                good += 1
            if writer is not None:
                writer.write([r])
            elif "error" not in r:
                _print_prediction(r, json)
    finally:
        if writer is not None:
            writer.close()
    if files and not good and writer is None:
        raise DataError(f"none of the {len(files)} image files could be read")
    if writer is not None:
        seconds = time.perf_counter() - t0
        say(f"reslab: {good} images predicted in {seconds:.1f} s ({good / max(seconds, 1e-9):.1f} img/s) into "
            f"{output}" + (f"; {bad} unreadable, skipped (their row names the error)" if bad else ""))


def _print_prediction(r: dict, json: bool) -> None:
    if json:
        _print_json(r)
    else:
        print(r["path"] + "  " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
              + (f"  (cam: {r['cam']})" if "cam" in r else ""))


@wraps("training.bench:bench", "ship.infer_bench:bench_inference")
def bench_cmd(arch: Optional[str] = ..., preset: str = ..., data: Optional[str] = ...,
              batch_size: Optional[PositiveInt] = None,
              steps: PositiveInt = ..., warmup: NonNegativeInt = ..., baseline: bool = ..., device: str = ...,
              precision: str = ..., channels_last: Optional[bool] = ..., compile: bool = ...,
              threads: Optional[PositiveInt] = ..., tune: bool = False, inference: Optional[str] = None,
              runtimes: Optional[str] = None, seconds: PositiveFloat = ..., json: bool = False) -> None:
    """Training images/s of the whole step, achieved GFLOP/s against a measured GEMM roof, and the seed's pipeline;
    with --inference RUN, a trained model's latency and throughput in each inference runtime.

    Args:
        arch: model name (default: the preset's model).
        preset: training preset whose augmentation and model settings are used: seed or paper.
        data: image folder to read real images from (required with --baseline); random images otherwise.
        batch_size: images per step (default 128; 64 with --inference).
        steps: timed steps, after the warm-up.
        warmup: untimed steps first.
        baseline: also time the seed's pipeline (PIL per image in a DataLoader, fp32, NCHW, eager) on --data.
        device: auto, cpu, cuda or cuda:N.
        precision: auto, fp32, bf16 or fp16.
        channels_last: channels-last memory format (default: by device and precision).
        compile: torch.compile the model.
        threads: CPU threads (default, with --precision and --channels-last: what a training run's start-up probe
            picks on this CPU).
        tune: instead, time the training step under every execution choice on this CPU (threads, precision,
            layout) as a training run's start-up probe does, and print the table with the probe's pick.
        inference: instead, a run directory or model file: batch-1 latency (median, p99) and batch throughput (at
            --batch-size, default 64 here) of eager fp32 and bf16, ONNX Runtime fp32 and int8 (and torch.compile with
            --compile), side by side.
        runtimes: with --inference, a comma-separated selection (eager-fp32,eager-bf16,onnx-fp32,onnx-int8).
        seconds: with --inference, seconds per measurement.
        json: print one JSON object on stdout.
    """
    from ..training.bench import bench

    if inference:
        _bench_inference(inference, runtimes, threads, batch_size or 64, seconds, compile, data, json)
        return
    batch_size = batch_size or 128

    if tune:
        _bench_tune(arch, preset, batch_size, json)
        return
    _bench_training(bench(arch=arch, preset=preset, data=data, batch_size=batch_size, steps=steps, warmup=warmup,
                          baseline=baseline, device=device, precision=precision, channels_last=channels_last,
                          compile=compile, threads=threads), json)


def _bench_training(r, json: bool) -> None:
    """Print a training benchmark: images/s of the whole step and of evaluation, GFLOP/s against the roof."""
    if json:
        _print_json(r)
        return
    print(f"{r.arch} ({r.preset} preset, {r.input_size} px, {r.num_classes} classes) on {r.device}, {r.threads} "
          f"threads, {r.precision}, channels_last={r.channels_last}, compile={r.compile}, batch {r.batch_size}"
          + (" (what a training run's start-up probe picks here)" if r.execution == "probe" else ""))
    print(f"  train        {r.images_per_sec:10.1f} img/s   (data -> augmentation -> forward -> backward -> "
          f"update, {r.steps} steps)")
    print(f"  eval         {r.eval_images_per_sec:10.1f} img/s")
    print(f"  compute      {r.gflops_per_sec:10.1f} GFLOP/s = {r.roof_fraction:.0%} of the measured "
          f"{r.precision} GEMM roof ({r.roof_gflops_per_sec:.0f} GFLOP/s); {r.macs / 1e6:.1f} M MACs/image")
    if r.speedup is not None:
        print(f"  seed pipeline {r.baseline_images_per_sec:9.1f} img/s   -> speedup {r.speedup:.2f}x")


def _bench_tune(arch, preset, batch_size, json) -> None:
    """Print the start-up probe's table: the training step under every execution choice, and its pick."""
    from ..training.bench import tune_table

    _print_table(tune_table(arch, preset, batch_size), json,
                 f"{'threads':>7} {'precision':>9} {'layout':>13} {'img/s':>9} {'GFLOP/s':>8} {'roof':>7} "
                 f"{'of roof':>7}",
                 lambda row: f"{row.threads:>7} {row.precision:>9} "
                             f"{'channels-last' if row.channels_last else 'NCHW':>13} "
                             f"{row.images_per_sec:>9,.0f} {row.gflops_per_sec:>8.0f} "
                             f"{row.roof_gflops_per_sec:>7.0f} {row.roof_fraction:>7.0%}"
                             f"{'  <- the probe picks this' if row.chosen else ''}")


def _bench_inference(model, runtimes, threads, batch_size, seconds, compile, data, json) -> None:
    from ..ship.infer_bench import RUNTIMES, bench_inference

    rows = bench_inference(model, runtimes=tuple(runtimes.split(",")) if runtimes else RUNTIMES, threads=threads,
                           batch=batch_size, seconds=seconds, compile=compile, data=data)
    _print_table(rows, json, f"{'runtime':<14} {'threads':>7} {'batch 1 p50':>11} {'p99':>9} {'batch':>6} "
                             f"{'img/s':>9}",
                 lambda r: f"{r.runtime:<14} {r.threads:>7} {r.p50_ms:>8.2f} ms {r.p99_ms:>6.2f} ms {r.batch:>6} "
                           f"{r.images_per_sec:>9,.0f}{f'  ({r.note})' if r.note else ''}")


def compare_cmd(config: TrainConfig, archs: Optional[str] = None, schedules: Optional[str] = None,
                budgets: Optional[str] = None, seeds: Optional[str] = None, preset: Optional[str] = None,
                given: frozenset[str] = frozenset()) -> None:
    """Train several models (or schedules) with one recipe into OUT/<name>/, then write report.md, summary.json
    and figures. --preset degradation compares plain20, plain56, resnet20 and resnet56 (He et al. Fig. 6);
    --preset decay compares step, cosine and constant schedules.

    Args:
        config: the shared recipe; its --out is the comparison directory (default runs/compare).
        archs: models to compare, e.g. plain20,resnet20,plain56,resnet56.
        schedules: schedules to compare on --arch, e.g. step,constant.
        budgets: --time-budget minutes to compare, e.g. 2.5,5,10,20.
        seeds: repeat every model, schedule or budget with each of these seeds, e.g. 0,1,2 (the report and figures
            show the mean and spread).
        preset: the preset the recipe starts from (its comparison, when it names one, is the default).
        given: the options given on the command line.
    """
    from ..insight.compare import COMPARISONS, compare

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else []
    try:
        numbers = [float(b) for b in split(budgets)], [int(s) for s in split(seeds)]
    except ValueError:
        raise ConfigError(f"--budgets takes minutes and --seeds integers, comma-separated: {budgets!r}, "
                          f"{seeds!r}") from None
    chosen = dict(archs=split(archs), schedules=split(schedules), budgets=numbers[0])
    if not any(chosen.values()) and preset in COMPARISONS:  # the preset says what it compares
        chosen.update(COMPARISONS[preset])
    compare_out = config.out or "runs/compare"  # --out names the comparison directory
    summary = compare(config, **chosen, seeds=numbers[1], out=compare_out, preset=preset, given=given)
    if budgets:
        print(f"{'budget min':>10}{'seeds':>7}{'test acc % mean':>17}{'std':>7}{'s to result':>13}")
        for t in summary["frontier"]:
            print(f"{t['time_budget']:>10g}{t['seeds']:>7}{100 * t['mean']:>17.2f}{100 * t['std']:>7.2f}"
                  f"{t['mean_seconds_to_result']:>13.0f}")
        print(f"report: {compare_out}/report.md, {compare_out}/report.html")
        return
    print(f"{'run':<18}{'depth':>6}{'test err %':>12}{'train err %':>13}{'train loss':>12}{'wall s':>9}")
    for r in summary["runs"]:
        print(f"{r['name']:<18}{r['depth']:>6}{100 * (r['final_test_error'] or 0):>12.2f}"
              f"{100 * (r['final_train_error'] or 0):>13.2f}{r['final_train_loss'] or 0:>12.4f}"
              f"{r['wall_seconds']:>9.0f}")
    for lesson in summary.get("lessons", []):
        print(lesson["text"])
    print(f"report: {compare_out}/report.md, {compare_out}/report.html")


@wraps("insight.lrfind:lr_find", range_steps="steps")
def lr_find_cmd(config: TrainConfig, start_lr: PositiveFloat = ..., end_lr: PositiveFloat = ...,
                range_steps: PositiveInt = ..., json: bool = False) -> None:
    """The learning-rate range test: train a copy of the model with an exponentially growing lr on the real data
    and recipe, stop at divergence, and suggest an lr. --out DIR receives lr_find.png and lr_find.json.

    Args:
        config: the recipe whose learning rate is sought.
        start_lr: learning rate of the first step.
        end_lr: learning rate of the last step (the test usually diverges before).
        range_steps: optimizer steps of the test (a few hundred: a smooth curve).
        json: print one JSON object (the curve and the suggestion).
    """
    from ..insight.lrfind import lr_find

    r = lr_find(config, config.out or "runs/lr-find", start_lr, end_lr, range_steps)
    if json:
        _print_json(r)
        return
    print(f"suggested lr {r.suggested_lr:.3g} ({r.rule}: minimum at {r.min_loss_lr:.3g}); steepest descent at "
          f"{r.steepest_lr:.3g}; the config's --lr is {r.preset_lr:g}")
    print(f"{len(r.lrs)} steps, {r.stopped}; curve: {r.files[0]}, plot: {r.files[1]}")


@wraps("insight.audit:audit")
def audit_cmd(data: str, run: Optional[str] = ..., folds: NonNegativeInt = ..., fold_epochs: PositiveFloat = ...,
              seed: NonNegativeInt = ..., labels: Optional[str] = ..., json: bool = False) -> None:
    """Check an image folder for the classic mistakes: unreadable or odd files, class counts, duplicates and
    train/test leakage, likely mislabeled images. Reads only: never moves or deletes a file.

    Args:
        data: an image folder with train/<class>/ (and test/, val/).
        run: a trained run: its predictions on test/ (which it never trained on) check the test labels.
        folds: check the training labels with this many cross-validated reslab runs (the fast preset; 0: off).
        fold_epochs: epochs of each fold's run.
        seed: seed of the folds and their runs.
        labels: a CSV or TSV naming each image's class (and optionally split) instead of class folders.
        json: print one JSON object whose findings name their files.
    """
    from ..insight.audit import as_dict, audit

    r = audit(data, run=run, folds=folds, fold_epochs=fold_epochs, seed=seed, labels=labels)
    if json:
        _print_json(as_dict(r))
    else:
        _print_audit(r)
    errors = sum(f.severity == "error" for f in r.findings)
    if errors:  # exit 1, so that a script or CI step stops on a folder that is not fit to train on
        raise DataError(f"the audit found {errors} error{'s' if errors > 1 else ''}" + ("" if json else " (above)"))


def _print_audit(r) -> None:
    print(f"{r.data}: " + ", ".join(f"{s} {n} images" for s, n in r.splits.items())
          + f"; {len(r.counts['train'])} classes")
    if not r.findings:
        print("no problems found")
    for f in r.findings:
        print(f"[{f.severity}] {f.message}")
        print(f"    what to do: {f.advice}")
        for path in f.files[:5]:
            print(f"    {path}")
        if len(f.files) > 5:
            print(f"    ... and {len(f.files) - 5} more (--json lists them all)")
    print(f"labels: {r.labels_checked}")


@wraps("insight.report:report")
def report_cmd(path: str, samples: Optional[PositiveInt] = ..., evaluate: bool = ...) -> None:
    """Write one self-contained HTML page (report.html) for a run directory or a comparison directory.

    Args:
        path: a run directory, or a comparison's --out directory.
        samples: evaluate the run on a seeded subset of this many test images (default: all).
        evaluate: evaluate the run's model on its test data for the confusion matrix and per-class table.
    """
    from ..insight.report import report

    print(f"report: {report(path, samples=samples, evaluate=evaluate)}")


@wraps("insight.plots:plot_runs")
def plot_cmd(runs: list[str], out: str = "curves.png", metric: Literal["error", "loss", "lr"] = ...) -> None:
    """Draw curves from run directories' metrics.jsonl.

    Args:
        runs: run directories.
        out: image file to write (.png, .pdf or .svg).
        metric: error: train (dashed) and test (bold) error; loss: training loss; lr: learning rate.
    """
    from ..core.rundir import check_output
    from ..insight.plots import plot_runs

    check_output(out, (".png", ".pdf", ".svg"))
    print(plot_runs(runs, out, metric=metric))


@wraps("ship.export:export")
def export_cmd(model: str, format: str = ..., out: Optional[str] = ..., arch: Optional[str] = ...,
               quantize: Optional[str] = ..., data: Optional[str] = ..., calibration: PositiveInt = ...,
               samples: Optional[PositiveInt] = ..., max_drop: ClosedUnitInterval = ..., force: bool = ...,
               json: bool = False) -> None:
    """Export a trained model to ONNX or TorchScript (dynamic batch size) and check parity with PyTorch.

    Args:
        model: run directory, model.safetensors, last.pt, or a bare state_dict .pth (with --arch).
        format: onnx or torchscript.
        out: output file (default: model.onnx, model.ts or model.int8.onnx beside the model).
        arch: architecture of a bare state_dict.
        quantize: int8: static int8 ONNX (ONNX Runtime), calibrated on training images, checked on the test set.
        data: image folder (or cifar10) to calibrate and check the int8 model on (default: the run's data).
        calibration: training images that set the int8 scales.
        samples: compare on a class-balanced subset of this many test images (default: all).
        max_drop: the most test accuracy (0-1) int8 may lose against float and still be written.
        force: write over an existing file at --out that is not an earlier export; write an int8 model that loses
            more than --max-drop.
        json: print one JSON object on stdout.
    """
    from ..ship.export import TOLERANCE, export

    r = export(model, format, out, arch=arch, force=force, quantize=quantize, data=data, calibration=calibration,
               samples=samples, max_drop=max_drop)
    if json:
        _print_json(r)
    if r.quantized is not None:
        q = r.quantized
        verdict = (f"loses {100 * q.drop:.2f} points" if q.drop > 0 else f"gains {-100 * q.drop:.2f} points")
        line = (f"int8 {100 * q.int8_accuracy:.2f}% against float {100 * q.float_accuracy:.2f}% on {q.n} test "
                f"images ({verdict}; same top class on {100 * q.agreement:.1f}%; calibrated on {q.calibration})")
        if not q.written:
            raise UserError(f"{line}: more than --max-drop {q.max_drop:g}; not written (--force writes it)")
        if not json:
            print(f"wrote {r.out} (ONNX int8, input {r.input_shape}) and {r.out.with_suffix('.json').name}: {line}")
        return
    if not json:
        print(f"wrote {r.out} ({r.format}, input {r.input_shape}); parity with PyTorch: max |diff| "
              f"{r.max_abs_diff:.2e} {'<=' if r.ok else '>'} {TOLERANCE:g}: {'OK' if r.ok else 'FAILED'}")
    if not r.ok:
        raise UserError(f"exported model differs from PyTorch by {r.max_abs_diff:.2e}")


@wraps("ship.serve:serve", "ship.serve:create_app")
def serve_cmd(model: str, host: str = ..., port: Port = ..., topk: PositiveInt = ...,
              device: str = ..., precision: str = ..., max_batch: PositiveInt = ...,
              batch_wait_ms: NonNegativeFloat = ..., max_upload_mb: PositiveFloat = ...,
              decode_timeout: PositiveFloat = ..., decode_memory_mb: PositiveFloat = ..., runtime: str = ...,
              header_timeout: PositiveFloat = ...) -> None:
    """Serve a trained model over HTTP: POST /predict (multipart field 'file') -> top-k JSON, GET /health, GET /.

    Needs pip install 'reslab[serve]' (FastAPI, uvicorn, python-multipart).

    Args:
        model: run directory, model.safetensors or last.pt.
        host: address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: TCP port.
        topk: classes in each answer.
        device: auto, cpu, cuda or cuda:N.
        precision: fp32, bf16 or auto.
        max_batch: most images answered by one forward pass.
        batch_wait_ms: how long the first request of a batch waits for others.
        max_upload_mb: largest upload accepted (413 beyond).
        decode_timeout: seconds an image may take to decode (408 beyond).
        decode_memory_mb: memory the images decoded at once may take (others wait; one needing more: 413).
        runtime: eager (PyTorch), onnx or onnx-int8 (the run's exported model.onnx / model.int8.onnx).
        header_timeout: seconds a connection may take to send its request headers (408 and closed beyond).
    """
    from ..ship.serve import serve

    serve(model, host, port, header_timeout, topk=topk, device=device, precision=precision, max_batch=max_batch,
          batch_wait_ms=batch_wait_ms, max_upload_mb=max_upload_mb, decode_timeout=decode_timeout,
          decode_memory_mb=decode_memory_mb, runtime=runtime)


def cache_cmd(clear: bool = False, json: bool = False) -> None:
    """Show the decoded-image cache ($RESLAB_CACHE, else ~/.cache/reslab): each folder decoded, its size on disk.

    Args:
        clear: delete every entry (they are rebuilt when a folder is next loaded).
        json: print one JSON object per entry.
    """
    from ..data.cache import FORMAT, cache_dir, clear_cache, list_cache

    if clear:
        try:
            files, freed = clear_cache()
        except OSError as exc:
            raise UserError(f"cannot clear the decode cache {cache_dir()}: {exc.strerror or exc}") from None
        print(f"removed {files} files ({freed / 2**20:.1f} MiB) from {cache_dir()}")
        return
    entries = list_cache()
    if json:
        for e in entries:
            _print_json(e)
        return
    complete = [e for e in entries if e.writer is None]
    print(f"{cache_dir()}: {len(complete)} entries, {sum(e.bytes for e in complete) / 2**20:.1f} MiB"
          + (f"; {len(entries) - len(complete)} partial files, {sum(e.bytes for e in entries if e.writer) / 2**20:.1f}"
             f" MiB" if len(complete) < len(entries) else ""))
    for e in entries:
        if e.writer is not None:
            state = "being written by" if e.writer_alive else "left by a killed writer,"
            print(f"  {e.modified}  {e.bytes / 2**20:8.1f} MiB  partial: {state} PID {e.writer}"
                  + ("" if e.writer_alive else " (--clear frees it)") + f"  {Path(e.file).name}")
            continue
        what = f"{e.images} images at {e.store_size or 'native'} px" if e.images is not None else "(no record)"
        what += "" if e.format == FORMAT else f" (format {e.format} of an older reslab: never read; --clear frees it)"
        print(f"  {e.modified}  {e.bytes / 2**20:8.1f} MiB  {what}  {e.source or Path(e.file).name}")


COMMANDS: dict[str, Callable[..., None]] = {
    "models": models_cmd,
    "summary": summary_cmd,
    "train": train_cmd,
    "eval": eval_cmd,
    "predict": predict_cmd,
    "bench": bench_cmd,
    "compare": compare_cmd,
    "lr-find": lr_find_cmd,
    "audit": audit_cmd,
    "report": report_cmd,
    "plot": plot_cmd,
    "export": export_cmd,
    "serve": serve_cmd,
    "cache": cache_cmd,
}


def build_parser(preset: str | None = None, config: dict[str, Any] | None = None) -> ArgumentParser:
    """The full ``reslab`` parser; ``preset`` and ``config`` (a ``--config`` file's values) set the recipe's
    defaults."""
    defaults = {**(PRESETS[preset] if preset else {}), **(config or {})}
    parser = ArgumentParser(prog="reslab", description="Train, evaluate and compare residual networks.",
                            exit_on_error=False)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subcommands(dest="command")
    for name in COMMANDS:
        p = subcommand_parser(name, defaults)
        summary = parse_doc(COMMANDS[name].__doc__ or "").short_description or ""
        sub.add_subcommand(name, p, help=" ".join(summary.split()))
    return parser


def subcommand_parser(name: str, defaults: dict[str, Any] | None = None) -> ArgumentParser:
    """The parser of ``reslab NAME``, made from its function; ``defaults`` are the recipe's (a preset's and a config
    file's), for the commands that take one."""
    return command_parser(COMMANDS[name], defaults or {})


def _run(command: str, args: dict[str, Any], given: frozenset[str]) -> None:
    """Call the command's function: the recipe's options become its ``TrainConfig``, ``given`` is handed to those
    that take it."""
    fn = COMMANDS[command]
    params = inspect.signature(fn).parameters
    if takes_config(fn):
        args.pop("config")  # the --config file: read by the first pass, already in the defaults
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        args["config"] = TrainConfig(**{k: args.pop(k) for k in list(args) if k in fields})
        if "preset" not in params:
            args.pop("preset")
    if "given" in params:
        args["given"] = given
    fn(**args)


def _parse(argv: list[str]) -> tuple[str, dict[str, Any], frozenset[str]]:
    """The command, its arguments and the options given explicitly (raises ``ArgumentError``)."""
    first = first_pass(argv)
    parser = build_parser(first.preset, first.config)
    ns = parser.parse_args(argv)
    # Given: on the command line, and "config" for a --config file (its values then decide, not a budget rule).
    given = given_options(parser, argv, ns.command) | ({"config"} if first.config_file else set())
    return ns.command, {k: _plain(v) for k, v in ns[ns.command].as_dict().items()}, given


def _plain(value: Any) -> Any:
    """A range-checked number as the builtin it is (jsonargparse's ``PositiveInt`` is an ``int`` subclass that YAML
    and JSON writers refuse)."""
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    return value


def _usage_error(exc: Exception, argv: list[str]) -> None:
    msg = usage_message(exc)
    command = next((a for a in argv if a in COMMANDS), None)
    print(f"reslab: error: {msg} (see {f'reslab {command} --help' if command else 'reslab --help'})",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reslab`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        command, args, given = _parse(argv)
    except (ArgumentError, ConfigError) as exc:  # a bad option is one line on stderr, not a screen of usage
        if debug:
            raise
        _usage_error(exc, argv)
        return 2
    try:
        _run(command, args, given)
    except Interrupted as exc:
        print(f"reslab: {exc}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `reslab ... | head` closed the pipe: not an error
        sys.stderr.close()
        return 0
    except UserError as exc:  # anything else is a bug: its traceback is shown
        if debug:
            raise
        print(f"reslab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        return 130
    return 0
