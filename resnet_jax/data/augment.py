"""CIFAR normalisation and on-device augmentation (pad + random crop + flip).

Owns the train-time and eval-time image transforms of the CIFAR recipe (He et
al. 2015, Sec. 4.2). Everything but `normalization_stats` is a pure jax function
meant to run inside the jitted step on NHWC batches already on the devices, so
no host work happens per step. The random draws depend only on the key and the
batch shape, never on how the batch is sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

NORMALIZATION_MODES = ("pixel_mean", "channel_std")

# Squares of uint8 pixels fit in uint16; chunking bounds the temporary memory.
_STATS_CHUNK = 2500


def normalization_stats(train_images: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (float32, [0, 1] pixel scale) that `normalize` divides out.

    'pixel_mean' is the 2015 paper's per-pixel mean subtraction: mean is the
    [H, W, C] mean image and std is 1 per channel (so inputs keep the [0, 1]
    scale's spread). 'channel_std' standardises each channel: mean and std have
    shape [C]. Computed once on the host in float64 from exact integer sums.
    """
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"mode: got {mode!r}, allowed {', '.join(map(repr, NORMALIZATION_MODES))}")
    images = np.asarray(train_images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"train_images: got {images.dtype}{list(images.shape)}, want non-empty uint8[N,H,W,C]"
        )
    total = images.sum(axis=0, dtype=np.float64)
    squares = np.zeros(images.shape[1:], dtype=np.float64)
    for start in range(0, len(images), _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK]
        squares += np.square(chunk, dtype=np.uint16).sum(axis=0, dtype=np.float64)
    channels = images.shape[-1]
    if mode == "pixel_mean":
        mean = total / (len(images) * 255.0)
        return mean.astype(np.float32), np.ones(channels, dtype=np.float32)
    count = images[..., 0].size
    mean = total.sum(axis=(0, 1)) / (count * 255.0)
    variance = squares.sum(axis=(0, 1)) / (count * 255.0**2) - mean**2
    return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


def normalize(
    images: jax.Array, mean: ArrayLike, std: ArrayLike, dtype: DTypeLike = jnp.float32
) -> jax.Array:
    """uint8 [..., H, W, C] -> (pixels / 255 - mean) / std, computed in float32, cast to `dtype`."""
    if images.dtype != jnp.uint8:
        raise ValueError(f"images: got dtype {images.dtype}, want uint8 (raw CIFAR pixels)")
    scaled = images.astype(jnp.float32) / 255.0
    return ((scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def random_crop_flip(key: jax.Array, images: jax.Array, pad: int = 4, flip: bool = True) -> jax.Array:
    """Random HxW crop of the zero-padded batch, then a horizontal flip with p=0.5.

    `images` are already normalised, so the padding is zero after mean
    subtraction, as in the paper. Offsets are uniform in [0, 2*pad] per example.
    Crop and flip are one batched gather: each example reads rows
    `dy + i` and columns `dx + j` (or `dx + W-1-j` when flipped) of its padded
    image, which partitions along the batch axis without communication.
    """
    if images.ndim != 4:
        raise ValueError(f"images: got shape {images.shape}, want [B, H, W, C]")
    if not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad: got {pad!r}, want an integer >= 0")
    batch, height, width, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    flipped = jax.random.bernoulli(flip_key, 0.5, (batch,)) & flip
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, :1] + jnp.arange(height)
    columns = jnp.where(flipped[:, None], jnp.arange(width)[::-1], jnp.arange(width))
    columns = columns + offsets[:, 1:]
    return jax.vmap(lambda image, r, c: image[r[:, None], c[None, :]])(padded, rows, columns)


def augment_batch(
    key: jax.Array,
    images: jax.Array,
    mean: ArrayLike,
    std: ArrayLike,
    *,
    pad: int,
    flip: bool,
    dtype: DTypeLike,
) -> jax.Array:
    """The train-time path: normalise uint8 images, then random crop and flip."""
    return random_crop_flip(key, normalize(images, mean, std, dtype), pad=pad, flip=flip)


def eval_batch(images: jax.Array, mean: ArrayLike, std: ArrayLike, dtype: DTypeLike) -> jax.Array:
    """The eval-time path: normalisation only, no augmentation."""
    return normalize(images, mean, std, dtype)
