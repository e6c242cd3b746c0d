"""The presets (``--preset``) and the budget rules of the presets whose choices depend on ``--time-budget``.

Plain data: each preset is a set of ``TrainConfig`` field values, applied over the defaults (``config.make_config``);
each comment says where the values come from and names what deviates from the source recipe.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # The seed tutorial exactly: its ResNet-18 (7x7/2 stem, no max-pool) on 64x64 crops, batch 8, SGD lr 0.001
    # momentum 0.9, StepLR(step_size=10, gamma=0.1) per epoch, 3 epochs, no weight decay. (The seed also never
    # called its scheduler's step(); with 3 epochs and step_size 10 the lr would not have changed anyway.)
    "seed": dict(arch="resnet18", stem="seed", augment="seed", image_size=64, batch_size=8, lr=0.001, momentum=0.9,
                 weight_decay=0.0, schedule="step", schedule_unit="epoch", step_size=10, gamma=0.1, epochs=3,
                 shuffle=True, drop_last=True),
    # He et al. 2015, section 4.2: batch 128, lr 0.1 / 10 at 32k and 48k iterations, stop at 64k, weight decay 1e-4
    # on every weight (as in their Torch/Caffe code), momentum 0.9, pad-4 crop + flip. Add --val-split 5000 for
    # the 45k/5k split the paper tuned on.
    "paper": dict(arch="resnet20", augment="paper", batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                  decay_bn_bias=True, schedule="multistep", schedule_unit="step", milestones=[32000, 48000],
                  gamma=0.1, steps=64000, nesterov=False, warmup=0),
    # Time-to-accuracy on CIFAR-10, after the public fast trainers (airbench, the ResNet-9 DAWNBench
    # entries): a small residual net with a whitened stem, Nesterov SGD with a short warm-up and a linear decay to
    # zero, label smoothing 0.2, frozen BatchNorm scales with a 64x bias learning rate, lookahead weight averaging,
    # 2-px reflected translations and flips, flip test-time augmentation. Batch 256 / lr 0.75: more steps beat
    # bigger batches at these budgets on a CPU. Weight decay 2e-3 (1.5e-3 per step at the peak lr) is not airbench's
    # (its decoupled 0.0153 per 1,024 images would be 5e-4 per step at batch 256). The measurements behind these are in
    # the README ("The fast preset"). The net and the TTA grow with --time-budget: BUDGET_RULES below.
    "fast": dict(arch="resnet9s", augment="fast", batch_size=256, lr=0.75, momentum=0.85, nesterov=True,
                 weight_decay=2e-3, decay_bn_bias=True, freeze_bn_scale=True, bias_lr_scale=64.0, lookahead=True,
                 label_smoothing=0.2, schedule="linear", schedule_unit="epoch", warmup=0.3, epochs=8,
                 channels_last=True, eval_every=0, tta="flip", accuracy_marks=[0.85, 0.90, 0.91, 0.93]),
    # Fine-tuning an ImageNet ResNet-18 on a folder of photos (README, "Your own photos"): pretrained weights, all
    # layers trained, AdamW lr 1e-3 with decoupled weight decay 0.05 and the new head at 10x, one warm-up epoch then
    # cosine, batch 32, 15 epochs. On a 500-image folder of classes the backbone never saw (two seeds, 112 px):
    # 70.1 % against 67.7 % for SGD 0.01 (head 1x) and 64.4 % for SGD 0.01 with the head at 10x; SGD at 0.03 was far
    # worse, label smoothing and EMA within noise. Augmentation and input size are left to the photo defaults.
    # He et al. Fig. 6 on a laptop CPU (`reslab compare --preset degradation`: plain20, plain56, resnet20, resnet56 with
    # this one recipe). The paper's nets, option-A shortcuts, paper augmentation and weight decay, on a class-balanced
    # 10,000-image subset for 10 epochs: one epoch of warm-up and a cosine decay, and residual branches that start at
    # zero (Goyal et al. 2017; a ResNet-only trick, a no-op for plain nets) so that the deep ResNet is not held back
    # by its start at lr 0.1 in so few steps. README "Depth" has the measurements that chose it.
    "degradation": dict(arch="resnet20", augment="paper", train_samples=10000, test_samples=2000, batch_size=128,
                        lr=0.1, momentum=0.9, weight_decay=1e-4, decay_bn_bias=True, schedule="cosine", warmup=1,
                        epochs=10, zero_init_residual=True),
    # The seed's decay lesson (`reslab compare --preset decay`: step, cosine, constant on ResNet-20): the seed's own
    # StepLR(step_size=10 epochs, x0.1), 15 epochs of 5,000 images at lr 0.1. (A decay every 5 epochs came too early:
    # the rate was 0.001 by epoch 11 and the constant rate overtook it; README "Depth".)
    "decay": dict(arch="resnet20", augment="paper", train_samples=5000, test_samples=1000, batch_size=128, lr=0.1,
                  momentum=0.9, weight_decay=1e-4, decay_bn_bias=True, schedule="step", schedule_unit="epoch",
                  step_size=10, gamma=0.1, epochs=15),
    "finetune": dict(arch="resnet18", pretrained="torchvision", optimizer="adamw", lr=0.001, weight_decay=0.05,
                     head_lr_scale=10.0, schedule="cosine", warmup=1, epochs=15, batch_size=32),
}


# Choices of a preset that depend on its --time-budget, keyed on the *epochs the budget buys here*: (from this many
# epochs on, these values; later rows win). The epochs are those of the preset's own net (resnet9s for fast),
# estimated at the start of the run from the measured step time (``training.tune``) and the time left, so a 5-minute
# run on a fast CPU gets the choices a 20-minute run gets on a slow one. The thresholds and the measurements that
# chose them are in the README ("The fast preset: accuracy against time").
BUDGET_RULES: dict[str, list[tuple[float, dict[str, Any]]]] = {
    # From 1 epoch of resnet9s: the two-conv GELU net (conv8m, 32/128/128) with Muon on its filters and its
    # whitening bias trained for 3 epochs, and the six test views for the 30 % least-confident test images (the
    # cost of flip alone, +0.1-0.15 over it); from 7.5 epochs the six views for every image.
    "fast": [(1.0, {"arch": "conv8m", "optimizer": "muon", "whiten_bias_epochs": 3, "tta": "flip_shift",
                    "tta_fraction": 0.3}),
             (7.5, {"tta": "flip_shift", "tta_fraction": 1.0})],
}


# The wider nets of a rule's family: once the rule above has chosen its net (conv8m for fast) and the budget buys at
# least ``at_least`` epochs *of the wider net itself* (timed at the start under the execution chosen for the first, one
# probe step each, widest first), the wider net trains instead, with ``values``. Measured (docs/results, "The fast
# preset's width against the budget", issue 33; Intel AMX, 2 threads, bf16, seed 1): at 10 minutes conv8w48 trained 6.7
# epochs to 88.37 % against conv8m's 11.9 epochs, 88.06 %, and conv8's 3.5 epochs, 87.52 %; so conv8w48 from 6.5 of its
# own epochs. conv8 from 10: the AMD EPYC runs (the peer at width 64, 10 epochs, 90.44 % against width 32, 19
# epochs, 89.07 %). On that machine type (docs/results, "The four budgets on the machine type", 2026-12-04, 2
# threads, bf16, seed 1) the rule trained conv8m 5.9 epochs at 5 minutes (86.86 %), conv8w48 7.3 and 9.6 epochs at 10
# and 13.2 (89.58, 90.00 %; the conv8m-only rule: 89.06, 89.39 % on another VM), and conv8 9.6 epochs at 20
# (90.45 %); conv8w48 at 20 minutes was not run beside it. Six views for the 30 % least-confident test images only: all
# six of the 10,000 test images cost ~40 s with conv8 here. Batch 512 at twice the SGD lr (Muon's lr unchanged): at 10
# minutes 88.84 % for conv8w48 (7.0 epochs) against 88.37 % at batch 256, and 88.46 against 88.06 % for conv8m (seed 1
# each); the thresholds are epochs at these batches. conv8m keeps batch 256 (not re-piloted at 5 minutes).
WIDE = {"batch_size": 512, "lr": 1.5, "tta_fraction": 0.3}
BUDGET_WIDTHS: dict[str, list[tuple[str, float, dict[str, Any]]]] = {
    "fast": [("conv8", 10.0, WIDE), ("conv8w48", 6.5, WIDE)],
}
