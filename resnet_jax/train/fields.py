"""Every config field, declared once: default, check, meaning, and whether it may change on resume.

`resnet_jax.train.config` derives from these declarations the defaults ConfigDict (and so the
`--config.FIELD=VALUE` flags, which ml_collections accepts only for fields the defaults hold),
the per-field checks, the set of fields that may change when a run resumes, and the Markdown
table of fields (docs/config_fields.md, written by scripts/write_config_table.py). Adding a
field is one line here. Rules that tie fields together (a boundary below total_steps, a batch
that splits over the devices) are not declarations: they stay in code, in `config.validate`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from resnet_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config field has a bad type or value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Check:
    """A test of one value and what it allows, in words (the error message and the docs say it).

    `type` is what a None default holds on the command line (`config_dict.placeholder(type)`),
    so that `--config.FIELD=VALUE` parses VALUE as that type.
    """

    accepts: Callable[[Any], bool]
    allowed: str
    type: type | None = None

    def __call__(self, value: Any) -> str | None:
        """None if `value` passes; else what is allowed ("an integer in [1, 1000]")."""
        return None if self.accepts(value) else self.allowed


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its default, its check, a one-line meaning, and `resumable`: whether
    it may differ between a run and its resumption (it does not change the results)."""

    default: Any
    check: Check
    doc: str
    resumable: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_sequence(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, (str, bytes))


def _or_none(optional: bool) -> str:
    return " or None" if optional else ""


def integer(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Check:
    def accepts(v):
        if v is None:
            return optional
        return _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)

    bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    return Check(accepts, f"an integer in {bounds}{_or_none(optional)}", int)


def real(
    lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False, optional: bool = False
) -> Check:
    def accepts(v):
        if v is None:
            return optional
        return _is_real(v) and lo <= v <= hi and not (lo_open and v == lo) and not (hi_open and v == hi)

    bounds = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Check(accepts, f"a finite number in {bounds}{_or_none(optional)}", float)


def choice(*allowed: Any, optional: bool = False) -> Check:
    def accepts(v):
        # isinstance: 1 == True, yet 1 is no answer to a True/False question.
        return (v is None and optional) or any(v == a and isinstance(v, type(a)) for a in allowed)

    words = "one of " + ", ".join(repr(a) for a in allowed) + _or_none(optional)
    return Check(accepts, words, type(allowed[0]))


def string(optional: bool = False) -> Check:
    return Check(
        lambda v: (v is None and optional) or (isinstance(v, str) and bool(v)),
        "a non-empty string" + _or_none(optional),
        str,
    )


BOOL = Check(lambda v: isinstance(v, bool), "True or False", bool)
INT_SEQUENCE = Check(lambda v: _is_sequence(v) and all(_is_int(x) for x in v), "a sequence of integers")
REAL_SEQUENCE = Check(lambda v: _is_sequence(v) and all(_is_real(x) for x in v), "a sequence of numbers")


def int_pair(lo: int, hi: int) -> Check:
    def accepts(v):
        return (
            _is_sequence(v) and len(v) == 2 and all(_is_int(x) and lo <= x <= hi for x in v) and v[0] <= v[1]
        )

    return Check(accepts, f"a pair (low, high) of integers in [{lo}, {hi}] with low <= high")


BIG = 10**9  # step counts and cadences: larger is surely a typo
MAX_BATCH = 1 << 20

# Every field the trainer reads whatever the dataset, at the 2015 paper's CIFAR values.
COMMON: dict[str, Field] = {
    "seed": Field(0, integer(0, 2**31 - 1), "seeds the initialisation, the data order and the augmentation"),
    "init_from": Field(
        None,
        string(optional=True),
        "a converted or trained checkpoint to start from (fine-tuning); None: He initialisation",
    ),
    "model.name": Field("cifar_resnet20", string(), "a registered model name (resnet_jax.models)"),
    "model.num_classes": Field(
        None, integer(1, optional=True), "the classifier's width; None: the dataset's"
    ),
    "model.shortcut": Field(
        None,
        choice("A", "B", "C", optional=True),
        "projection shortcuts: A zero-pads, B projects where the shape changes, "
        "C always; None: the family's (paper) choice",
    ),
    "model.zero_init_last": Field(
        False, BOOL, "zero-init the last BN scale of each block (Goyal et al. 2017); the paper: False"
    ),
    "model.width_multiplier": Field(1.0, real(0, 64, lo_open=True), "multiplies every stage's width"),
    "model.bn_momentum": Field(0.9, real(0, 1, hi_open=True), "decay of BN's running statistics"),
    "model.ghost_batch_size": Field(
        None,
        integer(1, optional=True),
        "BN statistics over groups of this many images; None: over the global batch",
    ),
    "model.dtype": Field(
        "float32", choice("float32", "bfloat16"), "the compute dtype (parameters stay float32)"
    ),
    "model.stride_on_3x3": Field(
        None,
        choice(True, False, optional=True),
        "bottlenecks: True strides the 3x3 (torchvision, v1.5); None/False the first 1x1 (the paper)",
    ),
    "model.bn_frozen": Field(False, BOOL, "BN uses and keeps its running statistics (fine-tuning)"),
    "model.input_size": Field(
        None,
        integer(8, 4096, optional=True),
        "N: the model resizes its input images to NxN; None: as they come",
    ),
    "batch_size": Field(128, integer(1, MAX_BATCH), "the global training batch, over all devices and hosts"),
    "accumulate_steps": Field(
        1,
        integer(1, MAX_BATCH),
        "k > 1: each update averages the gradients of k micro-batches of batch_size / k, run one "
        "after another (less memory); BN statistics are then per micro-batch; the paper: 1",
    ),
    "eval_batch_size": Field(500, integer(1, MAX_BATCH), "the global evaluation batch", resumable=True),
    "reference_batch_size": Field(
        128,
        integer(1, MAX_BATCH),
        "the batch at which learning rates and step counts are given (linear scaling rule)",
    ),
    "label_smoothing": Field(0.0, real(0, 1, hi_open=True), "Szegedy et al. 2016; the paper: 0"),
    "optimizer.learning_rate": Field(
        0.1,
        real(0, 100, lo_open=True),
        "the base rate at reference_batch_size, scaled by batch_size / reference_batch_size",
    ),
    "optimizer.momentum": Field(0.9, real(0, 1, hi_open=True), "SGD momentum"),
    "optimizer.nesterov": Field(False, BOOL, "Nesterov momentum; the paper: False"),
    "optimizer.weight_decay": Field(1e-4, real(0, 1), "L2 weight decay, added to the gradient"),
    "optimizer.weight_decay_on": Field(
        "all",
        choice("all", "kernels", "no_bn"),
        "what weight decay covers: all parameters (the paper), conv and dense "
        "kernels, or all but BN scales and biases",
    ),
    "schedule.kind": Field(
        "step",
        choice("step", "cosine"),
        "step: divide by 1/decay_factor at the boundaries (the paper); cosine: decay to 0 "
        "(Loshchilov & Hutter 2017)",
    ),
    "schedule.total_steps": Field(
        None,
        integer(1, BIG, optional=True),
        "training length in steps at reference_batch_size (wins over epochs)",
    ),
    "schedule.boundaries": Field((), INT_SEQUENCE, "steps at reference_batch_size where the rate drops"),
    "schedule.warmup_steps": Field(0, integer(0, BIG), "warm-up length in steps at reference_batch_size"),
    "schedule.epochs": Field(
        None,
        real(0, 10**6, lo_open=True, optional=True),
        "training length in epochs of the training set (used when total_steps is None)",
    ),
    "schedule.boundary_epochs": Field((), REAL_SEQUENCE, "epochs where the rate drops"),
    "schedule.warmup_epochs": Field(0.0, real(0, 10**6), "warm-up length in epochs"),
    "schedule.decay_factor": Field(0.1, real(0, 1, lo_open=True), "the rate's factor at each boundary"),
    "schedule.warmup_learning_rate": Field(
        0.01, real(0, 100), "the rate the warm-up starts from (scaled as scale_warmup_learning_rate says)"
    ),
    "schedule.scale_warmup_learning_rate": Field(
        True,
        BOOL,
        "True: warmup_learning_rate is given at reference_batch_size and scaled with the batch; "
        "False: it is the rate at step 0 whatever the batch (Goyal et al. 2017 start at 0.1)",
    ),
    "schedule.warmup": Field(
        "constant",
        choice("constant", "linear"),
        "constant: hold warmup_learning_rate (the paper's ResNet-110); linear: ramp from it to the rate",
    ),
    "ema.decay": Field(
        None,
        real(0, 1, hi_open=True, optional=True),
        "keep an exponential moving average of the weights and BN statistics, ema <- d*ema + (1-d)*w "
        "after each step, evaluated next to them (e.g. 0.999); None or 0: off (the paper)",
    ),
    "ema.warmup": Field(
        False,
        BOOL,
        "d_t = min(ema.decay, (1 + t) / (10 + t)) at step t (TensorFlow's num_updates rule), so the "
        "average forgets the initialisation early; False: d_t = ema.decay",
    ),
    "bn_recalibration.num_images": Field(
        0,
        integer(0, BIG),
        "N > 0: after training, recompute every BN layer's mean and variance over N training images "
        "(the authors' 'precise BN'; a multiple of batch_size); results.json gives the error before "
        "and after; 0: off (keep the moving averages)",
        resumable=True,
    ),
    "steps_per_dispatch": Field(100, integer(1, 100_000), "train steps fused into one compiled lax.scan"),
    "log_every_steps": Field(500, integer(1, BIG), "steps between training-metric lines", resumable=True),
    "eval_every_steps": Field(4_000, integer(1, BIG), "steps between evaluations", resumable=True),
    "checkpoint_every_steps": Field(4_000, integer(1, BIG), "steps between checkpoints", resumable=True),
    "keep_checkpoints": Field(
        3, integer(1, 1000), "how many of the newest checkpoints to keep", resumable=True
    ),
    "allow_config_change": Field(False, BOOL, "resume a workdir whose config.json differs", resumable=True),
    "tensorboard": Field(
        True, BOOL, "write event files next to metrics.jsonl, where TensorFlow is installed", resumable=True
    ),
    "distributed.initialize": Field(
        "auto",
        choice("auto", "never", "always"),
        "whether to call jax.distributed.initialize; auto: where the fields "
        "below are set or a cluster (Cloud TPU, SLURM, Open MPI) is detected",
        resumable=True,
    ),
    "distributed.coordinator_address": Field(
        None, string(optional=True), "host:port of process 0; None: detected", resumable=True
    ),
    "distributed.num_processes": Field(
        None, integer(1, optional=True), "number of processes; None: detected", resumable=True
    ),
    "distributed.process_id": Field(
        None, integer(0, optional=True), "this process's index; None: detected", resumable=True
    ),
}

CIFAR_DATASETS = ("cifar10", "cifar100")
IMAGENET_DATASETS = ("imagenet2012", "image_folder")

# The `dataset` block of CIFAR-10/100 (official binary files or tfds, held on the devices).
CIFAR: dict[str, Field] = {
    "dataset.name": Field("cifar10", choice(*CIFAR_DATASETS), "which CIFAR"),
    "dataset.source": Field(
        "auto",
        choice("auto", "binary", "tfds"),
        "where the images come from: the official binary files, tfds, or auto (either)",
        resumable=True,
    ),
    "dataset.data_dir": Field(
        None,
        string(optional=True),
        "the data's directory; None: $CIFAR10_DIR / $CIFAR100_DIR, tfds, the download cache",
        resumable=True,
    ),
    "dataset.label_mode": Field(
        "fine", choice("fine", "coarse"), "CIFAR-100: its 100 classes (fine) or 20 superclasses (coarse)"
    ),
    "dataset.validation_size": Field(
        0,
        integer(0, 49_999),
        "hold out this many training images to evaluate on (the paper: 5000); 0: evaluate on the test set",
    ),
    "dataset.train_subset": Field(0, integer(0, 50_000), ">0: train on the first k images only"),
    "dataset.eval_subset": Field(0, integer(0, 10_000), ">0: evaluate on the first k images only"),
    "dataset.normalization": Field(
        "pixel_mean",
        choice("pixel_mean", "channel_std"),
        "subtract the per-pixel mean (the paper) or standardise each channel",
    ),
    "dataset.pad": Field(4, integer(0, 16), "zero padding before the random crop back to 32x32"),
    "dataset.flip": Field(True, BOOL, "random horizontal flips"),
}

# The `dataset` block of ImageNet (tfds imagenet2012 or a folder of JPEGs, read by tf.data).
IMAGENET: dict[str, Field] = {
    "dataset.name": Field(
        "imagenet2012",
        choice(*IMAGENET_DATASETS),
        "tfds imagenet2012, or image_folder: root/{train,val}/CLASS/*.JPEG",
    ),
    "dataset.data_dir": Field(
        None, string(optional=True), "the tfds data_dir, or the folder's root", resumable=True
    ),
    "dataset.tfds_name": Field("imagenet2012", string(), "the tfds builder name"),
    "dataset.image_size": Field(224, integer(8, 4096), "the side of the training and evaluation crops"),
    "dataset.train_transform": Field(
        "paper",
        choice("paper", "inception"),
        "paper: shorter side in scale_range, crop, flip, PCA noise; inception: random-sized crops",
    ),
    "dataset.scale_range": Field((256, 480), int_pair(1, 8192), "the paper's random shorter side, in pixels"),
    "dataset.pca_std": Field(0.1, real(0, 10), "AlexNet's PCA colour noise; 0 turns it off"),
    "dataset.eval_protocol": Field(
        "ten_crop",
        choice("center", "ten_crop", "multi_scale"),
        "one centre crop, 10 crops (Table 3) or fully-convolutional at several scales (Table 4)",
        resumable=True,
    ),
    "dataset.eval_resize": Field(
        256, integer(8, 8192), "the shorter side before the centre or ten crops", resumable=True
    ),
    "dataset.eval_scales": Field(
        (224, 256, 384, 480, 640), INT_SEQUENCE, "multi_scale: the shorter sides", resumable=True
    ),
    "dataset.skip_bad_files": Field(
        False, BOOL, "count and skip unreadable images instead of stopping", resumable=True
    ),
}


def for_dataset(dataset_name: Any) -> dict[str, Field]:
    """Every field a config for `dataset_name` has: the common ones and its `dataset` block.

    An unknown name gets CIFAR's block, whose `dataset.name` check then says what is allowed.
    """
    block = IMAGENET if dataset_name in IMAGENET_DATASETS else CIFAR
    return {**COMMON, **block}


def blocks() -> dict[str, Mapping[str, Field]]:
    """Each group of declarations under the heading the table gives it."""
    return {
        "Every dataset": COMMON,
        "CIFAR-10/100 (`dataset.name`: cifar10, cifar100)": CIFAR,
        "ImageNet (`dataset.name`: imagenet2012, image_folder)": IMAGENET,
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def fields_table() -> str:
    """A Markdown page with one table row per field: default, what is allowed, resume, meaning."""
    lines = [
        "# Config fields",
        "",
        "Generated from `resnet_jax/train/fields.py` by `scripts/write_config_table.py`; do not edit.",
        "Defaults are the 2015 paper's; `configs/*.py` set what their recipe sets (CIFAR-10: 64k steps,",
        "drops at 32k and 48k; ImageNet: batch 256, 90 epochs, ...). Set any field with",
        "`--config.FIELD=VALUE`. *Resume*: yes if the field may differ when a run resumes from its",
        "workdir (it does not change the results).",
    ]
    for heading, block in blocks().items():
        lines += [
            "",
            f"## {heading}",
            "",
            "| Field | Default | Allowed | Resume | Meaning |",
            "|---|---|---|---|---|",
        ]
        for name, f in block.items():
            lines.append(
                f"| `{name}` | `{_cell(repr(f.default))}` | {_cell(f.check.allowed)} | "
                f"{'yes' if f.resumable else 'no'} | {_cell(f.doc)} |"
            )
    return "\n".join(lines) + "\n"
