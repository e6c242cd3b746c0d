"""``reslab report RUN`` / ``reslab report COMPARE_OUT``: one self-contained HTML page (``report.html``).

No server and no network: figures are PNGs inlined as data URIs, the style is inline, and the one script only checks
that every image decoded (it marks ``<body data-images="loaded/total">``, which the browser test reads). A run's page:
its final numbers, the machine it ran on, curves, accuracy marks, the confusion matrix and per-class table (from an
evaluation on the run's test data when it can be read), the gallery (``RUN/gallery/``) and the audit
(``RUN/audit.json``) when present, and the config by section. A comparison's page: its table, lessons and figures.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path
from typing import Any

from ..config.schema import SECTIONS, fields_of
from ..core import rundir
from ..core.errors import UserError

STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
.note{color:#666}.error{color:#b00}.warning{color:#a60}.grid{display:flex;flex-wrap:wrap;gap:1em}
.grid>div{flex:1 1 300px}code{background:#f4f4f4;padding:0 .2em}"""
CHECK = """<script>window.addEventListener("load",()=>{const i=[...document.images];
document.body.dataset.images=i.filter(x=>x.complete&&x.naturalWidth>0).length+"/"+i.length;});</script>"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    n = ' class="n"'
    body = "".join("<tr>" + "".join(f'<td{n if k in numeric else ""}>{_esc(v)}</td>'
                                     for k, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def percent(v: Any, unit: str = " %") -> str:
    """A fraction as a percentage with two decimals (``"-"`` for a missing or non-numeric value)."""
    return f"{100 * v:.2f}{unit}" if _is_number(v) else "-"


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if _is_number(v) else "-"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_back(title: str, section, *args: Any) -> str:
    """A section drawn from files a run holds, which anyone may have edited: one that cannot be read is a note."""
    try:
        return section(*args)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OSError) as exc:
        return f"<h2>{_esc(title)}</h2><p class='note'>could not be read: {_esc(type(exc).__name__)}: {_esc(exc)}</p>"


def _page(title: str, sections: list[str]) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>{''.join(sections)}{CHECK}</body></html>")


def _machine_section(run: Path) -> str:
    machines = rundir.read_machines(run)
    if not machines:
        return "<h2>Machine</h2><p class='note'>not recorded (a run of an older reslab)</p>"
    rows = [[m.get("cpu"), ", ".join(m.get("cpu_extensions", [])), m.get("cores"), m.get("threads"),
             m.get("device"), m.get("gpu", ""), m.get("precision"), m.get("torch")] for m in machines]
    return "<h2>Machine</h2>" + _table(["CPU", "extensions", "cores", "threads", "device", "GPU", "precision",
                                        "torch"], rows)


def _config_section(config: dict[str, Any]) -> str:
    parts = []
    for name, section in SECTIONS.items():
        rows = [[f.name.replace("_", "-"), config[f.name]] for f in fields_of(name) if f.name in config]
        if rows:
            parts.append(f"<div><h3>{_esc(section.title)}</h3>{_table(['option', 'value'], rows)}</div>")
    return "<h2>Config</h2><div class='grid'>" + "".join(parts) + "</div>"


def _marks_section(run: Path) -> str:
    marks = rundir.read_marks(run)
    if not marks:
        return ""
    rows = [[f"{100 * float(k):g} %", "-" if v.get("seconds") is None else f"{v['seconds']:.0f} s",
             v.get("step") or "-", percent(v.get("test_acc"))] for k, v in marks.items()]
    return "<h2>Accuracy marks</h2>" + _table(["test accuracy", "reached after", "step", "accuracy then"], rows,
                                              {1, 2, 3})


def _evaluation_section(run: Path, config: dict[str, Any], tmp: Path, samples: int | None) -> str:
    from ..inference.evaluate import class_metrics, evaluate
    from .plots import plot_confusion

    try:
        r = evaluate(run, config["data"], data_dir=config.get("data_dir"), samples=samples)
    except UserError as exc:
        return f"<h2>Evaluation</h2><p class='note'>not evaluated: {_esc(exc)}</p>"
    picture = _img(plot_confusion(r.confusion, r.classes, tmp / "confusion.png"), "confusion matrix")
    rows = [[m["class"], m["support"], percent(m["precision"]), percent(m["recall"]), f"{m['f1']:.3f}"]
            for m in class_metrics(r.confusion, r.classes)]
    return (f"<h2>Evaluation</h2><p>test accuracy <b>{percent(r.accuracy)}</b> on {r.n} images of "
            f"<code>{_esc(config['data'])}</code>" + (f", top-5 {percent(r.top5)}" if r.top5 is not None else "")
            + f"</p><div class='grid'><div>{picture}</div><div>"
            + _table(["class", "images", "precision", "recall", "F1"], rows, {1, 2, 3, 4}) + "</div></div>")


def _gallery_section(run: Path) -> str:
    folder = run / "gallery"
    if not (folder / "gallery.json").is_file():
        return ("<h2>Mistakes</h2><p class='note'>no gallery: <code>reslab eval RUN --data DATA --gallery "
                "RUN/gallery</code> draws one</p>")
    g = json.loads((folder / "gallery.json").read_text())
    images = "".join(_img(folder / name, name) for name in ("mistakes.png", "confused.png")
                     if (folder / name).is_file())
    pairs = [[p.get("true"), p.get("predicted"), p.get("count"), percent(p.get("share_of_true"))]
             for p in g.get("pairs", [])]
    if not g.get("mistakes"):
        return f"<h2>Mistakes</h2><p>none among the {_esc(g.get('n'))} images of the gallery</p>"
    return (f"<h2>Mistakes</h2><p>{len(g['mistakes'])} of {_esc(g.get('n'))} images</p>"
            + _table(["true class", "predicted", "images", "share of the true class"], pairs, {2, 3}) + images)


def _severity(v: Any) -> str:
    return v if v in ("error", "warning", "info") else "note"  # a class name from a file: only the known ones


def _audit_section(run: Path) -> str:
    path = run / "audit.json"
    if not path.is_file():
        return ""
    a = json.loads(path.read_text())
    items = "".join(f'<li class="{_severity(f.get("severity"))}"><b>{_esc(f.get("message"))}</b><br>what to do: '
                    f'{_esc(f.get("advice"))}</li>' for f in a.get("findings", []))
    return f"<h2>Data audit</h2><p>{_esc(a.get('data'))}</p><ul>{items or '<li>no problems found</li>'}</ul>"


def run_report(run: str | Path, samples: int | None = None, evaluate: bool = True) -> Path:
    """Write ``RUN/report.html`` for a training run; returns its path."""
    from .plots import plot_runs

    run = Path(run)
    config = rundir.read_config(run)
    metrics = rundir.read_metrics(run)
    if config is None or not metrics:
        raise UserError(f"{run} is not a reslab run directory with metrics (config.yaml, metrics.jsonl)")
    last = metrics[-1]
    summary = _table(["epochs", "steps", "train loss", "train accuracy", "test accuracy", "wall time"],
                     [[last.get("epoch"), last.get("step"), _num(last.get("train_loss"), ".4f"),
                       percent(last.get("train_acc")), percent(last.get("test_acc")),
                       _num(last.get("wall_seconds"), ".0f") + " s"]], {0, 1, 2, 3, 4, 5})
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        curves = (_img(plot_runs([run], t / "error.png", metric="error"), "error curves")
                  + _img(plot_runs([run], t / "loss.png", metric="loss"), "loss curve"))
        sections = [f"<p>{_esc(config.get('arch'))} on <code>{_esc(config.get('data'))}</code></p>", summary,
                    _machine_section(run), f"<h2>Curves</h2><div class='grid'><div>{curves}</div></div>",
                    _read_back("Accuracy marks", _marks_section, run)]
        sections.append(_evaluation_section(run, config, t, samples) if evaluate and rundir.is_finished(run)
                        else "<h2>Evaluation</h2><p class='note'>not evaluated (no final model yet, or --no-evaluate)"
                             "</p>")
        sections += [_read_back("Mistakes", _gallery_section, run), _read_back("Data audit", _audit_section, run),
                     _read_back("Config", _config_section, config)]
        out = run / "report.html"
        out.write_text(_page(f"reslab run {run.name}", sections))
    return out


def compare_report(folder: str | Path) -> Path:
    """Write ``COMPARE_OUT/report.html`` from a comparison's ``summary.json`` and figures; returns its path."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} holds no readable summary.json of a comparison: {exc}") from None
    rows = [[r["name"], r.get("depth"), percent(r.get("final_test_error")), percent(r.get("final_train_error")),
             f"{r.get('final_train_loss') or 0:.4f}", f"{r.get('wall_seconds', 0):.0f} s"] for r in summary["runs"]]
    sections = [f"<p>{_esc(summary['kind'])}, seeds {_esc(summary.get('seeds'))}</p>",
                _table(["run", "depth", "test error", "train error", "train loss", "wall time"], rows, {1, 2, 3, 4, 5})]
    lessons = "".join(f"<li>{_esc(lesson['text'])}</li>" for lesson in summary.get("lessons", []))
    if lessons:
        sections.append(f"<h2>What it shows</h2><ul>{lessons}</ul>")
    figures = [p for p in ("curves.png", "depth.png", "loss.png", "frontier.png") if (folder / p).is_file()]
    sections.append("<h2>Figures</h2>" + ("".join(_img(folder / p, p) for p in figures) if figures else
                                          "<p class='note'>no figures</p>"))
    first = next((folder / r["name"] for r in summary["runs"] if (folder / r["name"]).is_dir()), None)
    if first is not None:
        sections.append(_machine_section(first))
    sections.append("<h2>Recipe</h2>" + _table(["option", "value"], [[k.replace("_", "-"), v] for k, v in
                                                                   summary.get("recipe", {}).items()]))
    out = folder / "report.html"
    out.write_text(_page(f"reslab comparison {folder.name}", sections))
    return out


def report(path: str | Path, samples: int | None = None, evaluate: bool = True) -> Path:
    """``report.html`` for a run directory or a comparison directory, whichever ``path`` is."""
    path = Path(path)
    if (path / "summary.json").is_file():
        return compare_report(path)
    if (path / rundir.CONFIG_FILE).is_file():
        return run_report(path, samples, evaluate)
    raise UserError(f"{path} is neither a run directory (config.yaml) nor a comparison (summary.json)")
