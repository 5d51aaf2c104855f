"""What an export starts from: a model, its eval-mode weights and the input it expects.

SRC is a training workdir, a directory written by ``python -m resnet_jax.convert``, a
torchvision/timm ``.pth`` / ``.safetensors`` file, or (when no such path exists) a model name
that ``resnet_jax.interop.hub`` resolves (``resnet50:IMAGENET1K_V2``). The model is rebuilt from
the source's record in float32 (or the ``dtype`` asked for) with XLA's own convolution, which
every platform lowers (the CPU's im2col variant only changes gradients), and the weights are
checked against it, all before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resnet_jax import models
from resnet_jax.data import normalization as norm_lib
from resnet_jax.interop import weights
from resnet_jax.interop.layout import ConversionError

_IMAGENET_DATASETS = ("imagenet2012", "image_folder")


@dataclasses.dataclass(frozen=True)
class Source:
    """A model ready to export.

    Attributes:
      path: SRC as given.
      model: the network, eval mode through ``model.apply(variables, x, train=False)``.
      variables: ``{'params', 'batch_stats'}`` as numpy arrays.
      record: what the source says of itself (model name, overrides, source file or workdir,
        step, which weights: 'raw' or 'ema').
      normalization: the input normalisation record (resnet_jax.data.normalization), or None
        for a run trained before runs recorded it.
      image_shape: (height, width, channels) of one input image.
    """

    path: str
    model: models.ResNet
    variables: dict[str, Any]
    record: dict[str, Any]
    normalization: dict[str, Any] | None
    image_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return int(np.shape(self.variables["params"]["head"]["bias"])[0])

    def apply(self, variables: Any, images: Any) -> Any:
        """Logits in eval mode: BatchNorm normalises with its running statistics."""
        return self.model.apply(variables, images, train=False)


def load_source(
    src: str | os.PathLike,
    *,
    arch: str | None = None,
    ema: bool | None = None,
    image_size: int | None = None,
    dtype: str = "float32",
) -> Source:
    """The :class:`Source` at ``src``; ConversionError (exit status 2) names what does not fit.

    ``arch``: the architecture of a weight file (default: detected from its keys) or the model
    name of a checkpoint that records none. ``ema``: a run's EMA weights (None: when it has
    them). ``image_size``: the input's height and width (default: what the normalisation
    record says, else the run's config, else 224).
    """
    path = Path(os.path.expanduser(os.fspath(src)))
    if not path.exists():
        path, arch = _resolve_name(str(src), arch)
    try:
        variables, record = weights.load_variables(
            path, arch if weights.is_weight_file(path) else None, ema=ema
        )
    except ConversionError as e:
        raise ConversionError(f"SRC {src}: {e}") from None
    if record is None:
        if arch is None:
            raise ConversionError(f"SRC {src} records no model; pass --arch, e.g. --arch resnet50")
        record = {"model": arch, "model_overrides": {}}
    if "head" not in variables["params"]:
        raise ConversionError(f"SRC {src}: its weights have no classifier (params/head); nothing to export")
    classes = int(np.shape(variables["params"]["head"]["bias"])[0])
    overrides = {
        **record.get("model_overrides", {}),
        "num_classes": classes,
        "conv_impl": "xla",
        "dtype": dtype,
    }
    try:
        model = models.build_model(record["model"], **overrides)
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"SRC {src}: cannot rebuild its model {record.get('model')!r}: {e}") from None
    normalization = record.get("normalization") or _fallback_normalization(record)
    if image_size is not None:
        shape = (int(image_size), int(image_size), 3)
        if normalization is not None and normalization["mode"] == "pixel_mean":
            trained = normalization["image_size"]
            if list(shape[:2]) != list(trained):
                raise ConversionError(
                    f"--image-size {image_size}: SRC {src} subtracts a per-pixel mean of "
                    f"{trained[0]}x{trained[1]} images; its inputs must have that size"
                )
    elif normalization is not None:
        shape = (*normalization["image_size"], 3)
    else:
        shape = (*_config_image_size(record), 3)
    _check_fits(variables, model, shape, str(src))
    return Source(str(src), model, variables, record, normalization, shape)


def _resolve_name(src: str, arch: str | None) -> tuple[Path, str | None]:
    """A SRC that is no path: a model name resolved through the hub, else an error."""
    from resnet_jax.interop import hub

    if not hub.is_model_name(src):
        raise ConversionError(
            f"SRC {src}: no such file or directory; SRC is a training workdir, a directory written by "
            "python -m resnet_jax.convert, a .pth/.safetensors file, or a model name (resnet50:IMAGENET1K_V2)"
        )
    path, named = hub.resolve(src)
    return Path(path), arch or named


def _workdir_config(record: dict[str, Any]) -> dict[str, Any]:
    workdir = (record.get("source") or {}).get("workdir")
    config = Path(workdir) / "config.json" if workdir else None
    if config is None or not config.is_file():
        return {}
    return json.loads(config.read_text(encoding="utf-8"))


def _fallback_normalization(record: dict[str, Any]) -> dict[str, Any] | None:
    """ImageNet's constants for an ImageNet run trained before runs recorded their
    normalisation; a CIFAR run's per-pixel mean cannot be known without its data (None)."""
    dataset = _workdir_config(record).get("dataset", {})
    if dataset.get("name") in _IMAGENET_DATASETS:
        return norm_lib.imagenet(dataset.get("image_size", 224), dataset.get("eval_resize", 256))
    return None


def _config_image_size(record: dict[str, Any]) -> tuple[int, int]:
    dataset = _workdir_config(record).get("dataset", {})
    if dataset.get("name") in _IMAGENET_DATASETS:
        size = int(dataset.get("image_size", 224))
        return size, size
    if dataset:
        return 32, 32  # CIFAR
    return 224, 224


def _check_fits(
    variables: dict[str, Any], model: models.ResNet, image_shape: tuple[int, ...], where: str
) -> None:
    """The weights must be exactly the model's variables; names the first that differs."""
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, *image_shape), np.float32), train=False)
    )
    want = {
        jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(
            {"params": expected["params"], "batch_stats": expected.get("batch_stats", {})}
        )
    }
    got = {
        jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(variables)
    }
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise ConversionError(
                f"SRC {where}: variable {key} is {got.get(key, 'missing')} in the weights but "
                f"{want.get(key, 'absent')} in its model {model.num_classes}-class "
                f"{type(model).__name__} (a record that does not match its weights?)"
            )
