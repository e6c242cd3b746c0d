"""Training configuration: one typed dataclass whose fields are grouped in sections, and the presets that fill it.

Precedence, lowest first: the dataclass defaults, then ``--preset``, then ``--config FILE.yaml``, then flags.
The fully resolved config is written to every run directory as ``config.yaml`` (flat: the sections are metadata, so
flags and saved files name a field the same way).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..core.errors import ConfigError
from .presets import BUDGET_RULES, BUDGET_WIDTHS, PRESETS

MAX_IMAGE_SIZE = 1024  # pixels per side; a model file whose metadata asks for more is refused too (checkpoint.py)

Augment = Literal["seed", "paper", "fast", "photo", "none"]
Schedule = Literal["step", "multistep", "cosine", "onecycle", "linear", "constant"]
TTA = Literal["none", "flip", "flip_shift"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Section:
    """A group of options, and what a run may do with them once it has started."""

    name: str
    title: str
    resumable: bool
    """May change when a run is resumed (``reslab train --resume RUN --epochs 60``)."""
    recipe: bool
    """Part of what ``reslab compare`` requires of a saved run before reusing it (it changes what is measured)."""


# Where a field belongs decides, in one place, what may change on resume and what a comparison compares. Decided
# for the fields that used to sit in two hand-kept lists that disagreed: precision and channels_last are how the
# arithmetic is done (execution: resumable on another machine, not a different recipe); eval_every and tta change
# what is reported, not what is learned (evaluation: resumable, but a comparison only reuses a run evaluated alike).
SECTIONS: dict[str, Section] = {s.name: s for s in (
    Section("model", "the network", resumable=False, recipe=True),
    Section("data", "the images", resumable=False, recipe=True),
    Section("augmentation", "training augmentation", resumable=False, recipe=True),
    Section("fine_tuning", "fine-tuning from pretrained weights", resumable=False, recipe=True),
    Section("optimisation", "loss, optimizer, schedule and randomness", resumable=False, recipe=True),
    Section("length", "how long to train", resumable=True, recipe=True),
    Section("budget", "time budget and time-to-accuracy marks", resumable=False, recipe=True),
    Section("evaluation", "what is measured", resumable=True, recipe=True),
    Section("execution", "where and how it runs, and what it logs", resumable=True, recipe=False),
    Section("output", "the run directory", resumable=False, recipe=False),
)}


@dataclass(frozen=True)
class Range:
    """The values a numeric option (or each element of a list option) may take; ``None`` always passes."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    what: str = ""
    """What the value is, for the message (``a probability``)."""
    example: str = ""
    text: str = ""
    """The whole message after the flag, replacing the one made from the bounds."""

    def problem(self, flag: str, value: Any) -> str | None:
        """A one-line message when ``value`` lies outside the range, else ``None``."""
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            above = v > self.low or (v == self.low and not self.low_open)
            below = v < self.high or (v == self.high and not self.high_open)
            if above and below:
                continue
            if self.text:
                return f"{flag} {self.text}, got {v}"
            if self.high == math.inf:
                return f"{flag} {'must be positive' if self.low_open else 'must not be negative'}, got {v}"
            interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            return f"{flag} is {self.what} in {interval}{', e.g. ' + self.example if self.example else ''}; got {v}"
        return None


POSITIVE = Range(0, low_open=True)
NOT_NEGATIVE = Range(0)
MOMENTUM = Range(0, 1, high_open=True, what="a momentum", example="0.9")  # 1 or more: the steps never decay


def option(section: str, default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
           check: Range | None = None) -> Any:
    """A ``TrainConfig`` field in ``section``, with its allowed values."""
    assert section in SECTIONS, section
    metadata = {"section": section, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything one training run depends on."""

    arch: str = option("model", "resnet20")
    """Model name (see `reslab models`)."""
    stem: Optional[Literal["imagenet", "cifar", "seed"]] = option("model", None)
    """Stem variant for the ImageNet-style nets: imagenet (7x7/2 + max-pool), cifar (3x3/1), seed (7x7/2, no pool)."""
    shortcut: Optional[Literal["A", "B", "C"]] = option("model", None)
    """Shortcut option of He et al. section 3.3 (default: A for the CIFAR nets, B for the ImageNet nets)."""
    zero_init_residual: bool = option("model", False)
    """Start the last BatchNorm of every residual branch at zero (Goyal et al. 2017); no effect on plain nets."""

    data: str = option("data", "cifar10")
    """'cifar10' (torchvision download), 'digits' (scikit-learn, offline) or a folder with train/ and test/."""
    labels: Optional[str] = option("data", None)
    """A CSV or TSV naming each image's class: columns path (relative to --data), label and optionally split
    (train/val/test), for one folder of images (the Kaggle layout). Without a split column --test-split holds out the
    test set."""
    data_dir: Optional[str] = option("execution", None)
    """Where --data cifar10 is stored or downloaded (default: $RESLAB_DATA, else ./data)."""
    train_samples: Optional[int] = option("data", None, check=POSITIVE)
    """Use a seeded, class-balanced subset of this many training images."""
    test_samples: Optional[int] = option("data", None, check=POSITIVE)
    """Use a seeded, class-balanced subset of this many test images."""
    val_split: int = option("data", 0, check=NOT_NEGATIVE)
    """Hold out this many training images (class-balanced) as a validation set, e.g. 5000 as in the paper."""
    test_split: float = option("data", 0.2, check=Range(0, 1, low_open=True, high_open=True, what="a fraction"))
    """One folder of class folders (no train/): hold out this fraction of each class as the test set (fixed seed,
    duplicate groups kept on one side, recorded in the run's split.json). Folders with train/ and test/ ignore it."""
    augment: Optional[Augment] = option("augmentation", None)
    """Augmentation preset: seed (resize 256, flip, crop 64, colour jitter), paper (pad 4, crop, flip),
    fast (reflect-pad 2, crop, flip), photo (random-resized crop + flip; resize + centre crop to evaluate), none.
    Default: photo for photos (images over 64 px) with the ImageNet-style nets, else paper."""
    flip: Literal["random", "alternate"] = option("augmentation", "random")
    """Horizontal flips of the paper and fast augmentations in training: random (p=0.5 per image and epoch) or
    alternate (a random half first, then every image flipped every other epoch; in-memory and disk loaders)."""
    image_size: Optional[int] = option("data", None, check=POSITIVE)
    """Network input size in pixels (default: 224 for photo, 64 for seed, else 32)."""
    loader: Literal["auto", "memory", "disk", "stream"] = option("execution", "auto")
    """memory: decode once (cached on disk), keep in memory, augment whole batches on the device; disk: the same,
    memory-mapped from the decode cache; stream: decode every image again every epoch (PIL, DataLoader). auto: memory
    up to $RESLAB_MEMORY_BUDGET (default 6G) of decoded pixels, else disk, else (no room for the cache) stream."""
    workers: int = option("execution", 2, check=NOT_NEGATIVE)
    """DataLoader worker processes for the stream loader."""

    pretrained: Optional[str] = option("fine_tuning", None)
    """Start from pretrained weights: 'torchvision' (its ImageNet weights for --arch), a .pth/.pt/.safetensors file
    (torchvision, timm, reslab, Lightning or DDP layouts) or a reslab run directory. A new head replaces the
    classifier when the classes differ; the weights' normalisation is used."""
    freeze: bool = option("fine_tuning", False)
    """Train the new head only (a linear probe): the backbone's weights and BatchNorm statistics stay fixed."""
    head_lr_scale: float = option("fine_tuning", 1.0, check=POSITIVE)
    """Multiply the learning rate of the classifier (fc) by this, e.g. 10 to train a new head faster."""
    auto_augment: Literal["none", "trivial", "rand"] = option("augmentation", "none")
    """In training: TrivialAugmentWide (trivial) or RandAugment (rand), per image, before the crop."""
    random_erasing: float = option("augmentation", 0.0, check=Range(0, 1, what="a probability"))
    """In training: erase a random rectangle of each image with this probability (timm's --reprob)."""
    mixup: float = option("augmentation", 0.0, check=NOT_NEGATIVE)
    """MixUp's Beta(alpha, alpha) (e.g. 0.2; 0: off). With --cutmix too, one of them per batch."""
    cutmix: float = option("augmentation", 0.0, check=NOT_NEGATIVE)
    """CutMix's Beta(alpha, alpha) (e.g. 1.0; 0: off)."""
    balance: Literal["none", "loss"] = option("optimisation", "none")
    """loss: weight the cross-entropy by inverse class frequency, for imbalanced folders."""

    epochs: float = option("length", 30, check=POSITIVE)
    """Training length in epochs (ignored when --steps is given)."""
    steps: Optional[int] = option("length", None, check=POSITIVE)
    """Training length in optimizer steps (iterations), overriding --epochs."""
    batch_size: int = option("optimisation", 128, check=POSITIVE)
    """Images per optimizer step (global, across all processes)."""
    lr: float = option("optimisation", 0.1, check=POSITIVE)
    """Peak learning rate."""
    optimizer: Literal["sgd", "adamw", "muon"] = option("optimisation", "sgd")
    """sgd (with --momentum, --nesterov), adamw (decoupled weight decay, betas 0.9/0.999) or muon (orthogonalised
    momentum for the conv filters at --muon-lr, SGD as above for everything else)."""
    muon_lr: float = option("optimisation", 0.24, check=POSITIVE)
    """--optimizer muon: peak learning rate of the conv filters (follows the same schedule as --lr)."""
    muon_momentum: float = option("optimisation", 0.6, check=MOMENTUM)
    """--optimizer muon: momentum (Nesterov) of the conv filters."""
    momentum: float = option("optimisation", 0.9, check=MOMENTUM)
    """SGD momentum."""
    nesterov: bool = option("optimisation", False)
    """Use Nesterov momentum."""
    weight_decay: float = option("optimisation", 5e-4, check=NOT_NEGATIVE)
    """L2 weight decay."""
    decay_bn_bias: bool = option("optimisation", False)
    """Also apply weight decay to BatchNorm parameters and biases."""
    freeze_bn_scale: bool = option("optimisation", False)
    """Keep every BatchNorm scale (gamma) at its initial value."""
    bn_momentum: Optional[float] = option("model", None,
                                          check=Range(0, 1, low_open=True, what="a weight", example="0.1"))
    """Weight of each batch in BatchNorm's running statistics (torch's convention; default torch's 0.1)."""
    bias_lr_scale: float = option("optimisation", 1.0, check=POSITIVE)
    """Multiply the learning rate of BatchNorm biases by this (their weight decay is divided by it)."""
    whiten_bias_epochs: Optional[float] = option("optimisation", None, check=NOT_NEGATIVE)
    """Fast nets: train the whitening stem's bias for this many epochs only, then hold it (airbench: 3)."""
    lookahead: bool = option("optimisation", False)
    """Every 5 steps reset the weights to their running average (Zhang et al. 2019); the last step keeps the
    weights (the average is moved onto them)."""
    ema: Optional[float] = option("optimisation", None,
                                  check=Range(0, 1, low_open=True, high_open=True, what="a decay", example="0.999"))
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999); it is what is evaluated and
    saved (torchvision's --model-ema)."""
    clip_grad: Optional[float] = option("optimisation", None, check=POSITIVE)
    """Clip the gradients' global norm to this."""
    label_smoothing: float = option("optimisation", 0.0, check=Range(0, 1, high_open=True, what="a weight"))
    """Label smoothing of the cross-entropy loss."""
    schedule: Schedule = option("optimisation", "cosine")
    """Learning-rate schedule: step, multistep, cosine, onecycle, linear (to zero after the warm-up) or constant."""
    schedule_unit: Literal["epoch", "step"] = option("optimisation", "epoch")
    """Unit of --step-size, --milestones and --warmup."""
    step_size: float = option("optimisation", 10, check=POSITIVE)
    """step schedule: multiply the lr by --gamma every this many units."""
    gamma: float = option("optimisation", 0.1, check=POSITIVE)
    """Decay factor of the step and multistep schedules."""
    milestones: list[float] = option("optimisation", factory=list, check=NOT_NEGATIVE)
    """multistep schedule: multiply the lr by --gamma at each of these (in --schedule-unit)."""
    warmup: float = option("optimisation", 0, check=NOT_NEGATIVE)
    """Linear warm-up from lr/10 over this many units (0: none)."""
    time_budget: Optional[float] = option("budget", None, check=POSITIVE)
    """Minutes for the whole run, from process start to the final accuracy: the number of steps is sized from the
    throughput measured during the warm-up so that the schedule ends annealed inside the budget."""
    budget_rule: Optional[str] = option("budget", None)
    """The preset whose choices by time budget apply (set by --preset with --time-budget): it picks the net and the
    TTA from the epochs the budget buys on this machine, measured at the start (see config.presets.BUDGET_RULES)."""
    budget_keep: list[str] = option("budget", factory=list)
    """Options the budget rule leaves as they are (those given explicitly)."""
    shuffle: bool = option("optimisation", True)
    """Reshuffle the training set every epoch."""
    drop_last: bool = option("optimisation", True)
    """Drop the last incomplete training batch of each epoch."""

    device: str = option("execution", "auto")
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    precision: Precision = option("execution", "auto")
    """auto, fp32, bf16 (autocast) or fp16 (autocast + grad scaler, CUDA only)."""
    channels_last: Optional[bool] = option("execution", None)
    """Use the channels-last memory format (default: on, except fp32 on CPU)."""
    compile: bool = option("execution", False)
    """torch.compile the model (slow start; pays off on long runs)."""
    sync_bn: bool = option("model", False)
    """Under torchrun, synchronise BatchNorm statistics across processes (SyncBatchNorm)."""
    threads: Optional[int] = option("execution", None, check=POSITIVE)
    """CPU threads for torch (default: the cores this process may use)."""
    seed: int = option("optimisation", 0, check=Range(0, 2**63 - 1, text="must be an integer from 0 to 2**63 - 1"))
    """Seed of the initialisation, data order and augmentation."""
    out: Optional[str] = option("output", None)
    """Run directory (default: runs/<arch>-<date>-<time>)."""
    checkpoint_every: int = option("execution", 0, check=NOT_NEGATIVE)
    """Also write last.pt every this many steps (0: only at the end of each epoch)."""
    strict: bool = option("execution", False)
    """Stop at the first unreadable image instead of skipping bad files with a warning."""
    tensorboard: bool = option("execution", False)
    """Also write TensorBoard event files into the run directory (pip install 'reslab[tensorboard]')."""
    eval_every: int = option("evaluation", 1, check=NOT_NEGATIVE)
    """Evaluate on the test (and validation) set every this many epochs (0: only at the end); the last always is."""
    tta: TTA = option("evaluation", "none")
    """Test-time augmentation of the evaluations: none, flip (2 views) or flip_shift (flips and 1-px shifts, 6)."""
    tta_fraction: float = option("evaluation", 1.0, check=Range(0, 1, low_open=True, what="a fraction"))
    """Apply --tta only to this fraction of each evaluation batch whose plain prediction is least confident."""
    accuracy_marks: list[float] = option("budget", factory=list,
                                         check=Range(0, 1, low_open=True, what="an accuracy"))
    """Record the wall time at which test accuracy first reached each of these (e.g. 0.9), from weight snapshots
    taken during training and scored after it (outside --time-budget), so training is not slowed."""
    log_every: int = option("execution", 100, check=POSITIVE)
    """Without a terminal, print the running loss every this many steps (the seed printed every 100)."""
    checkpoint_every_minutes: Optional[float] = option("execution", None, check=POSITIVE)
    """Also write last.pt every this many minutes of training (decided by rank 0's clock under torchrun, so all
    ranks agree on the step): an epoch of a large photo folder can last hours."""
    keep_checkpoints: int = option("execution", 0, check=NOT_NEGATIVE)
    """Keep the last this many checkpoints as checkpoints/step-NNNNNNNN.pt beside last.pt (0: last.pt only); to go
    back to one, copy it over last.pt and --resume."""
    collective_timeout: float = option("execution", 600.0, check=POSITIVE)
    """Under torchrun, seconds a process waits for the others in one collective before it gives up and names the
    rank that did not answer (PyTorch's default is 30 minutes for gloo, 10 for NCCL)."""

    def __post_init__(self) -> None:
        for section in SECTIONS:
            problem = self.section_problem(section)
            if problem:
                raise ConfigError(problem)

    def section_problem(self, section: str) -> str | None:
        """What is wrong with the options of ``section`` (each field's range, then the section's own rules)."""
        for f in fields_of(section):
            check = f.metadata["check"]
            problem = check and check.problem("--" + f.name.replace("_", "-"), getattr(self, f.name))
            if problem:
                return problem
        if section == "data" and self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            return (f"--image-size {self.image_size} is over the {MAX_IMAGE_SIZE} px reslab trains at (a photo "
                    f"net's usual 224-512 px with room)")
        if section == "optimisation" and self.schedule == "multistep" and not self.milestones:
            return "--schedule multistep needs --milestones"
        return None

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


def fields_of(section: str) -> list[dataclasses.Field]:
    """The ``TrainConfig`` fields of ``section``, in their order."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata["section"] == section]


def _fields_where(keep: Callable[[Section], bool]) -> frozenset[str]:
    return frozenset(f.name for name, s in SECTIONS.items() if keep(s) for f in fields_of(name))


RESUMABLE = _fields_where(lambda s: s.resumable)
"""Options that may change when a run is resumed: its length, evaluation and execution."""
NOT_RECIPE = _fields_where(lambda s: not s.recipe)
"""Options a comparison ignores when it reuses a saved run: execution and the run directory."""


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


def rule_chooses(preset: str | None) -> set[str]:
    """The options ``preset``'s budget rule may set (``presets.BUDGET_RULES`` and ``presets.BUDGET_WIDTHS``)."""
    return ({k for _, values in BUDGET_RULES.get(preset or "", []) for k in values}
            | {k for _, _, values in BUDGET_WIDTHS.get(preset or "", []) for k in {"arch", *values}})


def budget_rule_fields(preset: str | None, minutes: float | None, given: Collection[str]) -> dict[str, Any]:
    """The config fields that hand a budgeted run to ``preset``'s rule (empty when it has none or no budget).

    The preset's accuracy marks are left out unless asked for (``given``): scoring them is post-training work that a
    budget would have to pay for (with them asked for, it does: ``hooks.eval_seconds``)."""
    if not minutes or preset not in BUDGET_RULES or "config" in given:
        return {}
    chosen = rule_chooses(preset)
    keep = set(given) | {k for g in given for k in LINKED.get(g, ())}
    fields: dict[str, Any] = {"budget_rule": preset, "budget_keep": sorted(chosen & keep)}
    if "accuracy_marks" not in given:
        fields["accuracy_marks"] = []
    return fields


# Options a budget rule sets together: an explicit --arch keeps the recipe that goes with it, an explicit --tta
# or --tta-fraction the other half of the test-time augmentation, an explicit --batch-size or --lr the other.
LINKED = {"arch": ("optimizer", "whiten_bias_epochs"), "tta": ("tta_fraction",), "tta_fraction": ("tta",),
          "batch_size": ("lr",), "lr": ("batch_size",)}


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
