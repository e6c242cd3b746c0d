"""Training configuration: one typed dataclass, and the presets that fill it.

Precedence, lowest first: the dataclass defaults, then ``--preset``, then ``--config FILE.yaml``, then flags.
The fully resolved config is written to every run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .errors import ConfigError
from .presets import BUDGET_RULES, PRESETS

MAX_IMAGE_SIZE = 1024  # pixels per side; a model file whose metadata asks for more is refused too (checkpoint.py)

Augment = Literal["seed", "paper", "fast", "photo", "none"]
Schedule = Literal["step", "multistep", "cosine", "onecycle", "linear", "constant"]
TTA = Literal["none", "flip", "flip_shift"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    """Everything one training run depends on."""

    # --- model ---
    arch: str = "resnet20"
    """Model name (see `reslab models`)."""
    stem: Optional[Literal["imagenet", "cifar", "seed"]] = None
    """Stem variant for the ImageNet-style nets: imagenet (7x7/2 + max-pool), cifar (3x3/1), seed (7x7/2, no pool)."""
    shortcut: Optional[Literal["A", "B", "C"]] = None
    """Shortcut option of He et al. section 3.3 (default: A for the CIFAR nets, B for the ImageNet nets)."""
    zero_init_residual: bool = False
    """Start the last BatchNorm of every residual branch at zero (Goyal et al. 2017); no effect on plain nets."""

    # --- data ---
    data: str = "cifar10"
    """'cifar10' (torchvision download), 'digits' (scikit-learn, offline) or a folder with train/ and test/."""
    data_dir: Optional[str] = None
    """Where --data cifar10 is stored or downloaded (default: $RESLAB_DATA, else ./data)."""
    train_samples: Optional[int] = None
    """Use a seeded, class-balanced subset of this many training images."""
    test_samples: Optional[int] = None
    """Use a seeded, class-balanced subset of this many test images."""
    val_split: int = 0
    """Hold out this many training images (class-balanced) as a validation set, e.g. 5000 as in the paper."""
    augment: Optional[Augment] = None
    """Augmentation preset: seed (resize 256, flip, crop 64, colour jitter), paper (pad 4, crop, flip),
    fast (reflect-pad 2, crop, flip), photo (random-resized crop + flip; resize + centre crop to evaluate), none.
    Default: photo for photos (images over 64 px) with the ImageNet-style nets, else paper."""
    flip: Literal["random", "alternate"] = "random"
    """Horizontal flips of the paper and fast augmentations in training: random (p=0.5 per image and epoch) or
    alternate (a random half first, then every image flipped every other epoch; in-memory and disk loaders)."""
    image_size: Optional[int] = None
    """Network input size in pixels (default: 224 for photo, 64 for seed, else 32)."""
    loader: Literal["auto", "memory", "disk", "stream"] = "auto"
    """memory: decode once (cached on disk), keep in memory, augment whole batches on the device; disk: the same,
    memory-mapped from the decode cache; stream: decode every image again every epoch (PIL, DataLoader). auto: memory
    up to $RESLAB_MEMORY_BUDGET (default 6G) of decoded pixels, else disk, else (no room for the cache) stream."""
    workers: int = 2
    """DataLoader worker processes for the stream loader."""

    # --- fine-tuning ---
    pretrained: Optional[str] = None
    """Start from pretrained weights: 'torchvision' (its ImageNet weights for --arch), a .pth/.pt/.safetensors file
    (torchvision, timm, reslab, Lightning or DDP layouts) or a reslab run directory. A new head replaces the
    classifier when the classes differ; the weights' normalisation is used."""
    freeze: bool = False
    """Train the new head only (a linear probe): the backbone's weights and BatchNorm statistics stay fixed."""
    head_lr_scale: float = 1.0
    """Multiply the learning rate of the classifier (fc) by this, e.g. 10 to train a new head faster."""
    auto_augment: Literal["none", "trivial", "rand"] = "none"
    """In training: TrivialAugmentWide (trivial) or RandAugment (rand), per image, before the crop."""
    random_erasing: float = 0.0
    """In training: erase a random rectangle of each image with this probability (timm's --reprob)."""
    mixup: float = 0.0
    """MixUp's Beta(alpha, alpha) (e.g. 0.2; 0: off). With --cutmix too, one of them per batch."""
    cutmix: float = 0.0
    """CutMix's Beta(alpha, alpha) (e.g. 1.0; 0: off)."""
    balance: Literal["none", "loss"] = "none"
    """loss: weight the cross-entropy by inverse class frequency, for imbalanced folders."""

    # --- optimisation ---
    epochs: float = 30
    """Training length in epochs (ignored when --steps is given)."""
    steps: Optional[int] = None
    """Training length in optimizer steps (iterations), overriding --epochs."""
    batch_size: int = 128
    """Images per optimizer step (global, across all processes)."""
    lr: float = 0.1
    """Peak learning rate."""
    optimizer: Literal["sgd", "adamw", "muon"] = "sgd"
    """sgd (with --momentum, --nesterov), adamw (decoupled weight decay, betas 0.9/0.999) or muon (orthogonalised
    momentum for the conv filters at --muon-lr, SGD as above for everything else)."""
    muon_lr: float = 0.24
    """--optimizer muon: peak learning rate of the conv filters (follows the same schedule as --lr)."""
    muon_momentum: float = 0.6
    """--optimizer muon: momentum (Nesterov) of the conv filters."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Use Nesterov momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    decay_bn_bias: bool = False
    """Also apply weight decay to BatchNorm parameters and biases."""
    freeze_bn_scale: bool = False
    """Keep every BatchNorm scale (gamma) at its initial value."""
    bn_momentum: Optional[float] = None
    """Weight of each batch in BatchNorm's running statistics (torch's convention; default torch's 0.1)."""
    bias_lr_scale: float = 1.0
    """Multiply the learning rate of BatchNorm biases by this (their weight decay is divided by it)."""
    whiten_bias_epochs: Optional[float] = None
    """Fast nets: train the whitening stem's bias for this many epochs only, then hold it (airbench: 3)."""
    lookahead: bool = False
    """Every 5 steps reset the weights to their running average (Zhang et al. 2019); the last step keeps the
    weights (the average is moved onto them)."""
    ema: Optional[float] = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999); it is what is evaluated and
    saved (torchvision's --model-ema)."""
    clip_grad: Optional[float] = None
    """Clip the gradients' global norm to this."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss."""
    schedule: Schedule = "cosine"
    """Learning-rate schedule: step, multistep, cosine, onecycle, linear (to zero after the warm-up) or constant."""
    schedule_unit: Literal["epoch", "step"] = "epoch"
    """Unit of --step-size, --milestones and --warmup."""
    step_size: float = 10
    """step schedule: multiply the lr by --gamma every this many units."""
    gamma: float = 0.1
    """Decay factor of the step and multistep schedules."""
    milestones: list[float] = field(default_factory=list)
    """multistep schedule: multiply the lr by --gamma at each of these (in --schedule-unit)."""
    warmup: float = 0
    """Linear warm-up from lr/10 over this many units (0: none)."""
    time_budget: Optional[float] = None
    """Minutes for the whole run, from process start to the final accuracy: the number of steps is sized from the
    throughput measured during the warm-up so that the schedule ends annealed inside the budget."""
    budget_rule: Optional[str] = None
    """The preset whose choices by time budget apply (set by --preset with --time-budget): it picks the net and the
    TTA from the epochs the budget buys on this machine, measured at the start (see reslab.presets.BUDGET_RULES)."""
    budget_keep: list[str] = field(default_factory=list)
    """Options the budget rule leaves as they are (those given explicitly)."""
    shuffle: bool = True
    """Reshuffle the training set every epoch."""
    drop_last: bool = True
    """Drop the last incomplete training batch of each epoch."""

    # --- execution ---
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    precision: Precision = "auto"
    """auto, fp32, bf16 (autocast) or fp16 (autocast + grad scaler, CUDA only)."""
    channels_last: Optional[bool] = None
    """Use the channels-last memory format (default: on, except fp32 on CPU)."""
    compile: bool = False
    """torch.compile the model (slow start; pays off on long runs)."""
    sync_bn: bool = False
    """Under torchrun, synchronise BatchNorm statistics across processes (SyncBatchNorm)."""
    threads: Optional[int] = None
    """CPU threads for torch (default: the cores this process may use)."""
    seed: int = 0
    """Seed of the initialisation, data order and augmentation."""
    out: Optional[str] = None
    """Run directory (default: runs/<arch>-<date>-<time>)."""
    checkpoint_every: int = 0
    """Also write last.pt every this many steps (0: only at the end of each epoch)."""
    strict: bool = False
    """Stop at the first unreadable image instead of skipping bad files with a warning."""
    tensorboard: bool = False
    """Also write TensorBoard event files into the run directory (pip install 'reslab[tensorboard]')."""
    eval_every: int = 1
    """Evaluate on the test (and validation) set every this many epochs (0: only at the end); the last always is."""
    tta: TTA = "none"
    """Test-time augmentation of the evaluations: none, flip (2 views) or flip_shift (flips and 1-px shifts, 6)."""
    tta_fraction: float = 1.0
    """Apply --tta only to this fraction of each evaluation batch whose plain prediction is least confident."""
    accuracy_marks: list[float] = field(default_factory=list)
    """Record the wall time at which test accuracy first reached each of these (e.g. 0.9), from weight snapshots
    taken during training and scored after it (outside --time-budget), so training is not slowed."""
    log_every: int = 100
    """Without a terminal, print the running loss every this many steps (the seed printed every 100)."""

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "lr": self.lr, "epochs": self.epochs, "log_every": self.log_every,
                    "step_size": self.step_size, "bias_lr_scale": self.bias_lr_scale,
                    "head_lr_scale": self.head_lr_scale, "muon_lr": self.muon_lr, "clip_grad": self.clip_grad or 1,
                    "time_budget": self.time_budget or 1}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("train_samples", "test_samples", "steps", "image_size", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be an integer from 0 to 2**63 - 1, got {self.seed}")
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            raise ConfigError(f"--image-size {self.image_size} is over the {MAX_IMAGE_SIZE} px reslab trains at (a "
                              f"photo net's usual 224-512 px with room)")
        if self.eval_every < 0 or not all(0 < a <= 1 for a in self.accuracy_marks):
            raise ConfigError("--eval-every must not be negative and --accuracy-marks must lie in (0, 1]")
        if min(self.val_split, self.workers, self.checkpoint_every, self.weight_decay, self.warmup) < 0:
            raise ConfigError("--val-split, --workers, --checkpoint-every, --weight-decay and --warmup must not be "
                             "negative")
        if not 0 <= self.random_erasing <= 1 or min(self.mixup, self.cutmix) < 0:
            raise ConfigError("--random-erasing is a probability in [0, 1]; --mixup and --cutmix are alphas >= 0")
        if not 0 < self.tta_fraction <= 1:
            raise ConfigError(f"--tta-fraction is a fraction in (0, 1], got {self.tta_fraction}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"--ema is a decay in (0, 1), e.g. 0.999; got {self.ema}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"--bn-momentum is a weight in (0, 1], e.g. 0.1; got {self.bn_momentum}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("--schedule multistep needs --milestones")

    @property
    def input_size(self) -> int:
        """Network input size in pixels."""
        return self.image_size or {"seed": 64, "photo": PHOTO_SIZE}.get(self.augment or "", 32)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``create_model`` beyond ``num_classes``."""
        kwargs: dict[str, Any] = {"stem": self.stem, "shortcut": self.shortcut}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self.zero_init_residual:
            kwargs["zero_init_residual"] = True
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PHOTO_SIZE = 224  # the ImageNet nets' input size (torchvision's recipe), for photos
PHOTO_MIN_SIDE = 64  # images whose typical shorter side is larger than this are photos, not CIFAR-sized


def resolve_inputs(cfg: TrainConfig, family: str, image_wh: tuple[int, int] | None) -> tuple[TrainConfig, str | None]:
    """Fill in the augmentation and input size that ``cfg`` leaves to reslab (``None``), from the model family and the
    typical image size (w, h) of the data. Returns the resolved config and a line that says what was chosen.

    CIFAR-sized data (and any explicit --augment) keeps the paper augmentation at 32 px (64 for seed); photos get the
    photo augmentation at 224 px with the ImageNet-style nets, which were designed for them.
    """
    if cfg.augment is not None:
        return dataclasses.replace(cfg, image_size=cfg.input_size), None
    photo = image_wh is not None and min(image_wh) > PHOTO_MIN_SIDE
    seen = f"images ~{image_wh[0]}x{image_wh[1]} px" if image_wh else ""
    if photo and family == "imagenet":
        size = cfg.image_size or PHOTO_SIZE
        return (dataclasses.replace(cfg, augment="photo", image_size=size),
                f"{seen}: training at {size} px with the photo augmentation; --image-size/--augment to change")
    resolved = dataclasses.replace(cfg, augment="paper", image_size=cfg.image_size or 32)
    if photo:
        return resolved, (f"{seen}: {cfg.arch} is a CIFAR-style net, so they are shrunk to {resolved.image_size} px "
                          f"(an ImageNet-style net such as --arch resnet18 trains on photos at {PHOTO_SIZE} px)")
    return resolved, None


def budget_choices(preset: str | None, epochs: float | None, keep: Collection[str] = ()) -> dict[str, Any]:
    """The values ``preset``'s rule picks for a budget that buys ``epochs`` of its own net (empty without a rule),
    less the options in ``keep`` (given explicitly); nothing when ``keep`` holds ``config`` (a config file decides)."""
    choices: dict[str, Any] = {}
    for at_least, values in BUDGET_RULES.get(preset or "", []):
        if epochs is not None and epochs >= at_least and "config" not in keep:
            choices.update({k: v for k, v in values.items() if k not in keep})
    return choices


def budget_rule_fields(preset: str | None, minutes: float | None, given: Collection[str]) -> dict[str, Any]:
    """The config fields that hand a budgeted run to ``preset``'s rule (empty when it has none or no budget)."""
    if not minutes or preset not in BUDGET_RULES or "config" in given:
        return {}
    chosen = {k for _, values in BUDGET_RULES[preset] for k in values}
    keep = set(given) | {k for g in given for k in LINKED.get(g, ())}
    return {"budget_rule": preset, "budget_keep": sorted(chosen & keep)}


# Options a budget rule sets together: an explicit --arch keeps the recipe that goes with it, an explicit --tta
# or --tta-fraction the other half of the test-time augmentation.
LINKED = {"arch": ("optimizer", "whiten_bias_epochs"), "tta": ("tta_fraction",), "tta_fraction": ("tta",)}


def make_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """A validated config: dataclass defaults, then the ``preset`` (handing a ``time_budget`` run to the preset's
    budget rule, which decides at the start of the run), then ``overrides``."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values.update(budget_rule_fields(preset, overrides.get("time_budget", values.get("time_budget")), overrides))
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    return TrainConfig(**values)
