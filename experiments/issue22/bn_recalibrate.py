"""Issue 22 pilot: does recomputing BatchNorm statistics after training (a pass over training batches in train mode,
cumulative average, no gradient; what SWA's update_bn does after weight averaging) change a finished fast run's test
accuracy? Usage: python experiments/issue22/bn_recalibrate.py DATA RUN [RUN ...]"""

import sys

import torch

from reslab.core.execution import autocast
from reslab.data import Batches, BatchTransform, load_data
from reslab.inference.evaluate import evaluate_batches
from reslab.models.checkpoint import load_model

data_dir, runs = sys.argv[1], sys.argv[2:]
torch.set_num_threads(1)
for run in runs:
    model, meta = load_model(run)
    data = load_data(data_dir, augment=meta["augment"], input_size=meta["input_size"])
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    test = Batches(data.test, BatchTransform(meta["augment"], False, 32, mean, std), 500, shuffle=False,
                   drop_last=False, seed=0, device=torch.device("cpu"))
    dev = torch.device("cpu")
    before = evaluate_batches(model, test, dev, "bf16", 10, meta["tta"], meta.get("tta_fraction") or 1.0).accuracy
    for images in (2560, 10240):
        model, _ = load_model(run)
        train = Batches(data.train, BatchTransform(meta["augment"], True, 32, mean, std), 256, shuffle=True,
                        drop_last=True, seed=1, device=dev)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
        model.train()
        with torch.no_grad(), autocast(dev, "bf16"):
            for i, (x, _) in enumerate(train.epoch(0)):
                if i * 256 >= images:
                    break
                model(x)
        after = evaluate_batches(model, test, dev, "bf16", 10, meta["tta"], meta.get("tta_fraction") or 1.0).accuracy
        print(f"{run}: test acc {before:.4f} as saved, {after:.4f} with BatchNorm statistics recomputed on "
              f"{images} training images", flush=True)
