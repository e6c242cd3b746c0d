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
from typing import Any, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from .config import PRESETS, TrainConfig, budget_rule_fields
from .errors import ConfigError, Interrupted, UserError

set_parsing_settings(docstring_parse_attribute_docstrings=True)


def _print_json(obj: Any) -> None:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    print(json.dumps(obj, default=str))


def models_cmd(json: bool = False) -> None:
    """List the registered models with their parameters.

    Args:
        json: print one JSON object per model instead of a table.
    """
    from .models import count_params, create_model, list_models, model_info

    rows = []
    for name in list_models():
        info = model_info(name)
        rows.append({"name": name, "family": info.family, "depth": info.depth, "residual": info.residual,
                     "input_size": info.input_size, "params": count_params(create_model(name))})
    if json:
        for r in rows:
            _print_json(r)
        return
    print(f"{'model':<12}{'family':<10}{'depth':>6}{'residual':>10}{'input':>7}{'params (10 classes)':>22}")
    for r in rows:
        print(f"{r['name']:<12}{r['family']:<10}{r['depth']:>6}{r['residual']!s:>10}{r['input_size']:>7}"
              f"{r['params']:>22,}")


def summary_cmd(arch: str, image_size: Optional[int] = None, num_classes: int = 10,
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
    from .models import create_model, model_info, summarize

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
              given: frozenset[str] = frozenset(), force: bool = False, data_changed: Optional[str] = None) -> None:
    """Train a new run from ``config``, or continue ``resume`` with the options ``given`` on the command line."""
    from .distributed import shutdown
    from .runtime import process_age
    from .train import train

    started = time.perf_counter() - process_age()  # --time-budget counts the whole command, imports included
    try:
        if resume:
            train(resume=resume, preset=preset, started=started, data_changed=data_changed == "ok",
                  **{k: getattr(config, k) for k in given})
        else:
            train(config, started=started, force=force)
    finally:
        shutdown()


def eval_cmd(model: str, data: str, split: str = "test", arch: Optional[str] = None, device: str = "auto",
             precision: str = "auto", batch_size: int = 256, samples: Optional[int] = None,
             data_dir: Optional[str] = None, tta: Optional[str] = None, tta_fraction: Optional[float] = None,
             plot: Optional[str] = None,
             json: bool = False) -> None:
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
        plot: also draw the confusion matrix into this PNG file.
        json: print one JSON object on stdout (progress and warnings go to stderr).
    """
    from .evaluate import evaluate

    if plot:
        from .rundir import check_output

        check_output(plot, (".png",), option="--plot")
    r = evaluate(model, data, split=split, arch=arch, device=device, precision=precision, batch_size=batch_size,
                 samples=samples, data_dir=data_dir, tta=tta,
                 tta_fraction=tta_fraction)
    if plot:
        from .plots import plot_confusion
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


def predict_cmd(model: str, inputs: list[str], topk: int = 5, arch: Optional[str] = None, device: str = "auto",
                json: bool = False) -> None:
    from .evaluate import predict

    for r in predict(model, inputs, topk=topk, arch=arch, device=device):
        if "error" in r:
            print(f"reslab: cannot read {r['path']}: {r['error']}", file=sys.stderr)
        elif json:
            _print_json(r)
        else:
            print(r["path"] + "  " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))


def bench_cmd(arch: Optional[str] = None, preset: str = "seed", data: Optional[str] = None, batch_size: int = 128,
              steps: int = 20, warmup: int = 3, baseline: bool = False, device: str = "auto",
              precision: str = "auto", channels_last: Optional[bool] = None, compile: bool = False,
              threads: Optional[int] = None, tune: bool = False, json: bool = False) -> None:
    """Training images/s of the whole step, achieved GFLOP/s against a measured GEMM roof, and the seed's pipeline.

    Args:
        arch: model name (default: the preset's model).
        preset: training preset whose augmentation and model settings are used: seed or paper.
        data: image folder to read real images from (required with --baseline); random images otherwise.
        batch_size: images per step.
        steps: timed steps, after the warm-up.
        warmup: untimed steps first.
        baseline: also time the seed's pipeline (PIL per image in a DataLoader, fp32, NCHW, eager) on --data.
        device: auto, cpu, cuda or cuda:N.
        precision: auto, fp32, bf16 or fp16.
        channels_last: channels-last memory format (default: by device and precision).
        compile: torch.compile the model.
        threads: CPU threads (default: the usable cores).
        tune: instead, time the training step under every execution choice on this CPU (threads, precision,
            layout) as a training run's start-up probe does, and print the table with the probe's pick.
        json: print one JSON object on stdout.
    """
    from .bench import bench, tune_table

    if tune:
        rows = tune_table(arch, preset, batch_size)
        if json:
            for row in rows:
                _print_json(row)
            return
        print(f"{'threads':>7} {'precision':>9} {'layout':>13} {'img/s':>9} {'GFLOP/s':>8} {'roof':>7} {'of roof':>7}")
        for row in rows:
            print(f"{row.threads:>7} {row.precision:>9} {'channels-last' if row.channels_last else 'NCHW':>13} "
                  f"{row.images_per_sec:>9,.0f} {row.gflops_per_sec:>8.0f} {row.roof_gflops_per_sec:>7.0f} "
                  f"{row.roof_fraction:>7.0%}{'  <- the probe picks this' if row.chosen else ''}")
        return

    r = bench(arch=arch, preset=preset, data=data, batch_size=batch_size, steps=steps, warmup=warmup,
              baseline=baseline, device=device, precision=precision, channels_last=channels_last, compile=compile,
              threads=threads)
    if json:
        _print_json(r)
        return
    print(f"{r.arch} ({r.preset} preset, {r.input_size} px, {r.num_classes} classes) on {r.device}, {r.threads} "
          f"threads, {r.precision}, channels_last={r.channels_last}, compile={r.compile}, batch {r.batch_size}")
    print(f"  train        {r.images_per_sec:10.1f} img/s   (data -> augmentation -> forward -> backward -> "
          f"update, {r.steps} steps)")
    print(f"  eval         {r.eval_images_per_sec:10.1f} img/s")
    print(f"  compute      {r.gflops_per_sec:10.1f} GFLOP/s = {r.roof_fraction:.0%} of the measured "
          f"{r.precision} GEMM roof ({r.roof_gflops_per_sec:.0f} GFLOP/s); {r.macs / 1e6:.1f} M MACs/image")
    if r.speedup is not None:
        print(f"  seed pipeline {r.baseline_images_per_sec:9.1f} img/s   -> speedup {r.speedup:.2f}x")


def compare_cmd(config: TrainConfig, archs: Optional[str] = None, schedules: Optional[str] = None,
                budgets: Optional[str] = None, seeds: Optional[str] = None, preset: Optional[str] = None,
                compare_out: str = "runs/compare", fixed: frozenset[str] = frozenset()) -> None:
    from .compare import COMPARISONS, compare

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else []
    try:
        numbers = [float(b) for b in split(budgets)], [int(s) for s in split(seeds)]
    except ValueError:
        raise ConfigError(f"--budgets takes minutes and --seeds integers, comma-separated: {budgets!r}, "
                          f"{seeds!r}") from None
    chosen = dict(archs=split(archs), schedules=split(schedules), budgets=numbers[0])
    if not any(chosen.values()) and preset in COMPARISONS:  # the preset says what it compares
        chosen.update(COMPARISONS[preset])
    summary = compare(config, **chosen, seeds=numbers[1], out=compare_out, preset=preset, fixed=fixed)
    if budgets:
        print(f"{'budget min':>10}{'seeds':>7}{'test acc % mean':>17}{'std':>7}{'s to result':>13}")
        for t in summary["frontier"]:
            print(f"{t['time_budget']:>10g}{t['seeds']:>7}{100 * t['mean']:>17.2f}{100 * t['std']:>7.2f}"
                  f"{t['mean_seconds_to_result']:>13.0f}")
        print(f"report: {compare_out}/report.md")
        return
    print(f"{'run':<18}{'depth':>6}{'test err %':>12}{'train err %':>13}{'train loss':>12}{'wall s':>9}")
    for r in summary["runs"]:
        print(f"{r['name']:<18}{r['depth']:>6}{100 * (r['final_test_error'] or 0):>12.2f}"
              f"{100 * (r['final_train_error'] or 0):>13.2f}{r['final_train_loss'] or 0:>12.4f}"
              f"{r['wall_seconds']:>9.0f}")
    for lesson in summary.get("lessons", []):
        print(lesson["text"])
    print(f"report: {compare_out}/report.md")


def plot_cmd(runs: list[str], out: str = "curves.png", metric: str = "error") -> None:
    from .plots import plot_runs
    from .rundir import check_output

    check_output(out, (".png", ".pdf", ".svg"))
    print(plot_runs(runs, out, metric=metric))


def export_cmd(model: str, format: str = "onnx", out: Optional[str] = None, arch: Optional[str] = None,
               force: bool = False, json: bool = False) -> None:
    """Export a trained model to ONNX or TorchScript (dynamic batch size) and check parity with PyTorch.

    Args:
        model: run directory, model.safetensors, last.pt, or a bare state_dict .pth (with --arch).
        format: onnx or torchscript.
        out: output file (default: model.onnx or model.ts beside the model).
        arch: architecture of a bare state_dict.
        force: write over an existing file at --out that is not an earlier export (never over the run's files).
        json: print one JSON object on stdout.
    """
    from .export import TOLERANCE, export

    r = export(model, format, out, arch=arch, force=force)
    if json:
        _print_json(r)
    else:
        print(f"wrote {r.out} ({r.format}, input {r.input_shape}); parity with PyTorch: max |diff| "
              f"{r.max_abs_diff:.2e} {'<=' if r.ok else '>'} {TOLERANCE:g}: {'OK' if r.ok else 'FAILED'}")
    if not r.ok:
        raise UserError(f"exported model differs from PyTorch by {r.max_abs_diff:.2e}")


def cache_cmd(clear: bool = False, json: bool = False) -> None:
    """Show the decoded-image cache ($RESLAB_CACHE, else ~/.cache/reslab): each folder decoded, its size on disk.

    Args:
        clear: delete every entry (they are rebuilt when a folder is next loaded).
        json: print one JSON object per entry.
    """
    from .data.cache import FORMAT, cache_dir, clear_cache, list_cache

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
    "plot": plot_cmd,
    "export": export_cmd,
    "cache": cache_cmd,
}


def _train_parser(preset: str | None, resume: bool = True) -> ArgumentParser:
    p = ArgumentParser(description="Train a model; writes config.yaml, metrics.jsonl, last.pt, model.safetensors.")
    p.add_argument("--preset", type=Optional[str],
                   help=f"start from a preset ({', '.join(PRESETS)}); flags and --config override it")
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of options (e.g. a run's config.yaml)")
    if resume:
        p.add_argument("--resume", type=Optional[str],
                       help="continue the run in this directory from its last.pt; flags given with it may change "
                            "its length (--epochs, --steps), evaluation, logging and device, nothing else")
        p.add_argument("--data_changed", type=Optional[str], choices=["ok"],
                       help="with --resume: continue on a data folder whose images changed since the run started")
        p.add_argument("--force", type=bool, default=False,
                       help="write over a config.yaml or metrics.jsonl in --out that no reslab run made")
    p.add_class_arguments(TrainConfig, nested_key=None)
    if preset:
        p.set_defaults(PRESETS[preset])
    return p


def _compare_parser(preset: str | None) -> ArgumentParser:
    p = _train_parser(preset, resume=False)
    p.description = ("Train several models (or schedules) with one recipe into OUT/<name>/, then write "
                     "report.md, summary.json and figures. --preset degradation compares plain20, plain56, resnet20 "
                     "and resnet56 (He et al. Fig. 6); --preset decay compares step, cosine and constant schedules.")
    p.add_argument("--archs", type=Optional[str], help="models to compare, e.g. plain20,resnet20,plain56,resnet56")
    p.add_argument("--schedules", type=Optional[str], help="schedules to compare on --arch, e.g. step,constant")
    p.add_argument("--budgets", type=Optional[str], help="--time-budget minutes to compare, e.g. 2.5,5,10,20")
    p.add_argument("--seeds", type=Optional[str], help="repeat every model, schedule or budget with each of these "
                   "seeds, e.g. 0,1,2 (the report and figures show the mean and spread)")
    return p


def _plot_parser() -> ArgumentParser:
    p = ArgumentParser(description="Draw curves from run directories' metrics.jsonl.")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", type=str, default="curves.png", help="PNG file to write")
    p.add_argument("--metric", type=str, default="error", choices=["error", "loss", "lr"],
                   help="error: train (dashed) and test (bold) error; loss: training loss; lr: learning rate")
    return p


def _predict_parser() -> ArgumentParser:
    p = ArgumentParser(description="Top-k classes and probabilities for image files or folders.")
    p.add_argument("model", help="run directory, model.safetensors, last.pt or a bare state_dict (with --arch)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image")
    p.add_argument("--arch", type=Optional[str], help="architecture of a bare state_dict")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", type=bool, default=False, help="print one JSON object per image and line")
    return p


def build_parser(preset: str | None = None) -> ArgumentParser:
    """The full ``reslab`` parser (``preset`` sets the train defaults, as ``--preset`` does)."""
    parser = ArgumentParser(prog="reslab", description="Train, evaluate and compare residual networks.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subcommands(dest="command")
    for name, fn in COMMANDS.items():
        if name == "train":
            p = _train_parser(preset)
        elif name == "compare":
            p = _compare_parser(preset)
        elif name == "predict":
            p = _predict_parser()
        elif name == "plot":
            p = _plot_parser()
        else:
            p = ArgumentParser(description=(fn.__doc__ or "").split("\n")[0])
            # The first parameter is positional (``reslab summary ARCH``, ``reslab eval MODEL``); the rest are flags.
            params = list(inspect.signature(fn).parameters.values())
            first = params[0].name if params and params[0].default is inspect.Parameter.empty else None
            if first is not None:
                p.add_argument(first, help=_param_doc(fn, first))
            p.add_function_arguments(fn, nested_key=None, skip={first} if first else None)
        sub.add_subcommand(name, p, help=(p.description or "").split("\n")[0])
    return parser


def _bool_options() -> set[str]:
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainConfig) if "bool" in str(f.type)}
    for fn in COMMANDS.values():
        names |= {n for n, p in inspect.signature(fn).parameters.items() if "bool" in str(p.annotation)}
    return names | {"json", "force"}


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept ``--image-size`` as well as jsonargparse's ``--image_size``, and bare switches: ``--json`` means
    ``--json=true``, ``--no-nesterov`` means ``--nesterov=false``."""
    bools, out = _bool_options(), []
    for i, a in enumerate(argv):
        if a == "--":
            out += argv[i:]
            break
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            name = name.replace("-", "_")
            nxt = argv[i + 1].lower() if i + 1 < len(argv) else ""
            if not eq and nxt not in ("true", "false", "null"):
                if name in bools:
                    name, eq, value = name, "=", "true"
                elif name.startswith("no_") and name[3:] in bools:
                    name, eq, value = name[3:], "=", "false"
            a = "--" + name + eq + value
        out.append(a)
    return out


def _param_doc(fn: Callable, name: str) -> str:
    from docstring_parser import parse

    return next((p.description for p in parse(fn.__doc__ or "").params if p.arg_name == name), "") or ""


def _given_options(argv: list[str]) -> set[str]:
    """Names of the options on a normalised command line (``--image_size=64`` -> ``image_size``)."""
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2}


def _preset_in(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
    return None


def _dispatch(command: str, args: dict[str, Any], argv: list[str]) -> None:
    """Run ``command`` with its parsed ``args``; ``train`` and ``compare`` build a ``TrainConfig`` first."""
    if command == "train":
        special = {k: args.pop(k, None) for k in ("preset", "resume", "force", "data_changed")}
        if special["data_changed"] and not special["resume"]:
            raise ConfigError("--data-changed goes with --resume")
        options = _given_options(argv)
        given = frozenset(options & set(args))
        if special["resume"] and "config" in options:
            raise ConfigError("--resume continues a run with its saved config: no --config with it")
        if not special["resume"]:
            args.update(budget_rule_fields(special["preset"], args["time_budget"], options))
        special["force"] = bool(special["force"])
        COMMANDS[command](TrainConfig(**args), given=given, **special)
    elif command == "compare":
        special = {k: args.pop(k, None) for k in ("preset", "archs", "schedules", "budgets", "seeds")}
        out = args.pop("out", None) or "runs/compare"  # --out names the comparison directory
        fixed = frozenset(_given_options(argv))  # as for train: flags and --config override the budget rule
        COMMANDS[command](TrainConfig(**args), compare_out=out, fixed=fixed, **special)
    else:
        COMMANDS[command](**args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reslab`` console script; returns the exit status."""
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    preset = _preset_in(argv)
    if preset is not None and preset not in PRESETS:
        print(f"reslab: error: unknown preset {preset!r}; known: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    parser = build_parser(preset)
    for p in [parser, *parser._subcommands_action._name_parser_map.values()]:
        p.exit_on_error = False  # a bad option is one line on stderr, not a screen of usage
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as exc:
        if debug:
            raise
        msg = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        command = next((a for a in argv if a in COMMANDS), None)
        hint = f"reslab {command} --help" if command else "reslab --help"
        print(f"reslab: error: {msg} (see {hint})", file=sys.stderr)
        return 2
    command = ns.command
    args = ns[command].as_dict()
    for key in ("config", "__path__"):
        args.pop(key, None)
    try:
        _dispatch(command, args, argv)
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
