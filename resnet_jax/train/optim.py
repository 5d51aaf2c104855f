"""The optimizer and the learning-rate schedule of the paper.

SGD with momentum and weight decay added to the gradient (L2 regularisation, as in the
paper's Caffe solver and torch.optim.SGD), a step schedule dividing the rate by 10 at
given iterations, and the optional warm-up of ResNet-110.
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
