"""The input normalisation a model expects, recorded with its weights.

A network's weights mean nothing without the transform its inputs went through, and a CIFAR
run's per-pixel mean is computed from its training images: unrecorded, evaluating or exporting
the run would need the training set again. The record is small JSON, written once into a run's
checkpoint directory (``<workdir>/checkpoints/normalization.json``) when training starts, and
kept as the ``normalization`` entry of a converted directory's ``pretrained.json``::

    {"format": 1, "mode": "pixel_mean" | "channel_std", "layout": "NHWC", "channels": "RGB",
     "image_size": [H, W], "value_range": [0, 1] | [0, 255],
     "mean": [H][W][C] (pixel_mean) or [C] (channel_std), "std": [C],
     "resize": shorter side before the centre crop (ImageNet evaluation) or null,
     "source": where the statistics come from}

A model's input is ``(pixels - mean) / std``, float32, NHWC, RGB, with ``pixels`` scaled to
``value_range``: CIFAR's on-device pipeline divides the raw bytes by 255 ([0, 1]), ImageNet's
tf.data pipeline keeps them in 0..255 ([0, 255]), each with its statistics in those units, as
the pipelines apply them (`augment.normalize`, `image_transforms.normalize`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.data import DataError
from resnet_jax.data.constants import MEAN_RGB, STD_RGB
from resnet_jax.files import atomic_write_bytes, to_json_compatible

FILE = "normalization.json"
FORMAT = 1
MODES = ("pixel_mean", "channel_std")
VALUE_RANGES = ((0, 1), (0, 255))


def record(
    mode: str,
    mean: Any,
    std: Any,
    *,
    image_size: Sequence[int],
    value_range: Sequence[int],
    source: str,
    resize: int | None = None,
) -> dict[str, Any]:
    """A checked normalisation record (see the module docstring); ValueError names the field."""
    out = {
        "format": FORMAT,
        "mode": mode,
        "layout": "NHWC",
        "channels": "RGB",
        "image_size": [int(s) for s in image_size],
        "value_range": [int(v) for v in value_range],
        "mean": _shortest(mean),
        "std": _shortest(std),
        "resize": None if resize is None else int(resize),
        "source": str(source),
    }
    arrays(out, where="normalisation record")
    return out


def _shortest(values: Any) -> Any:
    """Nested lists of the float32 values, each as the shortest decimal that reads back as the
    same float32 (half the digits of float64's repr; the stored value is exact either way)."""
    array = np.asarray(values, np.float32)
    if array.ndim == 0:
        return float(str(array[()]))
    return [_shortest(row) for row in array]


def imagenet(image_size: int = 224, resize: int | None = 256, source: str | None = None) -> dict[str, Any]:
    """ImageNet's per-channel mean and std (0..255 units), as the tf.data pipelines and
    torchvision's published weights expect them."""
    return record(
        "channel_std",
        MEAN_RGB,
        STD_RGB,
        image_size=(image_size, image_size),
        value_range=(0, 255),
        resize=resize,
        source=source or "ImageNet (ILSVRC-2012) per-channel mean and std",
    )


def arrays(rec: Mapping[str, Any], where: str = "normalisation record") -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of ``rec`` as float32 arrays, after checking every field: ValueError names
    ``where`` and the field that is wrong and what is allowed."""

    def bad(field: str, allowed: str) -> ValueError:
        return ValueError(f"{where}: field {field} = {rec.get(field)!r:.80}; allowed: {allowed}")

    if rec.get("format") != FORMAT:
        raise bad("format", f"{FORMAT} (a newer resnet_jax wrote it?)")
    if rec.get("mode") not in MODES:
        raise bad("mode", ", ".join(MODES))
    if rec.get("layout") != "NHWC":
        raise bad("layout", "'NHWC'")
    size = rec.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise bad("image_size", "[height, width], positive integers")
    if tuple(rec.get("value_range") or ()) not in VALUE_RANGES:
        raise bad("value_range", " or ".join(str(list(v)) for v in VALUE_RANGES))
    try:
        mean = np.asarray(rec.get("mean"), np.float32)
        std = np.asarray(rec.get("std"), np.float32)
    except (TypeError, ValueError):
        raise bad("mean", "nested lists of numbers") from None
    channels = std.shape[-1] if std.ndim == 1 else 0
    if channels == 0 or not np.all(np.isfinite(std)) or np.any(std <= 0):
        raise bad("std", "[C] finite numbers > 0")
    want = (*size, channels) if rec["mode"] == "pixel_mean" else (channels,)
    if mean.shape != want or not np.all(np.isfinite(mean)):
        raise bad("mean", f"finite numbers of shape {list(want)} for mode {rec['mode']!r}")
    return mean, std


def normalize(pixels: Any, rec: Mapping[str, Any]) -> np.ndarray:
    """uint8 RGB pixels [..., H, W, C] -> the model's float32 input, as the record says."""
    mean, std = arrays(rec)
    scaled = np.asarray(pixels, np.float32) * np.float32(rec["value_range"][1] / 255.0)
    return ((scaled - mean) / std).astype(np.float32)


def save(directory: str | os.PathLike, rec: Mapping[str, Any]) -> Path:
    """Writes ``rec`` as ``directory/FILE`` (atomically), unless that file already says the same."""
    path = Path(directory) / FILE
    content = to_json_compatible(dict(rec))
    if load(directory) != content:
        # One line: a pixel mean is 3,072 numbers, one per line when indented.
        atomic_write_bytes(path, (json.dumps(content, allow_nan=False) + "\n").encode("utf-8"))
    return path


def load(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The record in ``directory/FILE``, checked, or None when there is none; DataError names a
    file that cannot be read or does not hold a valid record."""
    path = Path(directory) / FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        arrays(rec, where=str(path))
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"{path} holds no valid normalisation record: {e}") from None
    return rec
