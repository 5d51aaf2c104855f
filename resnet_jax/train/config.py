"""Config validation at the boundary, and the values derived from a config.

Every field the trainer reads is checked here for type and range, before any data is
read or anything is compiled, so a mistake costs seconds, not a compile or an epoch.
`ConfigError` names the field, the bad value and what is allowed. The fields themselves
(default, check, meaning, resumability) are declared once, in `resnet_jax.train.fields`;
this module derives the defaults and the schema from them and holds the rules that tie
fields together (schedule lengths, devices, the distributed trio).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from resnet_jax import models
from resnet_jax.data import cifar
from resnet_jax.data.constants import ILSVRC2012_SIZES
from resnet_jax.files import flatten_dict
from resnet_jax.train import fields
from resnet_jax.train.fields import ConfigError
from resnet_jax.train.optim import Derived, derive


def schema_for(dataset_name: Any) -> dict[str, fields.Check]:
    """Every field a config for `dataset_name` must have, with its check (from fields.py)."""
    return {name: f.check for name, f in fields.for_dataset(dataset_name).items()}


def resumable_fields() -> frozenset[str]:
    """Fields that may change between a run and its resumption without changing its results."""
    return frozenset(name for block in fields.blocks().values() for name, f in block.items() if f.resumable)


CIFAR_DATASETS = fields.CIFAR_DATASETS
IMAGENET_DATASETS = fields.IMAGENET_DATASETS
fields_table = fields.fields_table

SCHEMA = schema_for("cifar10")  # the CIFAR trainer's full schema (kept under its historical name)
RESUMABLE_CHANGES = resumable_fields()


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted field name -> value (empty blocks dropped)."""
    return flatten_dict(tree, keep_empty=False)


def _as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    return dict(config)


def defaults(dataset_name: str | None = None) -> ml_collections.ConfigDict:
    """Every declared field (resnet_jax/train/fields.py) at its default: the 2015 paper's values.

    With `dataset_name` (e.g. 'cifar10', 'imagenet2012'), also that dataset's `dataset` block
    with `dataset.name` set; without it, only the fields that are not about the data. Dataset
    configs (configs/cifar10.py, configs/imagenet.py) start from this and change what their
    recipe changes. A None default becomes a typed placeholder, so `--config.FIELD=VALUE`
    parses VALUE as the field's type.
    """
    declared = dict(fields.COMMON)
    if dataset_name is not None:
        declared.update(fields.for_dataset(dataset_name))
    c = ml_collections.ConfigDict()
    for name, field in declared.items():
        *parents, leaf = name.split(".")
        node = c
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[leaf] = config_dict.placeholder(field.check.type) if field.default is None else field.default
    if dataset_name is not None:
        c.dataset.name = dataset_name
    return c


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
        raise ConfigError(
            f"missing config field(s) {missing}; start from configs/cifar10.py or configs/imagenet.py"
        )
    for field, check in schema.items():
        problem = check(flat[field])
        if problem:
            raise ConfigError(f"config field {field} = {flat[field]!r}: must be {problem}")
    if flat.get("dataset.name") == "cifar10" and flat["dataset.label_mode"] != "fine":
        raise ConfigError(
            f"config field dataset.label_mode = {flat['dataset.label_mode']!r}: CIFAR-10 has "
            "only 'fine' labels ('coarse' is CIFAR-100's 20 superclasses)"
        )
    _check_model(flat)
    return flat


def validate(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    num_devices: int = 1,
    sizes: tuple[int, int] | None = None,
    checked: Mapping[str, Any] | None = None,
) -> Derived:
    """Checks every field; returns the derived values or raises ConfigError.

    `sizes`: (train, eval) example counts of the data actually found. CIFAR's are known
    from the config; ImageNet's default to the full ILSVRC-2012 splits, and an image
    folder's must be given (the trainer counts its files first).
    """
    flat = dict(checked) if checked is not None else check_fields(config)
    batch = flat["batch_size"]
    for field in ("batch_size", "eval_batch_size"):
        if flat[field] % num_devices:
            raise ConfigError(
                f"config field {field} = {flat[field]} does not divide by the {num_devices} devices "
                f"of the mesh; use a multiple of {num_devices}"
            )
    ghost = flat["model.ghost_batch_size"]
    _check_accumulation(batch, flat.get("accumulate_steps", 1), ghost, num_devices)

    if flat["ema.warmup"] and not flat["ema.decay"]:
        raise ConfigError(
            "config field ema.warmup = True warms up an EMA that is off: set ema.decay (e.g. 0.999) "
            "or leave ema.warmup False"
        )

    num_train, num_eval = _dataset_sizes(flat, sizes)
    if num_train < batch:
        raise ConfigError(f"config field batch_size = {batch} exceeds the {num_train} training images")
    derived = derive(flat, batch, num_train, num_eval)

    check_recalibration(flat.get("bn_recalibration.num_images", 0), bn_piece_size(flat), num_train)

    k = flat["steps_per_dispatch"]
    for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        if flat[field] % k:
            raise ConfigError(
                f"config field {field} = {flat[field]} must be a multiple of steps_per_dispatch = {k} "
                f"(steps run {k} at a time), e.g. {max(k, flat[field] // k * k)}"
            )

    dist = (
        flat["distributed.coordinator_address"],
        flat["distributed.num_processes"],
        flat["distributed.process_id"],
    )
    if any(v is not None for v in dist) and any(v is None for v in dist):
        raise ConfigError(
            "config fields distributed.coordinator_address, distributed.num_processes and "
            "distributed.process_id go together: set all three or none"
        )
    if dist[1] is not None and dist[2] >= dist[1]:
        raise ConfigError(
            f"config field distributed.process_id = {dist[2]} must be below "
            f"distributed.num_processes = {dist[1]}"
        )

    return derived


def _check_accumulation(batch: int, k: int, ghost: int | None, num_devices: int) -> None:
    """Gradient accumulation: batch_size splits into k micro-batches, each spread evenly over
    the devices, and ghost BN groups tile each device's share of a micro-batch."""
    if ghost is not None and (batch // num_devices) % ghost:
        raise ConfigError(
            f"config field model.ghost_batch_size = {ghost} must divide the per-device batch "
            f"{batch // num_devices} (batch_size {batch} over {num_devices} devices)"
        )

    def fits(j: int) -> bool:
        share = batch // j // num_devices  # one device's examples of one micro-batch
        return not batch % j and not (batch // j) % num_devices and not (ghost and share % ghost)

    if fits(k):
        return
    allowed = [j for j in range(1, batch + 1) if fits(j)]  # never empty: 1 fits after the checks above
    ghost_words = (
        "" if ghost is None else f", each device's share a multiple of model.ghost_batch_size = {ghost}"
    )
    raise ConfigError(
        f"config field accumulate_steps = {k} must split batch_size = {batch} into {k} equal micro-batches "
        f"that divide by the {num_devices} devices{ghost_words}; allowed here: {allowed}"
    )


def bn_piece_size(flat: Mapping[str, Any]) -> int:
    """Images per BN batch in training: the global batch (its micro-batch under gradient
    accumulation), the piece BN recalibration normalises at a time."""
    return flat["batch_size"] // flat.get("accumulate_steps", 1)


def check_recalibration(
    n: int, piece: int, num_train: int, what: str = "config field bn_recalibration.num_images"
) -> None:
    """`n` images (0: none; named `what` in the error) for BN recalibration: whole training
    batches of `piece` images (`bn_piece_size`: BN normalises whole batches), at most the
    `num_train` training images."""
    if n and (n % piece or n > num_train):
        raise ConfigError(
            f"{what} = {n} must be a multiple of the {piece} images that BN normalises together in "
            f"training (batch_size / accumulate_steps) and at most the {num_train} training images, "
            f"e.g. {max(1, min(n, num_train) // piece) * piece}"
        )


def dataset_sizes(config: ml_collections.ConfigDict | Mapping[str, Any]) -> tuple[int, int]:
    """(train, eval) example counts that a CIFAR config selects (subsets, held-out split)."""
    return _dataset_sizes(flatten(_as_dict(config)), None)


def _dataset_sizes(flat: Mapping[str, Any], sizes: tuple[int, int] | None) -> tuple[int, int]:
    name = flat["dataset.name"]
    if name in IMAGENET_DATASETS:
        if sizes is None and name == "image_folder":
            raise ValueError("validate(): an image folder's sizes must be given (count its files first)")
        return tuple(sizes or ILSVRC2012_SIZES)
    layout = cifar.LAYOUTS[name]
    num_train = _subset(flat, "train_subset", layout.num_train - flat["dataset.validation_size"], "training")
    num_eval = _subset(
        flat, "eval_subset", flat["dataset.validation_size"] or layout.records[layout.test_file], "evaluation"
    )
    return num_train, num_eval


def _subset(flat: Mapping[str, Any], field: str, available: int, images: str) -> int:
    """`available`, or the first k images that config field dataset.`field` = k > 0 selects."""
    k = flat[f"dataset.{field}"]
    if k:
        if k > available:
            raise ConfigError(f"config field dataset.{field} = {k} exceeds the {available} {images} images")
        return k
    return available


def model_overrides(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The `config.model` fields handed to `models.build_model` (None: family default)."""
    return {k: v for k, v in dict(model_config).items() if k != "name" and v is not None}


def _check_model(flat: Mapping[str, Any]) -> None:
    model_cfg = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("model.")}
    try:
        # A fixed conv_impl: checking the fields must not ask JAX for its backend, which would
        # initialise it before a multi-process run has called jax.distributed.initialize.
        models.build_model(model_cfg["name"], **{**model_overrides(model_cfg), "conv_impl": "xla"})
    except ValueError as e:
        raise ConfigError(f"config field model ({model_cfg['name']!r}): {e}") from None


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
    """The config's model with a head for the dataset's classes."""
    overrides = model_overrides(config.model)
    if overrides.setdefault("num_classes", num_classes) != num_classes:
        raise ConfigError(
            f"config field model.num_classes = {overrides['num_classes']} but the dataset has {num_classes} "
            "classes; leave it None to follow the dataset"
        )
    return models.build_model(config.model.name, **overrides)
