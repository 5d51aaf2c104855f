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

from resnet_jax.train import ema as ema_lib
from resnet_jax.train.state import TrainState

# The two step functions a data source runs (train_step, eval_step below, or partials of them).
StepFn = Callable[[TrainState, dict], tuple[TrainState, dict]]
EvalFn = Callable[[TrainState, dict], dict]

Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, in float32 (float64 on the float64 path); with `label_smoothing` the
    target puts 1 - eps on the label and eps / num_classes on every class."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float64 stays float64
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def micro_batches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [B / k, k, ...]: micro-batch i is column i, the examples x[i::k].

    Interleaved rather than consecutive runs: a batch sharded along its first axis over n
    devices (n dividing B / k) keeps each device's rows in place (a reshape of a local block,
    no data moves), every micro-batch is spread over all n devices, and which examples share
    a micro-batch does not depend on n.
    """
    return x.reshape(x.shape[0] // k, k, *x.shape[1:])


def _gradients(state: TrainState, batch_stats: Any, batch: dict[str, jax.Array], label_smoothing: float):
    """(mean loss, wrong count, new batch_stats, gradients) of one (micro-)batch."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    wrong = jnp.sum(jnp.argmax(logits, -1) != batch["label"]).astype(jnp.float32)
    return loss, wrong, new_stats, grads


def _accumulated_gradients(state: TrainState, batch: dict[str, jax.Array], label_smoothing: float, k: int):
    """The gradients of k micro-batches (see `micro_batches`), averaged, one after another in
    a loop, so that only one micro-batch's activations are alive at a time. BN normalises each
    micro-batch with its own statistics and updates the running ones after each (k updates)."""
    parts = {name: micro_batches(x, k) for name, x in batch.items()}

    def body(i, carry):
        loss_sum, wrong, batch_stats, grad_sum = carry
        micro = {
            name: jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False) for name, x in parts.items()
        }
        loss, w, batch_stats, grads = _gradients(state, batch_stats, micro, label_smoothing)
        return loss_sum + loss, wrong + w, batch_stats, jax.tree.map(jnp.add, grad_sum, grads)

    # The loss is float32, float64 on the models' float64 path (float64 parameters).
    zero = jnp.zeros((), jnp.result_type(jnp.float32, *jax.tree.leaves(state.params)))
    init = (zero, jnp.float32(0), state.batch_stats, jax.tree.map(jnp.zeros_like, state.params))
    loss_sum, wrong, batch_stats, grad_sum = jax.lax.fori_loop(0, k, body, init)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return loss_sum / k, wrong, batch_stats, grads


def train_step(
    state: TrainState, batch: dict[str, jax.Array], label_smoothing: float = 0.0, accumulate_steps: int = 1
) -> tuple[TrainState, Metrics]:
    """One optimizer update. `accumulate_steps` = k > 1: the update averages the gradients of
    k micro-batches of B / k examples (`_accumulated_gradients`); loss and error are over
    the whole batch either way."""
    if accumulate_steps == 1:
        loss, wrong, batch_stats, grads = _gradients(state, state.batch_stats, batch, label_smoothing)
    else:
        loss, wrong, batch_stats, grads = _accumulated_gradients(
            state, batch, label_smoothing, accumulate_steps
        )
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "error": wrong / batch["label"].shape[0],
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return ema_lib.apply(new_state), metrics  # the weights' moving average, when kept


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
