"""Every number the evaluation reports, against a plain-numpy reference from raw logits.

The reference (tests/_eval_reference.py, no resnet_jax code) averages softmax probabilities
over the views, ranks labels with ties to the lower class index, and drops padding rows
(mask False). It is compared with what the code reports for 'center', 'ten_crop' and
'multi_scale':
  (a) `steps.eval_step` itself, on batches whose views carry known logits (a stand-in
      apply_fn reads the logits off the image), padding rows included;
  (b) the trainer's eval record in metrics.jsonl, for a tiny ResNet on the shared ImageNet
      JPEGs: the reference gets the logits of every view of every image by applying the
      run's checkpointed variables to the views the data pipeline makes;
  (c) scripts/evaluate.py's `evaluate` on the same run and on weights whose head was edited
      so that top-1 and top-5 errors lie strictly between 0 and 1.
"""

from __future__ import annotations

import functools
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _eval_reference as ref
from _configs import ROOT, load_config
from _imagenet import make_image_folder
from resnet_jax.train import steps
from resnet_jax.train.state import TrainState

KEYS = ("loss_sum", "wrong", "wrong5", "count")


# ---------------------------------------------------------------------------------------------
# (a) eval_step on known logits


@functools.lru_cache(maxsize=None)
def _reader(num_classes: int):
    """A stand-in model: the logits of an image are its first `num_classes` pixel values."""

    def apply_fn(variables, x, train):
        assert not train
        return x.reshape(x.shape[0], -1)[:, :num_classes]

    return apply_fn


def _state(num_classes: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params={}, batch_stats={}, opt_state=(),
                      apply_fn=_reader(num_classes), tx=None)


def _as_views(logits: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """[B, V, C] logits -> [B, V, side, side, 1] images whose first C pixels are the logits."""
    b, v, c = logits.shape
    assert side * side >= c
    flat = rng.normal(size=(b, v, side * side)).astype(np.float32) * 100  # junk beyond the logits
    flat[..., :c] = logits
    return flat.reshape(b, v, side, side, 1)


def _batch(rng, *, batch: int, groups: tuple[int, ...], num_classes: int, padding: int, scale: float = 3.0):
    """Known logits for `groups` (views per group), labels, and a mask with `padding` False rows
    at the end. Padding rows get their least likely class as label (wrong, top-5 too, were they counted)."""
    logits = [(rng.normal(size=(batch, v, num_classes)) * scale).astype(np.float32) for v in groups]
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    mask = np.arange(batch) < batch - padding
    labels[~mask] = np.argmin(ref.averaged_probabilities(logits)[~mask], axis=-1)
    sides = [int(np.ceil(np.sqrt(num_classes))) + i for i in range(len(groups))]  # a size per group
    views = tuple(_as_views(lg, s, rng) for lg, s in zip(logits, sides))
    return logits, {"views": views, "label": labels, "mask": mask}


def _check_against_reference(out, logits, batch):
    expected = ref.sums(logits, batch["label"], batch["mask"])
    got = {k: float(out[k]) for k in KEYS}
    assert got["count"] == expected["count"] > 0
    assert got["wrong"] == expected["wrong"] and got["wrong5"] == expected["wrong5"]
    assert got["loss_sum"] == pytest.approx(expected["loss_sum"], rel=1e-5)
    return expected


PROTOCOL_GROUPS = {"center": (1,), "ten_crop": (10,), "multi_scale": (2, 2, 2)}


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_GROUPS))
def test_eval_step_matches_the_reference_on_known_logits(protocol):
    rng = np.random.default_rng(sorted(PROTOCOL_GROUPS).index(protocol))
    logits, batch = _batch(rng, batch=64, groups=PROTOCOL_GROUPS[protocol], num_classes=12, padding=5)
    out = jax.jit(steps.eval_step)(_state(12), batch)
    expected = _check_against_reference(out, logits, batch)
    assert expected["count"] == 59
    # Not vacuous: errors strictly inside (0, count), and the 5 padding rows, all wrong,
    # would have changed the sums had they been counted.
    assert 0 < expected["wrong5"] < expected["wrong"] < expected["count"]
    everything = ref.sums(logits, batch["label"], np.ones(64, bool))
    assert everything["wrong"] == expected["wrong"] + 5 and everything["wrong5"] == expected["wrong5"] + 5
    if protocol != "center":
        # The data tell probability averaging from log-probability and logit averaging.
        top1 = np.argmax(ref.averaged_probabilities(logits), axis=-1)
        assert np.sum(top1 != ref.log_prob_mean_top1(logits)) > 0
        assert np.sum(top1 != ref.logit_mean_top1(logits)) > 0


def test_eval_step_single_image_batch_is_the_one_view_case():
    """'image' [B, H, W, C] (CIFAR's path) is the same as one view of it."""
    rng = np.random.default_rng(7)
    logits, batch = _batch(rng, batch=32, groups=(1,), num_classes=10, padding=3)
    single = {"image": batch["views"][0][:, 0], "label": batch["label"], "mask": batch["mask"]}
    out = steps.eval_step(_state(10), single)
    assert _check_against_reference(out, logits, batch)["count"] == 29


def test_eval_step_summed_over_batches_is_the_dataset_mean():
    """Batches add up exactly; summarize_eval divides by the real examples, not the rows."""
    rng = np.random.default_rng(11)
    parts = [_batch(rng, batch=16, groups=(10,), num_classes=8, padding=p) for p in (0, 0, 9)]
    eval_fn = jax.jit(steps.eval_step)
    total = None
    for _, batch in parts:
        out = eval_fn(_state(8), batch)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    record = steps.summarize_eval(jax.device_get(total))
    expected = ref.summary([(lg, b["label"], b["mask"]) for lg, b in parts])
    assert record["count"] == expected["count"] == 16 + 16 + 7
    assert record["error"] == pytest.approx(expected["error"], abs=1e-12)
    assert record["error_top5"] == pytest.approx(expected["error_top5"], abs=1e-12)
    assert record["loss"] == pytest.approx(expected["loss"], rel=1e-5)


@pytest.mark.parametrize("num_classes", [2, 3, 5, 6])
def test_top5_with_few_classes(num_classes):
    """With <= 5 classes every label is in the top 5; with 6, only the lowest-scored one is out."""
    rng = np.random.default_rng(num_classes)
    logits, batch = _batch(rng, batch=40, groups=(10,), num_classes=num_classes, padding=4)
    out = jax.jit(steps.eval_step)(_state(num_classes), batch)
    expected = _check_against_reference(out, logits, batch)
    if num_classes <= 5:
        assert float(out["wrong5"]) == 0.0
    else:
        assert 0 < expected["wrong5"] < expected["count"]


def test_ties_rank_the_lower_class_index_first():
    """Exact ties (one view, equal logits): the lower class index wins top-1 and top-5 places."""
    logits = np.zeros((8, 1, 7), np.float32)
    logits[:, 0, :] = [1, 1, 1, 1, 1, 1, 1]
    logits[4:, 0, :] = [0, 2, 2, 2, 2, 2, 2]  # classes 1..6 tie for first place
    labels = np.array([0, 1, 4, 5, 1, 2, 5, 6], np.int32)
    mask = np.ones(8, bool)
    views = (logits.reshape(8, 1, 7, 1, 1),)
    out = jax.jit(steps.eval_step)(_state(7), {"views": views, "label": labels, "mask": mask})
    rank = ref.label_rank(ref.averaged_probabilities([logits]), labels)
    np.testing.assert_array_equal(rank, [0, 1, 4, 5, 0, 1, 4, 5])
    assert float(out["wrong"]) == np.sum(rank >= 1) == 6
    assert float(out["wrong5"]) == np.sum(rank >= 5) == 2
