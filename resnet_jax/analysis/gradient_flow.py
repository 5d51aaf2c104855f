"""The gradient through the identity path: dL/dx_l at the input of every block.

For a residual block y = x + F(x) the paper's argument is dL/dx = dL/dy (I + dF/dx): the
identity term carries dL/dy back unchanged whatever F does, while a plain block
(y = F(x)) multiplies the gradient by dF/dx at every layer, so it can shrink or grow
with depth. Here the gradient at each block's input is measured directly: a zero
"probe" tensor is added to every block's input by a method interceptor, and the loss is
differentiated with respect to the probes (the derivative at probe = 0 is dL/dx_l,
counting both the residual branch and the shortcut).

The loss is the training loss (mean softmax cross-entropy over the batch, BatchNorm with
batch statistics, as in a training step).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax.analysis.probes import block_interceptor
from resnet_jax.errors import UsageError

log = logging.getLogger(__name__)

VARIANTS = ("plain", "resnet", "resnet_zero_init")


def _loss_with_probes(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    probes: Mapping[str, jax.Array] | None,
    record: dict | None = None,
    train: bool = True,
) -> jax.Array:
    def on_input(name: str, x: jax.Array) -> jax.Array:
        if record is not None:
            record[name] = x
        return x if probes is None else x + probes[name].astype(x.dtype)

    with nn.intercept_methods(block_interceptor(on_input)):
        if train:
            logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(variables, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def block_input_gradients(
    model: nn.Module, variables: Mapping[str, Any], images: Any, labels: Any, train: bool = True
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
    """(dL/dx per block, x per block, loss): every block's input and the loss's gradient
    there, keyed by block name in network order ('stage1_block1', ...)."""
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)

    def shapes(variables, images, labels):
        record: dict[str, jax.Array] = {}
        _loss_with_probes(model, variables, images, labels, None, record, train)
        order[:] = list(record)  # call order; jax returns dicts with sorted keys
        return record

    order: list[str] = []
    inputs_abstract = jax.eval_shape(shapes, variables, images, labels)
    probes = {k: jnp.zeros(v.shape, jnp.float32) for k, v in inputs_abstract.items()}

    @jax.jit
    def run(variables, images, labels, probes):
        record: dict[str, jax.Array] = {}

        def loss_fn(p):
            loss = _loss_with_probes(model, variables, images, labels, p, record, train)
            return loss, dict(record)

        (loss, inputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(probes)
        return grads, inputs, loss

    grads, inputs, loss = run(variables, images, labels, probes)
    return {k: grads[k] for k in order}, {k: inputs[k] for k in order}, loss


def gradient_norms(
    model: nn.Module, variables: Mapping[str, Any], images: Any, labels: Any, train: bool = True
) -> dict[str, Any]:
    """Per-block L2 norms of dL/dx over the whole batch, JSON-ready."""
    grads, _, loss = block_input_gradients(model, variables, images, labels, train)
    blocks = [{"name": name, "grad_norm": float(jnp.linalg.norm(g.ravel()))} for name, g in grads.items()]
    norms = np.array([b["grad_norm"] for b in blocks])
    last = norms[-1] if norms[-1] > 0 else np.nan
    return {
        "loss": float(loss),
        "blocks": blocks,
        "first_over_last": float(norms[0] / last),
        "min_over_last": float(norms.min() / last),
        "max_over_last": float(norms.max() / last),
    }


def model_name(variant: str, depth: int) -> tuple[str, dict[str, Any]]:
    """Registry name and overrides of a CIFAR net of ``variant`` (see VARIANTS)."""
    if variant not in VARIANTS:
        raise UsageError(f"variant {variant!r} is not one of {VARIANTS}")
    if variant == "plain":
        return f"cifar_plain{depth}", {}
    return f"cifar_resnet{depth}", {"zero_init_last": variant == "resnet_zero_init"}


def markdown_table(data: Mapping[str, Any]) -> str:
    lines = [
        "| net | blocks | ‖g_first‖ / ‖g_last‖ | min / last | max / last | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, net in data["nets"].items():
        lines.append(
            f"| {name} | {len(net['blocks'])} | {net['first_over_last']:.3g} | "
            f"{net['min_over_last']:.3g} | {net['max_over_last']:.3g} | {net['loss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def sweep_at_init(
    depths: Sequence[int], variants: Sequence[str], images: Any, labels: Any, seed: int = 0
) -> dict[str, Any]:
    """Gradient norms at initialisation (the trainer's init for ``seed``) for every pair."""
    from resnet_jax import models
    from resnet_jax.analysis.probes import init_variables

    nets = {}
    for depth in depths:
        for variant in variants:
            name, overrides = model_name(variant, depth)
            model = models.build_model(name, **overrides)
            result = gradient_norms(model, init_variables(model, seed), images, labels)
            label = f"{'plain' if variant == 'plain' else 'ResNet'}-{depth}" + (
                " zero-init" if variant == "resnet_zero_init" else ""
            )
            nets[label] = {"model": name, "depth": depth, "variant": variant, "checkpoint": None, **result}
            log.info("%s: |g_first| / |g_last| = %.3g", label, result["first_over_last"])
    return {"nets": nets, "seed": seed, "batch": int(np.shape(labels)[0])}
