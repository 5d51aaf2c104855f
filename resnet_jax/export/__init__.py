r"""Trained ResNets out of the project: a ``jax.export`` StableHLO artifact or an ONNX file.

  python -m resnet_jax.export runs/cifar_resnet20 cifar_resnet20.stablehlo
  python -m resnet_jax.export resnet50.pth resnet50.onnx

SRC: a training workdir, a directory written by ``python -m resnet_jax.convert``, a
torchvision/timm ``.pth``/``.safetensors`` file, or a model name (``resnet50:IMAGENET1K_V2``).
OUT ending in ``.stablehlo``: the serialized ``jax.export`` program (weights inside, batch
dimension symbolic, lowered for CPU, CUDA and TPU; :mod:`.stablehlo`); in ``.onnx``: an ONNX
model with a dynamic batch dimension (:mod:`.onnx`, which needs the ``export`` extra). Either
way the network runs in eval mode (BatchNorm with its running statistics; a run's EMA weights
when it has them, unless ``--no-ema``), in float32 unless ``--dtype`` says otherwise, and
``OUT.json`` beside the artifact says what to feed it: input layout, shape and dtype, the
normalisation (resnet_jax.data.normalization), the classes, the model and where it came from.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resnet_jax.errors import UserError

FORMATS = {".stablehlo": "stablehlo", ".onnx": "onnx"}
SIDE_SUFFIX = ".json"
PLATFORMS_KNOWN = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
EXTRA_HINT = "pip install 'deep-residual-jax[export]'"
LOAD_HINTS = {
    "stablehlo": "jax.export.deserialize(open(PATH, 'rb').read()).call(images)",
    "onnx": "onnxruntime.InferenceSession(PATH).run(None, {INPUT_NAME: images})[0]",
}


class ExportError(UserError, ValueError):
    """OUT cannot be written as asked (its suffix, its directory, a missing optional package)."""


def check_out(out: str | os.PathLike) -> tuple[Path, str]:
    """(OUT as a path, its format); ExportError names what is wrong, before anything is loaded."""
    path = Path(os.path.expanduser(os.fspath(out)))
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise ExportError(f"OUT {out} must end in {' or '.join(FORMATS)}")
    if path.is_dir():
        raise ExportError(f"OUT {out} is a directory; name the file to write")
    if not path.parent.is_dir():
        raise ExportError(f"OUT {out}: directory {path.parent} does not exist")
    if fmt == "onnx":
        missing = [name for name in ("onnx",) if importlib.util.find_spec(name) is None]
        if missing:
            raise ExportError(f"OUT {out}: exporting ONNX needs {', '.join(missing)}: {EXTRA_HINT}")
    return path, fmt


def export_model(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str | None = None,
    ema: bool | None = None,
    image_size: int | None = None,
    dtype: str = "float32",
    platforms: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Writes ``out`` (``.stablehlo`` or ``.onnx``) and ``out + '.json'`` from ``src``; returns
    what the JSON holds. ``platforms``: the StableHLO artifact's (default cpu, cuda, tpu).
    A UserError (exit status 2) names a bad SRC or OUT before anything is compiled."""
    import jax
    import numpy as np

    from resnet_jax.export.source import load_source
    from resnet_jax.files import atomic_write_bytes

    path, fmt = check_out(out)
    if platforms is not None:
        if fmt != "stablehlo":
            raise ExportError(
                "--platforms is for .stablehlo artifacts; an ONNX file runs wherever its runtime does"
            )
        unknown = sorted(set(platforms) - set(PLATFORMS_KNOWN))
        if unknown or not platforms:
            raise ExportError(f"--platforms {','.join(platforms)}: allowed: {', '.join(PLATFORMS_KNOWN)}")
    if fmt == "onnx" and dtype != "float32":
        raise ExportError(
            f"--dtype {dtype}: ONNX export is float32 only (ONNX's convolutions take no {dtype})"
        )
    source = load_source(src, arch=arch, ema=ema, image_size=image_size, dtype=dtype)
    probe = jax.ShapeDtypeStruct((1, *source.image_shape), np.float32)
    logits = jax.eval_shape(source.apply, source.variables, probe)
    side = _side_record(source, path, fmt, dtype, str(logits.dtype))
    if fmt == "stablehlo":
        from resnet_jax.export import stablehlo

        info = stablehlo.write_stablehlo(
            source.apply,
            source.variables,
            source.image_shape,
            path,
            side,
            platforms=tuple(platforms or stablehlo.PLATFORMS),
        )
    else:
        info = _write_onnx(source, path, side)
    side["bytes"] = path.stat().st_size
    side[fmt] = info
    if fmt == "onnx":  # a consumer feeds and reads tensors by name
        side["opset"] = info["opset"]
        side["input"]["name"] = info["input"]["name"]
        side["output"]["name"] = info["output"]["name"]
        side["load"] = side["load"].replace("INPUT_NAME", repr(info["input"]["name"]))
    side["normalization"] = side.pop("normalization")  # last: a pixel mean is long
    atomic_write_bytes(Path(f"{path}{SIDE_SUFFIX}"), _side_json(side).encode("utf-8"))
    return side


def _side_json(side: dict[str, Any]) -> str:
    """Indented JSON, but the mean on one line: a pixel mean indented is 4,000 lines."""
    norm = side.get("normalization")
    if norm is None:
        return json.dumps(side, indent=2) + "\n"
    marker = "@MEAN@"
    text = json.dumps({**side, "normalization": {**norm, "mean": marker}}, indent=2)
    return text.replace(json.dumps(marker), json.dumps(norm["mean"]), 1) + "\n"


def _write_onnx(source: Any, path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    try:
        from resnet_jax.export.onnx import OnnxExportError, write_onnx
    except ModuleNotFoundError as e:  # the export extra is not installed
        if e.name and e.name.split(".")[0] == "resnet_jax":
            raise
        raise ExportError(f"OUT {path}: exporting ONNX needs {e.name}: {EXTRA_HINT}") from None
    try:
        return write_onnx(source.apply, source.variables, source.image_shape, path, metadata)
    except OnnxExportError as e:
        raise ExportError(f"OUT {path}: {e}") from None


def _side_record(source: Any, path: Path, fmt: str, dtype: str, out_dtype: str) -> dict[str, Any]:
    record = source.record
    height, width, channels = source.image_shape
    norm = source.normalization
    if norm is not None:
        norm = {
            **norm,
            "image_size": [height, width],
            "formula": "(pixels scaled to value_range - mean) / std",
        }
        norm["mean"] = norm.pop("mean")  # the long field last
    return {
        "artifact": path.name,
        "format": fmt,
        "model": record.get("model"),
        "num_classes": source.num_classes,
        "input": {
            "layout": "NHWC",
            "shape": ["batch", height, width, channels],
            "dtype": "float32",
            "channels": "RGB",
        },
        "output": {"shape": ["batch", source.num_classes], "dtype": out_dtype, "values": "logits"},
        "mode": "eval: BatchNorm normalises with its running statistics",
        "weights": record.get("weights", "raw"),
        "compute_dtype": dtype,
        "source": {"path": source.path, "step": record.get("step"), **(record.get("source") or {})},
        "arch": record.get("arch"),
        "load": LOAD_HINTS[fmt].replace("PATH", repr(path.name)),
        "normalization": norm,
    }
