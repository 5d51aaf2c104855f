"""Pure train and eval steps: (state, batch) -> (state, metrics).

They know nothing of devices, data sources or configs: the batch is a dict with
'image' (float, already augmented and normalised), 'label' (int) and, for evaluation,
'mask' (bool, False for padding examples). Under jit with a batch sharded over a mesh,
BatchNorm statistics and the loss are reduced over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from resnet_jax.train.state import TrainState

# The two step functions a data source runs (train_step, eval_step below, or partials of them).
StepFn = Callable[[TrainState, dict], tuple[TrainState, dict]]
EvalFn = Callable[[TrainState, dict], dict]

Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, computed in float32; with `label_smoothing` the
    target puts 1 - eps on the label and eps / num_classes on every class."""
    logits = logits.astype(jnp.float32)
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(
    state: TrainState, batch: dict[str, jax.Array], label_smoothing: float = 0.0
) -> tuple[TrainState, Metrics]:
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "error": jnp.mean(jnp.argmax(logits, -1) != batch["label"]).astype(jnp.float32),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


def view_scores(state: TrainState, views: tuple[jax.Array, ...]) -> jax.Array:
    """log of the softmax scores averaged over every view of an image: [B, classes].

    `views`: groups of shape [B, V, H, W, C] (one group per image size: 10-crop is one
    group of 10, multi-scale one group per scale). One view gives plain log-softmax.
    """
    log_probs = []
    for group in views:
        b, v = group.shape[:2]
        logits = state.apply_fn(state.variables, group.reshape(b * v, *group.shape[2:]), train=False)
        log_probs.append(jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, v, -1))
    log_probs = jnp.concatenate(log_probs, axis=1)
    return jax.nn.logsumexp(log_probs, axis=1) - jnp.log(jnp.float32(log_probs.shape[1]))


def eval_step(state: TrainState, batch: dict[str, Any]) -> Metrics:
    """Sums over the real (mask=True) examples, so that batches can be added up exactly.

    The batch holds 'image' [B, H, W, C] (one view) or 'views' (see `view_scores`).
    'wrong5': the label is not among the 5 best scores (ties broken towards the lower
    class index, as argmax does for 'wrong').
    """
    views = batch["views"] if "views" in batch else (batch["image"][:, None],)
    scores = view_scores(state, tuple(views))
    labels = batch["label"]
    _, top = jax.lax.top_k(scores, min(5, scores.shape[-1]))
    mask = batch["mask"].astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(-jnp.take_along_axis(scores, labels[:, None], axis=-1)[:, 0] * mask),
        "wrong": jnp.sum((top[:, 0] != labels).astype(jnp.float32) * mask),
        "wrong5": jnp.sum((~jnp.any(top == labels[:, None], axis=-1)).astype(jnp.float32) * mask),
        "count": jnp.sum(mask),
    }


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
    """Summed eval metrics -> the record written to metrics.jsonl."""
    count = float(sums["count"])
    return {
        "loss": float(sums["loss_sum"]) / count,
        "error": float(sums["wrong"]) / count,
        "error_top5": float(sums["wrong5"]) / count,
        "count": int(count),
    }
