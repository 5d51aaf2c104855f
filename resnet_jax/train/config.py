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


def _int_sequence(v):
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        return "a sequence of integers"
    if not all(_is_int(x) for x in v):
        return "a sequence of integers"
    return None


# The schema: every field the CIFAR trainer reads, with its check.
SCHEMA: dict[str, Callable[[Any], str | None]] = {
    "seed": _int(0, 2**31 - 1),
    "model.name": _str(),
    "model.shortcut": _choice("A", "B", "C", optional=True),
    "model.zero_init_last": _bool,
    "model.width_multiplier": _real(0, 64, lo_open=True),
    "model.bn_momentum": _real(0, 1, hi_open=True),
    "model.ghost_batch_size": _int(1, optional=True),
    "model.dtype": _choice("float32", "bfloat16"),
    "dataset.name": _choice("cifar10"),
    "dataset.source": _choice("auto", "binary", "tfds"),
    "dataset.data_dir": _str(optional=True),
    "dataset.validation_size": _int(0, 49_999),
    "dataset.train_subset": _int(0, 50_000),
    "dataset.eval_subset": _int(0, 10_000),
    "dataset.normalization": _choice("pixel_mean", "channel_std"),
    "dataset.pad": _int(0, 16),
    "dataset.flip": _bool,
    "batch_size": _int(1, 1 << 20),
    "eval_batch_size": _int(1, 1 << 20),
    "reference_batch_size": _int(1, 1 << 20),
    "optimizer.learning_rate": _real(0, 100, lo_open=True),
    "optimizer.momentum": _real(0, 1, hi_open=True),
    "optimizer.nesterov": _bool,
    "optimizer.weight_decay": _real(0, 1),
    "optimizer.weight_decay_on": _choice("all", "kernels", "no_bn"),
    "schedule.total_steps": _int(1, 10**9),
    "schedule.boundaries": _int_sequence,
    "schedule.decay_factor": _real(0, 1, lo_open=True),
    "schedule.warmup_steps": _int(0, 10**9),
    "schedule.warmup_learning_rate": _real(0, 100, lo_open=True),
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

# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = frozenset({
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "allow_config_change", "tensorboard", "dataset.data_dir", "dataset.source", "eval_batch_size",
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


def validate(config: ml_collections.ConfigDict | Mapping[str, Any], num_devices: int = 1) -> Derived:
    """Checks every field; returns the derived values or raises ConfigError."""
    flat = flatten(_as_dict(config))
    unknown = sorted(set(flat) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(SCHEMA)}")
    missing = sorted(set(SCHEMA) - set(flat))
    if missing:
        raise ConfigError(f"missing config field(s) {missing}; start from configs/cifar10.py")
    for field, check in SCHEMA.items():
        problem = check(flat[field])
        if problem:
            raise ConfigError(f"config field {field} = {flat[field]!r}: must be {problem}")

    _check_model(flat)
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

    num_train = 50_000 - flat["dataset.validation_size"]
    if flat["dataset.train_subset"]:
        if flat["dataset.train_subset"] > num_train:
            raise ConfigError(f"config field dataset.train_subset = {flat['dataset.train_subset']} exceeds "
                              f"the {num_train} training images")
        num_train = flat["dataset.train_subset"]
    if num_train < batch:
        raise ConfigError(f"config field batch_size = {batch} exceeds the {num_train} training images")
    num_eval = flat["dataset.validation_size"] or 10_000
    if flat["dataset.eval_subset"]:
        if flat["dataset.eval_subset"] > num_eval:
            raise ConfigError(f"config field dataset.eval_subset = {flat['dataset.eval_subset']} exceeds "
                              f"the {num_eval} evaluation images")
        num_eval = flat["dataset.eval_subset"]

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

    lr_scale = batch / ref
    return Derived(
        learning_rate=flat["optimizer.learning_rate"] * lr_scale,
        warmup_learning_rate=flat["schedule.warmup_learning_rate"] * lr_scale,
        total_steps=total,
        boundaries=scaled,
        warmup_steps=warmup,
        steps_per_epoch=num_train // batch,
        num_train=num_train,
        num_eval=num_eval,
    )


def model_overrides(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The `config.model` fields handed to `models.build_model` (None: family default)."""
    return {k: v for k, v in dict(model_config).items() if k != "name" and v is not None}


def _check_model(flat: Mapping[str, Any]) -> None:
    model_cfg = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("model.")}
    try:
        models.build_model(model_cfg["name"], **model_overrides(model_cfg))
    except ValueError as e:
        raise ConfigError(f"config field model ({model_cfg['name']!r}): {e}") from None
