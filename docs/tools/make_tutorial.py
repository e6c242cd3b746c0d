"""Write docs/tutorial.ipynb from the cells below (edit here, then run this and execute the notebook; see
docs/architecture.md "The tutorial notebook")."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# The seed tutorial, step by step, with reslab

The tutorial reslab grew out of (a Chinese ResNet-18 walkthrough) builds a residual block, a down-sampling block,
ResNet-18, trains it on CIFAR-10 with and without a learning-rate decay, saves and reloads the weights, scores an
image folder, and recalls why deeper *plain* networks train worse. This notebook takes the same steps with reslab's
Python API, on the paper's networks done right (He et al. 2015, *Deep Residual Learning for Image Recognition*).

It runs in minutes on a laptop CPU. `RESLAB_TUTORIAL=small` (what the test suite sets) shrinks every run further;
`RESLAB_CIFAR10_DIR` points at a CIFAR-10 image folder (`train/<class>/`, `test/<class>/`)."""),
    ("code", """import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import reslab

SMALL = os.environ.get("RESLAB_TUTORIAL") == "small"
DATA = os.environ.get("RESLAB_CIFAR10_DIR", "../shared/data/cifar10-jpeg")
RUNS = Path(os.environ.get("RESLAB_TUTORIAL_RUNS", "runs/tutorial"))
SIZE = dict(train_samples=400, test_samples=200, epochs=3)
if not SMALL:
    SIZE = dict(train_samples=5000, test_samples=1000, epochs=15)
COMMON = dict(data=DATA, threads=1, precision="fp32", workers=0, force=True)
print("sizes:", SIZE)"""),
    ("md", """## 1. The residual block

A residual block learns a *residual* F(x) and adds its input back: y = F(x) + x (He et al., section 3.1). F is two
3x3 convolutions, each followed by BatchNorm, with a ReLU between them and after the sum. (The seed's block applied
*one* convolution and *one* BatchNorm twice, so its two layers shared weights; reslab's has two of each.)"""),
    ("code", """from reslab.models.resnet import BasicBlock

print(BasicBlock(64, 64))"""),
    ("md", """## 2. The down-sampling block

When a stage halves the image and doubles the channels, x no longer has F(x)'s shape. The shortcut then projects
it with a stride-2 1x1 convolution *and a BatchNorm* (the paper's option B, as torchvision builds it; the seed's
projection had no BatchNorm)."""),
    ("code", """from reslab.models.resnet import make_shortcut

print(BasicBlock(64, 128, stride=2, downsample=make_shortcut("B", 64, 128, 2)))"""),
    ("md", """## 3. ResNet-18

Four stages of two blocks each (64, 128, 256, 512 channels) after a stem. The seed used a 7x7/2 stem at 64 px and
declared a max-pool it never applied; `stem="seed"` is that stem without the pool, so that 64 px images are not
shrunk to 2x2 before the last stage. The layer names are torchvision's, so weights load both ways."""),
    ("code", """from reslab.models.complexity import summarize

net = reslab.create_model("resnet18", num_classes=10, stem="seed")
info = summarize(net, image_size=64)
print({k: info[k] for k in ("params", "macs", "output_shape") if k in info})
print(net.layer2)"""),
    ("md", """## 4. CIFAR-10 with the seed's augmentation

The seed resizes each 32 px image to 256, flips it at random, crops 64 px and jitters its colours, then normalises
with mean and std 0.5. Below: one image, and eight augmented views of it as training sees them."""),
    ("code", """from PIL import Image

from reslab.data import pil_transform

cat = sorted(Path(DATA, "train", "cat").iterdir())[0]
augment = pil_transform("seed", True, 64, (0.5,) * 3, (0.5,) * 3)
torch.manual_seed(0)
fig, axes = plt.subplots(1, 9, figsize=(13, 1.8))
axes[0].imshow(Image.open(cat))
axes[0].set_title("original", fontsize=8)
for ax in axes[1:]:
    x = augment(Image.open(cat).convert("RGB"))
    ax.imshow((x * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0))
for ax in axes:
    ax.axis("off")
plt.show()"""),
    ("md", """## 5. Training, with and without the step decay

The seed trains with cross-entropy and SGD (momentum 0.9) and divides the learning rate by 10 every 10 epochs
(StepLR). To see what the decay does, the same ResNet-20 is trained twice with one recipe, once with the step decay
and once at a constant rate (`--preset decay`; the decay comes after two thirds of the epochs). The falling rate lets
the loss settle into a lower basin where the constant rate keeps bouncing."""),
    ("code", """from reslab.core.rundir import read_metrics

step = 10 if not SMALL else 2  # the decay after two thirds of the epochs
runs = {}
for schedule in ("step", "constant"):
    result = reslab.train(preset="decay", out=RUNS / f"decay-{schedule}", schedule=schedule, step_size=step,
                          **SIZE, **COMMON)
    runs[schedule] = result
    print(f"{schedule:>8}: test accuracy {result.test_acc:.1%}")

fig, ax = plt.subplots(figsize=(6, 3.5))
for schedule, result in runs.items():
    epochs = [m for m in read_metrics(result.out) if "train_loss" in m]
    ax.plot([m["epoch"] for m in epochs], [m["train_loss"] for m in epochs], marker="o", label=schedule)
ax.set(xlabel="epoch", ylabel="training loss", title="step decay against a constant rate")
ax.legend()
plt.show()"""),
    ("md", """## 6. Saving, loading and scoring an image folder

Every run saves `model.safetensors` with its class names and normalisation. Loading it back and scoring the test
folder matches classes **by name** (the seed matched folder *indices*, which mislabels a folder holding some of the
classes) and uses the evaluation transform, not the random training one."""),
    ("code", """model, meta = reslab.load_model(runs["step"].out)
print(meta["arch"], meta["classes"])
scores = reslab.evaluate(runs["step"].out, DATA, samples=SIZE["test_samples"])
print(f"accuracy {scores.accuracy:.1%} on {scores.n} test images")
for name, acc in scores.per_class.items():
    print(f"  {name:>10}: {acc:.1%}")"""),
    ("code", """import numpy as np

confusion = np.array(scores.confusion)
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(confusion, cmap="Blues")
ax.set_xticks(range(10), scores.classes, rotation=90)
ax.set_yticks(range(10), scores.classes)
ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
plt.show()"""),
    ("md", """## 7. Depth: plain nets degrade, residual nets improve

He et al. (section 4.2, Fig. 6) found that a 56-layer *plain* net has a higher training error than a 20-layer one —
not overfitting, an optimisation difficulty — while the residual versions improve with depth. `--preset degradation`
trains plain20, plain56, resnet20 and resnet56 with one recipe. At this notebook's size the gap is small and noisy;
the full-size measurement (two seeds, 10,000 images) is in the results pages."""),
    ("code", """from reslab.config.schema import make_config
from reslab.insight.compare import compare

depth = dict(SIZE, epochs=2 if SMALL else 10)
config = make_config("degradation", data=DATA, threads=1, precision="fp32", workers=0, **depth)
summary = compare(config, archs=["plain20", "plain56", "resnet20", "resnet56"], out=RUNS / "depth")
for row in summary["runs"]:
    print(f"{row['name']:>9}: train error {row['final_train_error']:.1%}, test error {row['final_test_error']:.1%}")
for lesson in summary["lessons"]:
    print(lesson["text"])"""),
    ("code", """from IPython.display import Image as Show

Show(filename=str(RUNS / "depth" / "depth.png"))"""),
    ("md", """## Where next

- `reslab train --preset seed --data PATH` is the tutorial's exact recipe; `--preset paper` is He et al.'s.
- [Models and training](training.md), [your own photos](photos.md), [measured results](results/index.md)."""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


if __name__ == "__main__":
    nbformat.write(build(), Path(__file__).resolve().parents[1] / "tutorial.ipynb")
