"""The command line: help texts, models, summary, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reslab.cli.commands import COMMANDS, build_parser, subcommand_parser
from reslab.models import list_models

from helpers import reslab_cmd


def test_help_lists_every_subcommand():
    out = subprocess.run(reslab_cmd("--help"), capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_help_describes_every_option(name, cli, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    sub = subcommand_parser(name)
    for action in sub._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt not in ("--help", "--print_config"):
                assert opt in out
                assert action.help, f"{name} {opt} has no help text"


def test_models_lists_the_registry(cli):
    code, out, _ = cli("models")
    assert code == 0
    for name in list_models():
        assert name in out
    assert "269,722" in out  # resnet20
    code, out, _ = cli("models", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["name"] for r in rows] == list_models()


def test_summary_of_the_seed_network(cli):
    code, out, _ = cli("summary", "resnet18", "--image-size", "64", "--stem", "seed")
    assert code == 0
    assert "11,181,642" in out and "(1, 10)" in out and "(1, 3, 64, 64)" in out
    code, out, _ = cli("summary", "resnet56", "--json", "--num-classes", "100")
    s = json.loads(out)
    assert s["params"] == 853018 + 64 * 90 + 90 and s["output_shape"] == [1, 100]
    assert s["macs"] == pytest.approx(125.5e6, rel=0.01)


def test_user_errors_are_one_line_with_nonzero_status(cli, tmp_path):
    code, _out, err = cli("summary", "resnet19")
    assert code != 0 and "unknown model 'resnet19'" in err and "Traceback" not in err
    code, _, err = cli("eval", str(tmp_path / "missing"), "--data", "digits")
    assert code != 0 and "model not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("train", "--preset", "nope")
    assert code != 0 and "unknown preset" in err
    code, _, err = cli("train", "--data", "digits", "--batch-size", "0")
    assert code != 0 and "--batch-size must be positive" in err
    code, _, err = cli("train", "--batch-size", "abc")  # a bad option value: one line, not a screen of usage
    assert code == 2 and len(err.strip().splitlines()) == 1 and "reslab train --help" in err
    assert "--batch-size takes an integer, got 'abc'" in err
    code, _, err = cli("nosuchcommand")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_console_script_entry_point():
    script = Path(sys.executable).parent / "reslab"  # installed beside the interpreter running the tests
    out = subprocess.run([str(script), "summary", "resnet20"], capture_output=True, text=True)
    assert out.returncode == 0 and "269,722" in out.stdout


def test_bench_json_reports_the_whole_step_and_the_roof(cli, folder):
    code, out, err = cli("bench", "--preset", "paper", "--arch", "resnet20", "--batch-size", "8", "--steps", "2",
                         "--warmup", "1", "--data", folder, "--baseline", "--json", "--precision", "fp32")
    assert code == 0, err
    r = json.loads(out)
    for key in ("images_per_sec", "baseline_images_per_sec", "speedup", "gflops_per_sec", "roof_gflops_per_sec",
                "roof_fraction", "device", "threads", "precision", "batch_size", "eval_images_per_sec"):
        assert key in r
    assert r["images_per_sec"] > 0 and r["baseline_images_per_sec"] > 0 and r["precision"] == "fp32"
    assert r["speedup"] == pytest.approx(r["images_per_sec"] / r["baseline_images_per_sec"], abs=0.02)
    assert r["gflops_per_sec"] == pytest.approx(6 * r["macs"] * r["images_per_sec"] / 1e9, abs=0.2)
    assert r["roof_fraction"] == pytest.approx(r["gflops_per_sec"] / r["roof_gflops_per_sec"], abs=0.002)
    code, _, err = cli("bench", "--baseline")
    assert code != 0 and "--data" in err
