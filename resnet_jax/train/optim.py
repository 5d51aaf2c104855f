"""The optimizer and the learning-rate schedule of the paper.

SGD with momentum and weight decay added to the gradient (L2 regularisation, as in the
paper's Caffe solver and torch.optim.SGD), a step schedule dividing the rate by 10 at
given iterations, and the optional warm-up of ResNet-110; a cosine schedule for the
"v1.5" ImageNet recipe.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

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
        schedule = cosine_schedule(derived.learning_rate, derived.total_steps, derived.warmup_steps,
                                   derived.warmup_learning_rate, sched.warmup)
    else:
        schedule = step_schedule(derived.learning_rate, derived.boundaries, sched.decay_factor,
                                 derived.warmup_steps, derived.warmup_learning_rate, sched.warmup)
    opt = config.optimizer
    tx = sgd(schedule, opt.momentum, opt.nesterov, opt.weight_decay,
             lambda params: weight_decay_mask(params, opt.weight_decay_on))
    return tx, schedule
