"""Which examples go into which batch: per-epoch shuffles and eval batch plans.

Owns the index plans that feed both the on-device CIFAR gather and any host
pipeline. Plans are pure functions of (seed, epoch/step, sizes), computed with
numpy's PCG64, so every host and every resumed run derives identical batches.
"""

from __future__ import annotations

import functools

import numpy as np


def _check_nonnegative(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}: got {value!r}, want an integer >= 0")


def check_positive(name: str, value: int) -> None:
    """ValueError naming `name` unless `value` is an integer >= 1 (batch sizes, counts)."""
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: got {value!r}, want an integer >= 1")


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffle of `range(n)` for one epoch, int32, read-only.

    Seeded by the pair (seed, epoch) through SeedSequence, so epochs are
    independent streams and any epoch can be rebuilt without replaying earlier ones.
    """
    _check_nonnegative("seed", seed)
    _check_nonnegative("epoch", epoch)
    check_positive("n", n)
    return _cached_permutation(int(seed), int(epoch), int(n))


@functools.lru_cache(maxsize=2)
def _cached_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    # Two entries: a window of steps straddles at most an epoch boundary.
    generator = np.random.Generator(np.random.PCG64([seed, epoch]))
    permutation = generator.permutation(n).astype(np.int32)
    permutation.setflags(write=False)  # shared by the cache: callers must not mutate it
    return permutation


def train_indices(seed: int, start_step: int, num_steps: int, batch_size: int, n: int) -> np.ndarray:
    """Example indices [num_steps, batch_size] (int32) for steps start_step.. of training.

    Step s reads positions [(s % spe) * B, (s % spe + 1) * B) of epoch s // spe's
    permutation, spe = n // B; the n % B examples left over each epoch are skipped
    (a different set each epoch), so every batch is full and static in shape.
    """
    _check_nonnegative("start_step", start_step)
    _check_nonnegative("num_steps", num_steps)
    check_positive("batch_size", batch_size)
    check_positive("n", n)
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size: got {batch_size}, larger than the {n} examples (one epoch needs a full batch)"
        )
    out = np.empty((num_steps, batch_size), dtype=np.int32)
    step, end = start_step, start_step + num_steps
    while step < end:
        epoch, position = divmod(step, steps_per_epoch)
        count = min(end - step, steps_per_epoch - position)
        window = epoch_permutation(seed, epoch, n)[position * batch_size : (position + count) * batch_size]
        out[step - start_step : step - start_step + count] = window.reshape(count, batch_size)
        step += count
    return out


def eval_batches(n: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Covers range(n) once in order: (indices int32 [B], mask bool [B]) per batch.

    The last batch is padded with index 0 and mask False so shapes stay static;
    metrics must weight examples by the mask.
    """
    check_positive("n", n)
    check_positive("batch_size", batch_size)
    batches = []
    for start in range(0, n, batch_size):
        valid = min(batch_size, n - start)
        indices = np.zeros(batch_size, dtype=np.int32)
        indices[:valid] = np.arange(start, start + valid, dtype=np.int32)
        mask = np.arange(batch_size) < valid
        batches.append((indices, mask))
    return batches
