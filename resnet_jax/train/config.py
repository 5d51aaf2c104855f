"""Config validation at the boundary, and the values derived from a config.

Every field the trainer reads is checked here for type and range, before any data is
read or anything is compiled, so a mistake costs seconds, not a compile or an epoch.
`ConfigError` names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

from resnet_jax import models


class ConfigError(ValueError):
    """A config field has a bad type or value; the message names the field."""


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False):
    def check(v):
        if v is None and optional:
            return None
        if not _is_int(v):
            return "an integer" + (" or None" if optional else "")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"an integer in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        return None

    return check


def _real(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    def check(v):
        if not _is_real(v):
            return "a finite number"
        if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
            return f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        return None

    return check


def _choice(*allowed, optional: bool = False):
    def check(v):
        if v is None and optional:
            return None
        if v not in allowed:
            return "one of " + ", ".join(repr(a) for a in allowed) + (" or None" if optional else "")
        return None

    return check


def _bool(v):
    return None if isinstance(v, bool) else "True or False"


def _str(optional: bool = False):
    def check(v):
        if v is None and optional:
            return None
        return None if isinstance(v, str) and v else "a non-empty string" + (" or None" if optional else "")

    return check


def _optional_real(lo: float, hi: float, lo_open: bool = False):
    inner = _real(lo, hi, lo_open=lo_open)

    def check(v):
        if v is None:
            return None
        problem = inner(v)
        return problem and problem + " or None"

    return check


def _real_sequence(v):
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not all(_is_real(x) for x in v):
        return "a sequence of numbers"
    return None


def _int_pair(lo: int, hi: int):
    def check(v):
        if (isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2
                or not all(_is_int(x) and lo <= x <= hi for x in v) or v[0] > v[1]):
            return f"a pair (low, high) of integers in [{lo}, {hi}] with low <= high"
        return None

    return check


def _int_sequence(v):
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        return "a sequence of integers"
    if not all(_is_int(x) for x in v):
        return "a sequence of integers"
    return None


# Every field the trainer reads whatever the dataset, with its check.
COMMON_SCHEMA: dict[str, Callable[[Any], str | None]] = {
    "seed": _int(0, 2**31 - 1),
    "init_from": _str(optional=True),
    "model.name": _str(),
    "model.num_classes": _int(1, optional=True),
    "model.shortcut": _choice("A", "B", "C", optional=True),
    "model.zero_init_last": _bool,
    "model.width_multiplier": _real(0, 64, lo_open=True),
    "model.bn_momentum": _real(0, 1, hi_open=True),
    "model.ghost_batch_size": _int(1, optional=True),
    "model.dtype": _choice("float32", "bfloat16"),
    "model.stride_on_3x3": _choice(True, False, optional=True),
    "model.bn_frozen": _bool,
    "model.input_size": _int(8, 4096, optional=True),
    "batch_size": _int(1, 1 << 20),
    "eval_batch_size": _int(1, 1 << 20),
    "reference_batch_size": _int(1, 1 << 20),
    "label_smoothing": _real(0, 1, hi_open=True),
    "optimizer.learning_rate": _real(0, 100, lo_open=True),
    "optimizer.momentum": _real(0, 1, hi_open=True),
    "optimizer.nesterov": _bool,
    "optimizer.weight_decay": _real(0, 1),
    "optimizer.weight_decay_on": _choice("all", "kernels", "no_bn"),
    "schedule.kind": _choice("step", "cosine"),
    "schedule.total_steps": _int(1, 10**9, optional=True),
    "schedule.boundaries": _int_sequence,
    "schedule.epochs": _optional_real(0, 10**6, lo_open=True),
    "schedule.boundary_epochs": _real_sequence,
    "schedule.warmup_epochs": _real(0, 10**6),
    "schedule.decay_factor": _real(0, 1, lo_open=True),
    "schedule.warmup_steps": _int(0, 10**9),
    "schedule.warmup_learning_rate": _real(0, 100),
    "schedule.warmup": _choice("constant", "linear"),
    "steps_per_dispatch": _int(1, 100_000),
    "log_every_steps": _int(1, 10**9),
    "eval_every_steps": _int(1, 10**9),
    "checkpoint_every_steps": _int(1, 10**9),
    "keep_checkpoints": _int(1, 1000),
    "allow_config_change": _bool,
    "tensorboard": _bool,
    "distributed.initialize": _choice("auto", "never", "always"),
    "distributed.coordinator_address": _str(optional=True),
    "distributed.num_processes": _int(1, optional=True),
    "distributed.process_id": _int(0, optional=True),
}

CIFAR_DATASETS = ("cifar10", "cifar100")
IMAGENET_DATASETS = ("imagenet2012", "image_folder")

# The `dataset` block of each kind of data source.
CIFAR_SCHEMA: dict[str, Callable[[Any], str | None]] = {
    "dataset.name": _choice(*CIFAR_DATASETS),
    "dataset.source": _choice("auto", "binary", "tfds"),
    "dataset.data_dir": _str(optional=True),
    "dataset.label_mode": _choice("fine", "coarse"),  # CIFAR-100's 100 classes or 20 superclasses
    "dataset.validation_size": _int(0, 49_999),
    "dataset.train_subset": _int(0, 50_000),
    "dataset.eval_subset": _int(0, 10_000),
    "dataset.normalization": _choice("pixel_mean", "channel_std"),
    "dataset.pad": _int(0, 16),
    "dataset.flip": _bool,
}

IMAGENET_SCHEMA: dict[str, Callable[[Any], str | None]] = {
    "dataset.name": _choice(*IMAGENET_DATASETS),
    "dataset.data_dir": _str(optional=True),
    "dataset.tfds_name": _str(),
    "dataset.image_size": _int(8, 4096),
    "dataset.train_transform": _choice("paper", "inception"),
    "dataset.scale_range": _int_pair(1, 8192),
    "dataset.pca_std": _real(0, 10),
    "dataset.eval_protocol": _choice("center", "ten_crop", "multi_scale"),
    "dataset.eval_resize": _int(8, 8192),
    "dataset.eval_scales": _int_sequence,
    "dataset.skip_bad_files": _bool,
}


def schema_for(dataset_name: Any) -> dict[str, Callable[[Any], str | None]]:
    """Every field a config for `dataset_name` must have, with its check."""
    block = IMAGENET_SCHEMA if dataset_name in IMAGENET_DATASETS else CIFAR_SCHEMA
    return {**COMMON_SCHEMA, **block}


# The CIFAR trainer's full schema (kept under its historical name).
SCHEMA = schema_for("cifar10")

# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = frozenset({
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "allow_config_change", "tensorboard", "dataset.data_dir", "dataset.source", "eval_batch_size",
    "dataset.eval_protocol", "dataset.eval_resize", "dataset.eval_scales", "dataset.skip_bad_files",
    "distributed.initialize", "distributed.coordinator_address",
    "distributed.num_processes", "distributed.process_id",
})


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    return dict(config)


@dataclasses.dataclass(frozen=True)
class Derived:
    """Values computed from the config at the actual batch size (linear scaling rule)."""

    learning_rate: float
    warmup_learning_rate: float
    total_steps: int
    boundaries: tuple[int, ...]
    warmup_steps: int
    steps_per_epoch: int
    num_train: int
    num_eval: int


def _scaled(steps: int, batch: int, reference: int) -> int:
    return int(round(steps * reference / batch))


def defaults() -> ml_collections.ConfigDict:
    """Every field the trainer reads that is not about the data, at the 2015 paper's values.

    Dataset configs (configs/cifar10.py, configs/imagenet.py) start from this, add their
    `dataset` block and change what their recipe changes.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    # A converted or trained checkpoint to start from (fine-tuning); None: He initialisation.
    c.init_from = config_dict.placeholder(str)

    c.model = ml_collections.ConfigDict()
    c.model.name = "cifar_resnet20"
    # Overrides of the family defaults; None keeps the family's (paper) choice.
    c.model.num_classes = config_dict.placeholder(int)  # None: the dataset's
    c.model.shortcut = config_dict.placeholder(str)  # 'A' | 'B' | 'C'
    c.model.zero_init_last = False  # Goyal et al. 2017; the paper: False
    c.model.width_multiplier = 1.0
    c.model.bn_momentum = 0.9
    c.model.ghost_batch_size = config_dict.placeholder(int)  # None: BN over the global batch
    c.model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'
    # Bottlenecks: None/False = stride on the first 1x1 (paper); True = on the 3x3 (torchvision).
    c.model.stride_on_3x3 = config_dict.placeholder(bool)
    c.model.bn_frozen = False  # True: BN uses and keeps its running statistics (fine-tuning)
    c.model.input_size = config_dict.placeholder(int)  # N: resize images to NxN in the model

    c.batch_size = 128  # global, over all devices and hosts
    c.eval_batch_size = 500
    c.reference_batch_size = 128  # the batch at which lr and step counts below are given
    c.label_smoothing = 0.0  # Szegedy et al. 2016; the paper: 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 1e-4
    c.optimizer.weight_decay_on = "all"  # 'all' (the paper) | 'kernels' | 'no_bn'

    c.schedule = ml_collections.ConfigDict()
    c.schedule.kind = "step"  # the paper; or 'cosine' (Loshchilov & Hutter 2017, to 0)
    # Either steps (at reference_batch_size, rescaled with the batch) ...
    c.schedule.total_steps = config_dict.placeholder(int)
    c.schedule.boundaries = ()
    c.schedule.warmup_steps = 0
    # ... or epochs of the training set (independent of the batch size).
    c.schedule.epochs = config_dict.placeholder(float)
    c.schedule.boundary_epochs = ()
    c.schedule.warmup_epochs = 0.0
    c.schedule.decay_factor = 0.1
    c.schedule.warmup_learning_rate = 0.01
    c.schedule.warmup = "constant"  # the paper's ResNet-110 warm-up; or 'linear'

    c.steps_per_dispatch = 100  # train steps fused into one compiled lax.scan (GPU/TPU)
    c.log_every_steps = 500
    c.eval_every_steps = 4_000
    c.checkpoint_every_steps = 4_000
    c.keep_checkpoints = 3
    c.allow_config_change = False  # resume a workdir whose config.json differs
    c.tensorboard = True  # event files next to metrics.jsonl, where TensorFlow is installed

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # 'auto' | 'never' | 'always'
    c.distributed.coordinator_address = config_dict.placeholder(str)
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)
    return c


# Sizes of the full ILSVRC-2012 splits, used where a config is checked without its data.
IMAGENET_SIZES = (1_281_167, 50_000)


def check_fields(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """Every field present, known, of the right type and range; the model buildable.

    Needs no data and no devices: the first thing a run does. Returns the flat config.
    """
    flat = flatten(_as_dict(config))
    schema = schema_for(flat.get("dataset.name"))
    unknown = sorted(set(flat) - set(schema))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(schema)}")
    missing = sorted(set(schema) - set(flat))
    if missing:
        raise ConfigError(f"missing config field(s) {missing}; start from configs/cifar10.py or configs/imagenet.py")
    for field, check in schema.items():
        problem = check(flat[field])
        if problem:
            raise ConfigError(f"config field {field} = {flat[field]!r}: must be {problem}")
    if flat.get("dataset.name") == "cifar10" and flat["dataset.label_mode"] != "fine":
        raise ConfigError(f"config field dataset.label_mode = {flat['dataset.label_mode']!r}: CIFAR-10 has "
                          "only 'fine' labels ('coarse' is CIFAR-100's 20 superclasses)")
    _check_model(flat)
    return flat


def validate(config: ml_collections.ConfigDict | Mapping[str, Any], num_devices: int = 1,
             sizes: tuple[int, int] | None = None) -> Derived:
    """Checks every field; returns the derived values or raises ConfigError.

    `sizes`: (train, eval) example counts of the data actually found. CIFAR's are known
    from the config; ImageNet's default to the full ILSVRC-2012 splits, and an image
    folder's must be given (the trainer counts its files first).
    """
    flat = check_fields(config)
    batch = flat["batch_size"]
    for field in ("batch_size", "eval_batch_size"):
        if flat[field] % num_devices:
            raise ConfigError(
                f"config field {field} = {flat[field]} does not divide by the {num_devices} devices "
                f"of the mesh; use a multiple of {num_devices}")
    ghost = flat["model.ghost_batch_size"]
    if ghost is not None and (batch // num_devices) % ghost:
        raise ConfigError(
            f"config field model.ghost_batch_size = {ghost} must divide the per-device batch "
            f"{batch // num_devices} (batch_size {batch} over {num_devices} devices)")

    num_train, num_eval = _dataset_sizes(flat, sizes)
    if num_train < batch:
        raise ConfigError(f"config field batch_size = {batch} exceeds the {num_train} training images")
    steps_per_epoch = num_train // batch
    total, boundaries, warmup = _schedule_steps(flat, batch, steps_per_epoch)

    k = flat["steps_per_dispatch"]
    for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        if flat[field] % k:
            raise ConfigError(
                f"config field {field} = {flat[field]} must be a multiple of steps_per_dispatch = {k} "
                f"(steps run {k} at a time), e.g. {max(k, flat[field] // k * k)}")

    dist = (flat["distributed.coordinator_address"], flat["distributed.num_processes"],
            flat["distributed.process_id"])
    if any(v is not None for v in dist) and any(v is None for v in dist):
        raise ConfigError("config fields distributed.coordinator_address, distributed.num_processes and "
                          "distributed.process_id go together: set all three or none")
    if dist[1] is not None and dist[2] >= dist[1]:
        raise ConfigError(f"config field distributed.process_id = {dist[2]} must be below "
                          f"distributed.num_processes = {dist[1]}")

    lr_scale = batch / flat["reference_batch_size"]
    return Derived(
        learning_rate=flat["optimizer.learning_rate"] * lr_scale,
        warmup_learning_rate=flat["schedule.warmup_learning_rate"] * lr_scale,
        total_steps=total,
        boundaries=boundaries,
        warmup_steps=warmup,
        steps_per_epoch=steps_per_epoch,
        num_train=num_train,
        num_eval=num_eval,
    )


def dataset_sizes(config: ml_collections.ConfigDict | Mapping[str, Any]) -> tuple[int, int]:
    """(train, eval) example counts that a CIFAR config selects (subsets, held-out split)."""
    return _dataset_sizes(flatten(_as_dict(config)), None)


def _dataset_sizes(flat: Mapping[str, Any], sizes: tuple[int, int] | None) -> tuple[int, int]:
    name = flat["dataset.name"]
    if name in IMAGENET_DATASETS:
        if sizes is None and name == "image_folder":
            raise ValueError("validate(): an image folder's sizes must be given (count its files first)")
        return tuple(sizes or IMAGENET_SIZES)
    num_train = 50_000 - flat["dataset.validation_size"]
    if flat["dataset.train_subset"]:
        if flat["dataset.train_subset"] > num_train:
            raise ConfigError(f"config field dataset.train_subset = {flat['dataset.train_subset']} exceeds "
                              f"the {num_train} training images")
        num_train = flat["dataset.train_subset"]
    num_eval = flat["dataset.validation_size"] or 10_000
    if flat["dataset.eval_subset"]:
        if flat["dataset.eval_subset"] > num_eval:
            raise ConfigError(f"config field dataset.eval_subset = {flat['dataset.eval_subset']} exceeds "
                              f"the {num_eval} evaluation images")
        num_eval = flat["dataset.eval_subset"]
    return num_train, num_eval


def _schedule_steps(flat: Mapping[str, Any], batch: int, steps_per_epoch: int) -> tuple[int, tuple[int, ...], int]:
    """(total steps, boundaries, warm-up steps) at the actual batch size.

    Either in steps at `reference_batch_size`, rescaled by the linear scaling rule (the
    CIFAR recipe's iterations), or in epochs (ImageNet's), which do not depend on the batch.
    """
    # Steps, where given, win: the command line can set a field but not reset one to None.
    epochs = None if flat["schedule.total_steps"] is not None else flat["schedule.epochs"]
    if flat["schedule.total_steps"] is None and epochs is None:
        raise ConfigError("config fields schedule.total_steps and schedule.epochs are both None: set one")
    if flat["schedule.kind"] == "cosine" and (flat["schedule.boundaries"] or flat["schedule.boundary_epochs"]):
        raise ConfigError("config field schedule.kind = 'cosine' takes no boundaries: set schedule.boundaries "
                          "and schedule.boundary_epochs to ()")
    if epochs is None:
        if flat["schedule.boundary_epochs"] or flat["schedule.warmup_epochs"]:
            raise ConfigError("config fields schedule.boundary_epochs / schedule.warmup_epochs are in epochs, "
                              "but schedule.total_steps is set (and wins over schedule.epochs): use "
                              "schedule.boundaries / warmup_steps, and set boundary_epochs=() and warmup_epochs=0")
        return _steps_schedule(flat, batch)
    if flat["schedule.boundaries"] or flat["schedule.warmup_steps"]:
        raise ConfigError("config fields schedule.boundaries / schedule.warmup_steps are in steps: with "
                          "schedule.epochs use schedule.boundary_epochs / schedule.warmup_epochs")
    bounds = tuple(flat["schedule.boundary_epochs"])
    if any(b <= 0 or b >= epochs for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ConfigError(f"config field schedule.boundary_epochs = {bounds}: must be strictly increasing "
                          f"epochs in (0, schedule.epochs = {epochs})")
    if flat["schedule.warmup_epochs"] >= epochs or (bounds and flat["schedule.warmup_epochs"] > bounds[0]):
        raise ConfigError(f"config field schedule.warmup_epochs = {flat['schedule.warmup_epochs']} must be below "
                          "schedule.epochs and not pass the first boundary")
    total = int(round(epochs * steps_per_epoch))
    boundaries = tuple(int(round(b * steps_per_epoch)) for b in bounds)
    warmup = int(round(flat["schedule.warmup_epochs"] * steps_per_epoch))
    if total < 1 or any(b <= 0 or b >= total for b in boundaries) or len(set(boundaries)) != len(boundaries):
        raise ConfigError(f"config field schedule.epochs = {epochs}: at {steps_per_epoch} steps per epoch "
                          f"(batch_size {batch}) the schedule is {total} steps with boundaries {boundaries}, "
                          "too short to hold them; train longer or use a smaller batch_size")
    return total, boundaries, warmup


def _steps_schedule(flat: Mapping[str, Any], batch: int) -> tuple[int, tuple[int, ...], int]:
    ref = flat["reference_batch_size"]
    total = _scaled(flat["schedule.total_steps"], batch, ref)
    if total < 1:
        raise ConfigError(f"config field schedule.total_steps = {flat['schedule.total_steps']} "
                          f"at batch_size {batch} rounds to 0 steps")
    boundaries = tuple(flat["schedule.boundaries"])
    if any(b <= 0 or b >= flat["schedule.total_steps"] for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
        raise ConfigError(
            f"config field schedule.boundaries = {boundaries}: must be strictly increasing steps "
            f"in (0, schedule.total_steps = {flat['schedule.total_steps']})")
    if flat["schedule.warmup_steps"] >= flat["schedule.total_steps"]:
        raise ConfigError(f"config field schedule.warmup_steps = {flat['schedule.warmup_steps']} must be "
                          f"below schedule.total_steps = {flat['schedule.total_steps']}")
    if boundaries and flat["schedule.warmup_steps"] > boundaries[0]:
        raise ConfigError(f"config field schedule.warmup_steps = {flat['schedule.warmup_steps']} must not "
                          f"pass the first boundary {boundaries[0]}")
    scaled = tuple(_scaled(b, batch, ref) for b in boundaries)
    if any(b <= 0 or b >= total for b in scaled):
        # Rounding to 0 would decay the rate from the first step; to `total`, never.
        raise ConfigError(
            f"config field schedule.boundaries = {boundaries}: rescaled from reference_batch_size {ref} "
            f"to batch_size {batch} they become {scaled}, outside (0, {total} steps); use a smaller "
            "batch_size or more schedule.total_steps")
    warmup = _scaled(flat["schedule.warmup_steps"], batch, ref)
    if flat["schedule.warmup_steps"] and not warmup:
        raise ConfigError(
            f"config field schedule.warmup_steps = {flat['schedule.warmup_steps']} rounds to 0 steps at "
            f"batch_size {batch} (given at reference_batch_size {ref}): the warm-up would vanish; "
            "use more warmup_steps, or 0 for none")
    return total, scaled, warmup


def model_overrides(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The `config.model` fields handed to `models.build_model` (None: family default)."""
    return {k: v for k, v in dict(model_config).items() if k != "name" and v is not None}


def _check_model(flat: Mapping[str, Any]) -> None:
    model_cfg = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("model.")}
    try:
        models.build_model(model_cfg["name"], **model_overrides(model_cfg))
    except ValueError as e:
        raise ConfigError(f"config field model ({model_cfg['name']!r}): {e}") from None
