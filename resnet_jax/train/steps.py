"""Pure train and eval steps: (state, batch) -> (state, metrics).

They know nothing of devices, data sources or configs: the batch is a dict with
'image' (float, already augmented and normalised), 'label' (int) and, for evaluation,
'mask' (bool, False for padding examples). Under jit with a batch sharded over a mesh,
BatchNorm statistics and the loss are reduced over the global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from resnet_jax.train.state import TrainState

Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"])
        return jnp.mean(cross_entropy(logits, batch["label"])), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "error": jnp.mean(jnp.argmax(logits, -1) != batch["label"]).astype(jnp.float32),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, Any]) -> Metrics:
    """Sums over the real (mask=True) examples, so that batches can be added up exactly."""
    logits = state.apply_fn(state.variables, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    wrong = (jnp.argmax(logits, -1) != batch["label"]).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "wrong": jnp.sum(wrong * mask),
        "count": jnp.sum(mask),
    }
