"""Comparisons: runs, reuse of finished runs, report, summary and figures from tiny runs."""

from __future__ import annotations

import json

from conftest import make_folder


def _args(folder):
    return ["--data", folder, "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--precision", "fp32",
            "--train-samples", "24", "--test-samples", "12"]


def test_compare_archs_writes_report_summary_and_figures(tmp_path, cli):
    folder = make_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "cmp"
    code, stdout, err = cli("compare", "--archs", "plain20,resnet20", *_args(folder), "--out", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["runs"]}
    assert set(rows) == {"plain20", "resnet20"} and rows["plain20"]["params"] == rows["resnet20"]["params"]
    for name, r in rows.items():  # the summary's numbers are the runs' own metrics
        last = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert r["final_test_error"] == 1 - last["test_acc"] and r["final_train_error"] == 1 - last["train_acc"]
        assert r["depth"] == 20 and r["epochs"] == 2
    report = (out / "report.md").read_text()
    assert "| plain20 | 20 |" in report and "![curves.png](curves.png)" in report
    for fig in ("curves.png", "depth.png"):
        assert (out / fig).stat().st_size > 5000

    # Finished runs are reused, not retrained.
    mtime = (out / "resnet20" / "model.safetensors").stat().st_mtime_ns
    code, stdout, err = cli("compare", "--archs", "plain20,resnet20", *_args(folder), "--out", out)
    assert code == 0 and "reused" in err + stdout
    assert (out / "resnet20" / "model.safetensors").stat().st_mtime_ns == mtime


def test_compare_schedules_and_plot_command(tmp_path, cli):
    folder = make_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "sched"
    code, _, err = cli("compare", "--schedules", "step,constant", "--arch", "resnet20", "--step-size", "1",
                       *_args(folder), "--out", out)
    assert code == 0, err
    assert {r["schedule"] for r in json.loads((out / "summary.json").read_text())["runs"]} == {"step", "constant"}
    assert (out / "loss.png").stat().st_size > 5000
    lrs = [json.loads(l)["lr"] for l in (out / "step" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[1] < lrs[0]  # the step schedule decayed, the constant one did not
    png = tmp_path / "lr.png"
    code, _, _ = cli("plot", out / "step", out / "constant", "--out", png, "--metric", "lr")
    assert code == 0 and png.stat().st_size > 5000
    code, _, err = cli("compare", "--archs", "resnet19", *_args(folder), "--out", tmp_path / "bad")
    assert code != 0 and "unknown model" in err
