"""The optimizer and the learning-rate schedule of the paper.

SGD with momentum and weight decay added to the gradient (L2 regularisation, as in the
paper's Caffe solver and torch.optim.SGD), a step schedule dividing the rate by 10 at
given iterations, and the optional warm-up of ResNet-110; a cosine schedule for the
"v1.5" ImageNet recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from resnet_jax.train.fields import ConfigError

WEIGHT_DECAY_TARGETS = ("all", "kernels", "no_bn")


def step_schedule(
    learning_rate: float,
    boundaries: Sequence[int],
    decay_factor: float = 0.1,
    warmup_steps: int = 0,
    warmup_learning_rate: float = 0.0,
    warmup: str = "constant",
) -> optax.Schedule:
    """lr(step) = learning_rate * decay_factor ** (number of boundaries <= step).

    Warm-up: 'constant' holds `warmup_learning_rate` for the first `warmup_steps` steps
    (the paper's ResNet-110 uses 0.01 for 400 iterations, then 0.1); 'linear' ramps from
    `warmup_learning_rate` to `learning_rate` over them (Goyal et al. 2017).
    """
    if warmup not in ("constant", "linear"):
        raise ValueError(f"warmup = {warmup!r}: must be 'constant' or 'linear'")
    bounds = jnp.asarray(tuple(boundaries), jnp.int32)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        drops = jnp.sum(step >= bounds) if len(boundaries) else 0
        lr = learning_rate * jnp.power(jnp.float32(decay_factor), drops)
        if warmup_steps:
            if warmup == "constant":
                warm = jnp.float32(warmup_learning_rate)
            else:
                frac = step.astype(jnp.float32) / warmup_steps
                warm = warmup_learning_rate + (learning_rate - warmup_learning_rate) * frac
            lr = jnp.where(step < warmup_steps, warm, lr)
        return lr

    return schedule


def cosine_schedule(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_learning_rate: float = 0.0,
    warmup: str = "linear",
) -> optax.Schedule:
    """lr(step) = learning_rate * (1 + cos(pi * t)) / 2, t going from 0 after the warm-up
    to 1 at `total_steps` (Loshchilov & Hutter 2017, without restarts; the "v1.5" recipe).
    The warm-up is as in `step_schedule`."""
    if warmup not in ("constant", "linear"):
        raise ValueError(f"warmup = {warmup!r}: must be 'constant' or 'linear'")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps = {warmup_steps}: must be in [0, total_steps = {total_steps})")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        lr = learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        if warmup_steps:
            if warmup == "constant":
                warm = jnp.float32(warmup_learning_rate)
            else:
                warm = warmup_learning_rate + (learning_rate - warmup_learning_rate) * step / warmup_steps
            lr = jnp.where(step < warmup_steps, warm, lr)
        return lr

    return schedule


def weight_decay_mask(params: Any, target: str) -> Any:
    """Which parameters weight decay covers.

    'all': every parameter (the paper: Caffe's solver decays all weights, BN included);
    'kernels': conv and dense kernels only; 'no_bn': all but BatchNorm scales and biases.
    """
    if target not in WEIGHT_DECAY_TARGETS:
        raise ValueError(f"weight_decay_on = {target!r}: must be one of {WEIGHT_DECAY_TARGETS}")

    def keep(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if target == "all":
            return True
        if target == "kernels":
            return name == "kernel"
        return not (name in ("scale", "bias") and _is_norm(path[-2]))

    return jax.tree_util.tree_map_with_path(keep, params)


def _is_norm(module_key) -> bool:
    name = str(getattr(module_key, "key", module_key)).lower()
    return "norm" in name or "bn" in name


def sgd(
    schedule: optax.Schedule,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    decay_mask: Any = None,
) -> optax.GradientTransformation:
    """g <- g + wd * w (masked); v <- momentum * v + g; w <- w - lr * v."""
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
    return optax.chain(*parts)


def build_optimizer(config: Any, derived: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and schedule a training config asks for, at its derived (scaled) values."""
    sched = config.schedule
    if sched.kind == "cosine":
        schedule = cosine_schedule(
            derived.learning_rate,
            derived.total_steps,
            derived.warmup_steps,
            derived.warmup_learning_rate,
            sched.warmup,
        )
    else:
        schedule = step_schedule(
            derived.learning_rate,
            derived.boundaries,
            sched.decay_factor,
            derived.warmup_steps,
            derived.warmup_learning_rate,
            sched.warmup,
        )
    opt = config.optimizer
    tx = sgd(
        schedule,
        opt.momentum,
        opt.nesterov,
        opt.weight_decay,
        lambda params: weight_decay_mask(params, opt.weight_decay_on),
    )
    return tx, schedule


# ---------------------------------------------------------------------------- schedule maths
# From a checked config (flat dotted fields) to the schedule at the batch actually used:
# epochs to steps, the linear scaling rule (Goyal et al. 2017) for steps given at
# `reference_batch_size` and for the rates.


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


def derive(flat: Mapping[str, Any], batch: int, num_train: int, num_eval: int) -> Derived:
    """The schedule and rates of a checked config at batch size `batch`, over `num_train` images."""
    steps_per_epoch = num_train // batch
    total, boundaries, warmup = _schedule_steps(flat, batch, steps_per_epoch)
    lr_scale = batch / flat["reference_batch_size"]
    return Derived(
        learning_rate=flat["optimizer.learning_rate"] * lr_scale,
        # From the batch actually used, whether the config file or the command line set it.
        warmup_learning_rate=flat["schedule.warmup_learning_rate"]
        * (lr_scale if flat["schedule.scale_warmup_learning_rate"] else 1.0),
        total_steps=total,
        boundaries=boundaries,
        warmup_steps=warmup,
        steps_per_epoch=steps_per_epoch,
        num_train=num_train,
        num_eval=num_eval,
    )


def _schedule_steps(
    flat: Mapping[str, Any], batch: int, steps_per_epoch: int
) -> tuple[int, tuple[int, ...], int]:
    """(total steps, boundaries, warm-up steps) at the actual batch size.

    Either in steps at `reference_batch_size`, rescaled by the linear scaling rule (the
    CIFAR recipe's iterations), or in epochs (ImageNet's), which do not depend on the batch.
    """
    # Steps, where given, win: the command line can set a field but not reset one to None.
    epochs = None if flat["schedule.total_steps"] is not None else flat["schedule.epochs"]
    if flat["schedule.total_steps"] is None and epochs is None:
        raise ConfigError("config fields schedule.total_steps and schedule.epochs are both None: set one")
    if flat["schedule.kind"] == "cosine" and (
        flat["schedule.boundaries"] or flat["schedule.boundary_epochs"]
    ):
        raise ConfigError(
            "config field schedule.kind = 'cosine' takes no boundaries: set schedule.boundaries "
            "and schedule.boundary_epochs to ()"
        )
    if epochs is None:
        if flat["schedule.boundary_epochs"] or flat["schedule.warmup_epochs"]:
            raise ConfigError(
                "config fields schedule.boundary_epochs / schedule.warmup_epochs are in epochs, "
                "but schedule.total_steps is set (and wins over schedule.epochs): use "
                "schedule.boundaries / warmup_steps, and set boundary_epochs=() and warmup_epochs=0"
            )
        return _steps_schedule(flat, batch)
    if flat["schedule.boundaries"] or flat["schedule.warmup_steps"]:
        raise ConfigError(
            "config fields schedule.boundaries / schedule.warmup_steps are in steps: with "
            "schedule.epochs use schedule.boundary_epochs / schedule.warmup_epochs"
        )
    bounds = tuple(flat["schedule.boundary_epochs"])
    if any(b <= 0 or b >= epochs for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ConfigError(
            f"config field schedule.boundary_epochs = {bounds}: must be strictly increasing "
            f"epochs in (0, schedule.epochs = {epochs})"
        )
    if flat["schedule.warmup_epochs"] >= epochs or (bounds and flat["schedule.warmup_epochs"] > bounds[0]):
        raise ConfigError(
            f"config field schedule.warmup_epochs = {flat['schedule.warmup_epochs']} must be below "
            "schedule.epochs and not pass the first boundary"
        )
    total = int(round(epochs * steps_per_epoch))
    boundaries = tuple(int(round(b * steps_per_epoch)) for b in bounds)
    warmup = int(round(flat["schedule.warmup_epochs"] * steps_per_epoch))
    if total < 1 or any(b <= 0 or b >= total for b in boundaries) or len(set(boundaries)) != len(boundaries):
        raise ConfigError(
            f"config field schedule.epochs = {epochs}: at {steps_per_epoch} steps per epoch "
            f"(batch_size {batch}) the schedule is {total} steps with boundaries {boundaries}, "
            "too short to hold them; train longer or use a smaller batch_size"
        )
    return total, boundaries, warmup


def _steps_schedule(flat: Mapping[str, Any], batch: int) -> tuple[int, tuple[int, ...], int]:
    ref = flat["reference_batch_size"]
    total = _scaled(flat["schedule.total_steps"], batch, ref)
    if total < 1:
        raise ConfigError(
            f"config field schedule.total_steps = {flat['schedule.total_steps']} "
            f"at batch_size {batch} rounds to 0 steps"
        )
    boundaries = tuple(flat["schedule.boundaries"])
    if any(b <= 0 or b >= flat["schedule.total_steps"] for b in boundaries) or list(boundaries) != sorted(
        set(boundaries)
    ):
        raise ConfigError(
            f"config field schedule.boundaries = {boundaries}: must be strictly increasing steps "
            f"in (0, schedule.total_steps = {flat['schedule.total_steps']})"
        )
    if flat["schedule.warmup_steps"] >= flat["schedule.total_steps"]:
        raise ConfigError(
            f"config field schedule.warmup_steps = {flat['schedule.warmup_steps']} must be "
            f"below schedule.total_steps = {flat['schedule.total_steps']}"
        )
    if boundaries and flat["schedule.warmup_steps"] > boundaries[0]:
        raise ConfigError(
            f"config field schedule.warmup_steps = {flat['schedule.warmup_steps']} must not "
            f"pass the first boundary {boundaries[0]}"
        )
    scaled = tuple(_scaled(b, batch, ref) for b in boundaries)
    if any(b <= 0 or b >= total for b in scaled):
        # Rounding to 0 would decay the rate from the first step; to `total`, never.
        raise ConfigError(
            f"config field schedule.boundaries = {boundaries}: rescaled from reference_batch_size {ref} "
            f"to batch_size {batch} they become {scaled}, outside (0, {total} steps); use a smaller "
            "batch_size or more schedule.total_steps"
        )
    warmup = _scaled(flat["schedule.warmup_steps"], batch, ref)
    if flat["schedule.warmup_steps"] and not warmup:
        raise ConfigError(
            f"config field schedule.warmup_steps = {flat['schedule.warmup_steps']} rounds to 0 steps at "
            f"batch_size {batch} (given at reference_batch_size {ref}): the warm-up would vanish; "
            "use more warmup_steps, or 0 for none"
        )
    return total, scaled, warmup
