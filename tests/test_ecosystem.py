"""Export (ONNX, TorchScript) with parity, torch.hub, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import reslab
from reslab.models.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[1]


def _saved(tmp_path, arch, size, **kwargs):
    model = reslab.create_model(arch, num_classes=10, **kwargs)
    for m in model.modules():  # non-trivial statistics so eval-mode parity means something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{arch}.safetensors"
    save_model(path, model, {"arch": arch, "model_kwargs": kwargs, "classes": [str(i) for i in range(10)],
                             "input_size": size, "augment": "paper", "mean": [0.5] * 3, "std": [0.25] * 3})
    return path


@pytest.mark.parametrize("arch,size,kwargs", [("resnet20", 32, {}), ("resnet18", 64, {"stem": "seed"})])
def test_onnx_export_parity_with_dynamic_batch(tmp_path, cli, arch, size, kwargs):
    pytest.importorskip("onnxruntime")
    model = _saved(tmp_path, arch, size, **kwargs)
    out = tmp_path / "m.onnx"
    code, stdout, err = cli("export", model, "--format", "onnx", "--out", out, "--json")
    assert code == 0, err
    r = json.loads(stdout)  # nothing but JSON on stdout, exporter chatter goes to stderr
    assert r["ok"] and r["max_abs_diff"] <= 1e-4 and out.stat().st_size > 100_000
    import onnxruntime as ort  # the batch dimension is dynamic: run another batch size directly
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": torch.randn(5, 3, size, size).numpy()})[0].shape == (5, 10)


def test_torchscript_export_parity(tmp_path, cli):
    model = _saved(tmp_path, "resnet50", 64)
    code, stdout, err = cli("export", model, "--format", "torchscript", "--out", tmp_path / "m.ts")
    assert code == 0 and "OK" in stdout, err
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    assert loaded(torch.randn(4, 3, 64, 64)).shape == (4, 10)


def test_torch_hub_builds_every_registered_model():
    for name in ("resnet20", "plain56", "resnet18"):
        model = torch.hub.load(str(ROOT), name, source="local", num_classes=7)
        assert model.fc.out_features == 7
    import importlib.util
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    assert all(callable(getattr(hub, name)) for name in reslab.list_models())


def test_tensorboard_event_files_appear_when_asked(tmp_path, folder, cli):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    code, _, err = cli("train", "--data", folder, "--out", run, "--arch", "resnet20", "--epochs", "1",
                       "--batch-size", "8", "--precision", "fp32", "--tensorboard")
    assert code == 0, err
    events = list(run.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0 and (run / "metrics.jsonl").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert {"train_loss", "test_acc", "lr"} <= set(acc.Tags()["scalars"])
