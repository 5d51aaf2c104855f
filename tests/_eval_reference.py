"""Evaluation metrics from raw logits in plain numpy: the reference the evaluation is tested against.

Nothing here imports resnet_jax. The definitions (He et al. 2015, Sections 3.4 and 4.1):
- every view of an image (1 for 'center', 10 for 'ten_crop', 2 per scale for 'multi_scale')
  gives softmax probabilities; the image's score is their MEAN over all its views (the paper
  "average[s] the softmax scores"), not the mean of log-probabilities nor of logits;
- top-1 error: the label is not the class of the highest averaged probability; top-5 error:
  the label is not among the 5 highest (with fewer than 5 classes, never wrong);
- ties: the lower class index ranks first (what numpy's stable argsort and jax.lax.top_k do),
  so the label's rank is #(classes scoring more) + #(lower-index classes scoring the same);
- loss: the cross-entropy of the averaged probabilities, -log(mean_v softmax(z_v)[label]);
- padding examples (mask False) count for nothing: each metric is a mean over the real
  examples of the whole dataset (sums over batches divided by the number of real examples).
Computed in float64 from the given (float32) logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64, shifted by the max for stability."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def averaged_probabilities(groups: Sequence[np.ndarray]) -> np.ndarray:
    """[N, C]: the mean over every view of every group of softmax(logits).

    `groups`: logits of shape [N, V_g, C], one per image size (multi-scale: one per scale);
    a group of V_g views counts V_g times, i.e. every view weighs the same.
    """
    views = np.concatenate([np.asarray(g, np.float64) for g in groups], axis=1)
    return softmax(views).mean(axis=1)


def label_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N] 0-based rank of each label among its row's scores, ties to the lower class index."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    own = scores[np.arange(len(labels)), labels][:, None]
    lower = np.arange(scores.shape[1])[None, :] < labels[:, None]
    return np.sum(scores > own, axis=1) + np.sum((scores == own) & lower, axis=1)


def per_example(groups: Sequence[np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example loss, top-1 and top-5 wrongness ([N] float64 each) from the views' logits."""
    probs = averaged_probabilities(groups)
    labels = np.asarray(labels)
    rank = label_rank(probs, labels)
    return {
        "loss": -np.log(probs[np.arange(len(labels)), labels]),
        "wrong": (rank >= 1).astype(np.float64),
        "wrong5": (rank >= 5).astype(np.float64),
    }


def sums(groups: Sequence[np.ndarray], labels: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """What one batch adds up to over its real examples: loss_sum, wrong, wrong5, count."""
    mask = np.asarray(mask, bool)
    ex = per_example(groups, labels)
    return {
        "loss_sum": float(ex["loss"][mask].sum()),
        "wrong": float(ex["wrong"][mask].sum()),
        "wrong5": float(ex["wrong5"][mask].sum()),
        "count": float(mask.sum()),
    }


def summary(batches: Sequence[tuple[Sequence[np.ndarray], np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Dataset metrics from (groups, labels, mask) per batch: loss, error, error_top5, count."""
    total = {"loss_sum": 0.0, "wrong": 0.0, "wrong5": 0.0, "count": 0.0}
    for groups, labels, mask in batches:
        for k, v in sums(groups, labels, mask).items():
            total[k] += v
    n = total["count"]
    if n == 0:
        raise ValueError("no real (mask=True) example to evaluate")
    return {
        "loss": total["loss_sum"] / n,
        "error": total["wrong"] / n,
        "error_top5": total["wrong5"] / n,
        "count": int(n),
    }


# Alternatives the evaluation must NOT compute; the tests check that their data tell them apart.
def log_prob_mean_top1(groups: Sequence[np.ndarray]) -> np.ndarray:
    views = np.concatenate([np.asarray(g, np.float64) for g in groups], axis=1)
    return np.argmax(np.log(softmax(views)).mean(axis=1), axis=-1)


def logit_mean_top1(groups: Sequence[np.ndarray]) -> np.ndarray:
    views = np.concatenate([np.asarray(g, np.float64) for g in groups], axis=1)
    return np.argmax(views.mean(axis=1), axis=-1)
