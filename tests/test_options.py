"""The config in sections, the command line made from it, and the benchmark built from training's own parts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from reslab.config import schema
from reslab.config.schema import NOT_RECIPE, RESUMABLE, SECTIONS, TrainConfig, make_config
from reslab.core.errors import ConfigError
from reslab.insight.compare import recipe_differences
from reslab.training import build


def test_every_field_has_a_section_and_the_two_lists_come_from_them():
    sections = {f.name: f.metadata["section"] for f in dataclasses.fields(TrainConfig)}
    assert set(sections.values()) <= set(SECTIONS) and len(sections) == len(dataclasses.fields(TrainConfig))
    assert {n for n, s in sections.items() if SECTIONS[s].resumable} == RESUMABLE
    assert {n for n, s in sections.items() if not SECTIONS[s].recipe} == NOT_RECIPE
    # What a resumed run may change is what it could before the sections (length, evaluation, execution), and the
    # checkpointing and fault options added since.
    assert {"epochs", "steps", "eval_every", "tta", "tta_fraction", "log_every", "tensorboard",
                         "checkpoint_every", "device", "precision", "threads", "workers", "loader", "compile",
                         "channels_last", "strict", "data_dir", "checkpoint_every_minutes",
                         "keep_checkpoints", "collective_timeout"} == RESUMABLE
    # The four fields the two hand-kept lists disagreed on, decided: arithmetic is execution, TTA is measurement.
    assert {"precision", "channels_last"} <= RESUMABLE & NOT_RECIPE
    assert {"eval_every", "tta"} <= RESUMABLE - NOT_RECIPE
    assert not {"arch", "lr", "seed", "batch_size", "augment", "accuracy_marks", "time_budget", "out"} & RESUMABLE


def test_a_comparison_reuses_a_run_that_differs_only_in_how_it_computed():
    requested = make_config("paper", steps=10, precision="bf16", channels_last=True, tta="flip")
    saved = {**requested.to_dict(), "precision": "fp32", "channels_last": False, "threads": 1}
    assert recipe_differences(saved, requested) == []
    saved["tta"] = "none"
    assert recipe_differences(saved, requested) == ["--tta 'none' (asked 'flip')"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": float("nan")}, "--lr must be positive, got nan"),
    ({"workers": -1}, "--workers must not be negative, got -1"),
    ({"accuracy_marks": [0.5, 1.5]}, "--accuracy-marks is an accuracy in (0, 1]; got 1.5"),
    ({"ema": 1.0}, "--ema is a decay in (0, 1), e.g. 0.999; got 1.0"),
    ({"random_erasing": 2}, "--random-erasing is a probability in [0, 1]; got 2"),
    ({"schedule": "multistep"}, "--schedule multistep needs --milestones"),
])
def test_each_section_checks_its_own_fields(kwargs, message):
    with pytest.raises(ConfigError) as e:
        make_config(**kwargs)
    assert str(e.value) == message
    section = next(f.metadata["section"] for f in dataclasses.fields(TrainConfig) if f.name in kwargs)
    bad = make_config()
    for key, value in kwargs.items():
        setattr(bad, key, value)  # after __post_init__, to ask the section alone
    assert bad.section_problem(section) == message
    assert all(bad.section_problem(s) is None for s in SECTIONS if s != section)


def _parsed(*argv: str):
    from reslab.cli.commands import _parse

    _command, args, given = _parse(list(argv))
    return args, given


def test_switches_spellings_and_given_options():
    for argv, nesterov in ((["--nesterov"], True), (["--nesterov", "false"], False), (["--nesterov=true"], True),
                           (["--no-nesterov"], False), ([], False)):
        args, given = _parsed("train", *argv)
        assert args["nesterov"] is nesterov and given == ({"nesterov"} if argv else set())
    args, given = _parsed("train", "--image-size", "48", "--train_samples", "10", "--preset", "seed")
    assert (args["image_size"], args["train_samples"], args["arch"]) == (48, 10, "resnet18")
    assert given == {"image_size", "train_samples", "preset"}
    args, given = _parsed("predict", "run", "a.png", "b.png", "--json", "--topk", "2")
    assert (args["model"], args["inputs"], args["json"], args["topk"]) == ("run", ["a.png", "b.png"], True, 2)


def test_a_config_file_is_read_first_and_flags_win_wherever_they_stand(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.5, "batch_size": 32, "channels_last": None, "nesterov": True}))
    args, given = _parsed("train", "--batch-size", "16", "--config", str(path), "--preset", "seed")
    assert (args["lr"], args["batch_size"], args["nesterov"], args["arch"]) == (0.5, 16, True, "resnet18")
    assert given == {"batch_size", "config", "preset"}  # the file's values are not options given one by one


def test_a_saved_config_yaml_round_trips_through_the_command_line(tmp_path):
    cfg = make_config("fast", time_budget=5, accuracy_marks=[0.9], milestones=[3.0], out=str(tmp_path / "r"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    args, _ = _parsed("train", "--config", str(path))
    for key in ("preset", "config", "resume", "data_changed", "force"):
        args.pop(key)
    assert TrainConfig(**args) == cfg


@pytest.mark.parametrize(("content", "message"), [
    ("lr: 0.1\nnot_an_option: 3\n", "unknown options not_an_option"),
    ("- 1\n- 2\n", "holds no options"),
    ("lr: [unclosed\n", "is not YAML"),
])
def test_a_bad_config_file_is_one_line(tmp_path, cli, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, _, err = cli("train", "--config", path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_train_help_groups_the_options_by_section(cli, capsys):
    with pytest.raises(SystemExit):
        cli("train", "--help")
    out = capsys.readouterr().out
    titles = [s.title + ":" for s in SECTIONS.values()]
    positions = [out.index(t) for t in titles]
    assert positions == sorted(positions)
    assert out.index("\n  --arch ARCH") > out.index("the network:") and "--no-nesterov" in out


def test_bench_times_the_loops_step_on_the_parts_training_builds():
    from reslab.training.bench import _bench_data
    from reslab.training.loop import step
    from reslab.training.optim import SGD

    cfg = make_config("fast", batch_size=8, steps=4, precision="fp32", channels_last=False, log_every=10**9,
                      whiten_bias_epochs=3)
    data = _bench_data(cfg, None, 32)
    run = build.bare_run(cfg, data, torch.device("cpu"), "fp32")
    assert [type(h).__name__ for h in run.hooks] == ["Lookahead", "WhiteningBiasWindow"]
    trained = build.build_optimizer(cfg, build.build_model(cfg, data, torch.device("cpu"), "fp32", None, None))
    assert isinstance(run.optimizer, SGD) and type(run.optimizer) is type(trained)
    assert [g["lr_scale"] for g in run.optimizer.param_groups] == [g["lr_scale"] for g in trained.param_groups]
    before = [a.clone() for a in run.hooks[0].average]
    for x, y in run.train_batches.epoch(0):
        step(run, x, y)
    assert run.step == 4 and run.meter.seen == 32
    assert any(not torch.equal(a, b) for a, b in zip(before, run.hooks[0].average))  # the lookahead acted


def test_config_module_exposes_sections_in_order():
    assert list(SECTIONS) == ["model", "data", "augmentation", "fine_tuning", "optimisation", "length", "budget",
                              "evaluation", "execution", "output"]
    assert [f.name for f in schema.fields_of("length")] == ["epochs", "steps"]
