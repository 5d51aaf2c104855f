"""Converted weights on disk, a one-liner for other JAX code, and fine-tuning initialisation.

A converted checkpoint is a directory laid out like a training workdir::

    DST/pretrained.json        {'format', 'model', 'model_overrides', 'arch', 'source',
                                'normalization' (the input it expects: resnet_jax.data.normalization)}
    DST/checkpoints/0/         orbax, written by resnet_jax.train.checkpoint.Checkpointer:
                               item 'state' = {'step', 'params', 'batch_stats'} (no opt_state)
    DST/checkpoints/manifests/0.json   sha256 of every file, as for training checkpoints

so one reader (:func:`load_variables`) serves converted checkpoints and training workdirs
(whose model comes from ``config.json``, its normalisation from
``checkpoints/normalization.json``) alike; ``.pth`` / ``.safetensors`` files are converted
on the fly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models
from resnet_jax.data import DataError, normalization
from resnet_jax.files import flatten_dict, unflatten_dict
from resnet_jax.interop import layout
from resnet_jax.interop.layout import ConversionError

log = logging.getLogger(__name__)

META_FILE = "pretrained.json"
FORMAT = 1
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Architecture fields that decide what the weights mean without showing in their shapes
# (a stride position, an epsilon): an export must agree on them, not just on the shapes.
_SEMANTIC_FIELDS = (
    "stage_sizes",
    "stage_widths",
    "stem",
    "width_multiplier",
    "shortcut",
    "stride_on_3x3",
    "bn_epsilon",
)


def is_weight_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix in WEIGHT_SUFFIXES


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def convert_file(
    path: str | os.PathLike, arch: str | None = None
) -> tuple[models.ResNet, dict[str, Any], dict[str, Any]]:
    """(model, variables as numpy, record) from a torchvision/timm .pth or .safetensors.

    ``arch`` ('resnet50', 'timm:resnet26', ...) defaults to the architecture whose keys and
    shapes the file has; a file that fits no supported one is refused naming the first key
    that differs from what its closest name (or ``arch``) needs.
    """
    from resnet_jax.interop import torch_files

    path = Path(path)
    state_dict, note = torch_files.load_state_dict(path)
    if arch is None:
        arch = layout.detect_arch(state_dict)
        if arch is None:
            # Name the first difference against the architecture its depth suggests.
            guess = _closest_arch(state_dict)
            try:
                layout.check_state_dict(state_dict, guess)
            except ConversionError as e:
                raise ConversionError(
                    f"{path} is not a supported ResNet ({e}); supported: {', '.join(layout.SUPPORTED)}"
                ) from None
    try:
        variables = layout.from_state_dict(state_dict, arch)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    classes = layout.num_classes_of(state_dict)
    model = layout.build_target(arch, classes)
    record = {
        "format": FORMAT,
        "model": layout.model_name(arch),
        "model_overrides": _overrides(model),
        "arch": layout.canonical_arch(arch),
        "source": {"file": path.name, "sha256": _sha256(path), "read": note},
        # torchvision's and timm's ResNets were trained on ImageNet's mean/std-normalised inputs
        "normalization": normalization.imagenet(),
    }
    return model, variables, record


def _closest_arch(state_dict: Mapping[str, Any]) -> str:
    blocks = [
        sum(1 for k in state_dict if k.startswith(f"layer{i}.") and k.endswith(".conv1.weight"))
        for i in range(1, 5)
    ]
    bottleneck = any(k.endswith(".conv3.weight") for k in state_dict)
    for depth, (kind, sizes) in layout.DEPTHS.items():
        if tuple(blocks) == sizes and (kind == "bottleneck") == bottleneck:
            return f"timm:resnet{depth}" if depth == 26 else f"resnet{depth}"
    return "resnet50" if bottleneck else "resnet18"


def _overrides(model: models.ResNet) -> dict[str, Any]:
    """The build_model overrides that rebuild ``model`` from its name (JSON-friendly)."""
    return {
        "stage_sizes": list(model.stage_sizes),
        "stride_on_3x3": model.stride_on_3x3,
        "num_classes": int(model.num_classes),
    }


def save_converted(dst: str | os.PathLike, variables: Mapping[str, Any], record: Mapping[str, Any]) -> Path:
    """Writes ``variables`` and ``record`` as a converted checkpoint directory (see module doc)."""
    from resnet_jax.files import atomic_write_json
    from resnet_jax.train.checkpoint import Checkpointer

    dst = Path(os.path.abspath(os.path.expanduser(os.fspath(dst))))
    if (dst / "checkpoints").exists():
        raise ConversionError(f"{dst} already holds checkpoints; choose a new directory")
    dst.mkdir(parents=True, exist_ok=True)
    items = {
        "step": np.zeros((), np.int32),
        "params": jax.tree.map(np.asarray, dict(variables["params"])),
        "batch_stats": jax.tree.map(np.asarray, dict(variables["batch_stats"])),
    }
    with Checkpointer(dst / "checkpoints", max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(0, items, metadata=dict(record))
    atomic_write_json(dst / META_FILE, dict(record))
    return dst


def _checkpoint_root(path: Path) -> Path:
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if any(p.name.isdigit() for p in path.iterdir()):
        return path
    raise ConversionError(
        f"{path} is neither a converted checkpoint, a training workdir nor "
        "a checkpoints directory (no checkpoints/ or numbered step inside)"
    )


def _model_record(path: Path) -> dict[str, Any] | None:
    """{'model', 'model_overrides', ...} from pretrained.json or a workdir's config.json."""
    for directory in (path, path.parent):
        meta = directory / META_FILE
        if meta.is_file():
            return _with_normalization(json.loads(meta.read_text(encoding="utf-8")), path)
        config = directory / "config.json"
        if config.is_file():
            model_cfg = dict(json.loads(config.read_text(encoding="utf-8")).get("model", {}))
            name = model_cfg.pop("name", None)
            overrides = {k: v for k, v in model_cfg.items() if v is not None}
            record = {"model": name, "model_overrides": overrides, "source": {"workdir": str(directory)}}
            return _with_normalization(record, path)
    return None


def _with_normalization(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """``record`` with the input normalisation that training wrote into the checkpoint
    directory (resnet_jax.data.normalization), unless the record states one already."""
    if record.get("normalization") is None:
        for directory in (path / "checkpoints", path):
            try:
                found = normalization.load(directory)
            except DataError as e:
                raise ConversionError(str(e)) from None
            if found is not None:
                return {**record, "normalization": found}
    return record


def restore_variables(path: str | os.PathLike, ema: bool | None = None) -> tuple[dict[str, Any], int]:
    """(``{'params', 'batch_stats'}`` as numpy, step) of the newest checkpoint under ``path``.

    ``ema``: which weights of a run trained with ``ema.decay`` (whose checkpoints also hold
    the exponential moving average of the parameters and BN statistics): None takes the
    averaged ones when the checkpoint has them, else the raw ones; True requires them
    (ConversionError naming ``path`` when absent); False takes the raw ones.
    Read-only: nothing under ``path`` is created, moved or cleaned. The step is checked
    against its sha256 manifest when there is one.
    """
    variables, step, _ = _restore(path, ema)
    return variables, step


def _restore(path: str | os.PathLike, ema: bool | None) -> tuple[dict[str, Any], int, bool]:
    """restore_variables, and whether the EMA weights were the ones read."""
    from resnet_jax.train.checkpoint import CheckpointError, read_newest

    root = _checkpoint_root(Path(os.path.abspath(os.fspath(path))))
    try:
        items, step = read_newest(root)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if "params" not in items:
        raise ConversionError(f"checkpoint step {step} under {root} has no params (items: {sorted(items)})")
    use_ema = has_ema(items) and ema is not False
    if ema and not use_ema:
        raise ConversionError(
            f"{path}: checkpoint step {step} under {root} holds no EMA weights (the run was trained "
            "without ema.decay); leave out --ema / pass ema=False for its raw weights"
        )
    source = items["ema"] if use_ema else items
    variables = {"params": source["params"], "batch_stats": source.get("batch_stats") or {}}
    return variables, step, use_ema


def has_ema(items: Mapping[str, Any]) -> bool:
    """Whether checkpoint ``items`` hold the weights' exponential moving average."""
    return isinstance(items.get("ema"), Mapping) and "params" in items["ema"]


def load_variables(
    path: str | os.PathLike, arch: str | None = None, ema: bool | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(variables as numpy, model record or None) from a weight file or a checkpoint dir.

    ``ema``: as for :func:`restore_variables`; a weight file holds one set of weights, so
    ``ema=True`` is refused for it. The record of a checkpoint says which set was read
    (``'weights': 'ema'`` or ``'raw'``).
    """
    path = Path(path)
    if is_weight_file(path):
        if ema:
            raise ConversionError(f"{path} is a weight file, which holds no EMA weights; leave out --ema")
        _, variables, record = convert_file(path, arch)
        return variables, record
    if not path.is_dir():
        raise ConversionError(f"{path}: no such file or directory")
    variables, step, used_ema = _restore(path, ema)
    record = _model_record(path)
    if record is not None:
        record = {**record, "step": step, "weights": "ema" if used_ema else "raw"}
    return variables, record


def pretrained(
    path: str | os.PathLike, name: str | None = None, *, weights: Any = None, **overrides: Any
) -> tuple[models.ResNet, dict[str, Any]]:
    """``model, variables = pretrained(path)``: a Flax model and its weights, ready to apply.

    ``path``: a torchvision/timm ``.pth`` / ``.safetensors`` file, a directory written by
    ``python -m resnet_jax.convert``, or a training workdir; or, when no such path exists, a
    model name: ``'resnet50'`` with ``weights='IMAGENET1K_V2'`` (or ``'resnet50:IMAGENET1K_V2'``;
    default torchvision's DEFAULT) fetches torchvision's published file through the torch hub
    cache and caches it converted, ``'timm:resnet50.a1_in1k'`` finds a timm file already on
    disk (see :mod:`resnet_jax.interop.hub`). ``name``: the architecture
    for a weight file ('resnet50', 'timm:resnet26'; default: detected from the keys) or the
    model name for a checkpoint without a record. ``overrides``: build_model fields that do
    not change the weights (``dtype='bfloat16'``, ...). Then
    ``model.apply(variables, images, train=False)`` gives logits and
    ``model.apply(variables, images, method='features')`` the backbone feature maps.
    """
    from resnet_jax.interop import hub

    if hub.is_model_name(path):
        if name is not None:
            raise ConversionError(f"{path!r} is a model name, which says the architecture; leave name= out")
        path, name = hub.resolve(str(path), weights)
    elif weights is not None:
        raise ConversionError(
            f"weights={weights!r} goes with a model name such as 'resnet50'; {path} is a path"
        )
    path = Path(path)
    variables, record = load_variables(path, name if is_weight_file(path) else None)
    if record is None:
        if name is None:
            raise ConversionError(
                f"{path} records no model name; pass name=, e.g. "
                "pretrained(path, 'resnet50', stride_on_3x3=True)"
            )
        record = {"model": name, "model_overrides": {}}
    model = _build(record, overrides, path)
    return model, jax.tree.map(jnp.asarray, variables)


def _build(record: Mapping[str, Any], overrides: Mapping[str, Any], path: Path) -> models.ResNet:
    try:
        return models.build_model(record["model"], **{**record.get("model_overrides", {}), **overrides})
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: cannot rebuild its model {record.get('model')!r}: {e}") from None


def match_variables(
    source: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    origin: str = "init_from",
    log: Callable[[str], None] = log.info,
    fresh_prefixes: tuple[str, ...] = ("params/head/",),
) -> dict[str, Any]:
    """``target`` with every leaf replaced by ``source``'s, except a differently shaped head.

    Leaves under ``fresh_prefixes`` (the classifier) whose shape differs keep the target's
    fresh initialisation, with one log line naming them. Any other missing, extra or
    differently shaped leaf raises ConversionError naming the first one. Values take the
    target leaf's dtype and, for jax arrays, its sharding.
    """
    src = flatten_dict({k: source.get(k, {}) for k in ("params", "batch_stats")}, sep="/", keep_empty=False)
    tgt = flatten_dict({k: target.get(k, {}) for k in ("params", "batch_stats")}, sep="/", keep_empty=False)
    fresh = []
    out = {}
    for key, t in tgt.items():
        if key not in src:
            raise ConversionError(
                f"{origin}: variable {key} of the new model is missing from "
                "the checkpoint (a different architecture?)"
            )
        s = src[key]
        if tuple(np.shape(s)) != tuple(t.shape):
            fresh_ok = any(
                key.startswith(p) or key.startswith(p.replace("params/", "batch_stats/"))
                for p in fresh_prefixes
            )
            if not fresh_ok:
                raise ConversionError(
                    f"{origin}: variable {key} has shape {tuple(np.shape(s))} in "
                    f"the checkpoint but {tuple(t.shape)} in the new model"
                )
            fresh.append(f"{key} {tuple(np.shape(s))} -> {tuple(t.shape)}")
            out[key] = t
            continue
        value = np.asarray(s).astype(t.dtype)
        sharding = getattr(t, "sharding", None)
        out[key] = jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)
    extra = [k for k in src if k not in tgt]
    if extra:
        raise ConversionError(
            f"{origin}: variable {extra[0]} of the checkpoint has no place in "
            f"the new model ({len(extra)} such in all; a different architecture?)"
        )
    if fresh:
        log(
            f"{origin}: the classifier shape differs (num_classes), so it starts freshly "
            f"initialised: {'; '.join(fresh)}"
        )
    tree = unflatten_dict(out, sep="/")
    return {"params": tree.get("params", {}), "batch_stats": tree.get("batch_stats", {})}


def init_variables_from(
    path: str | os.PathLike,
    target_variables: Mapping[str, Any],
    *,
    log: Callable[[str], None] = log.info,
    model: models.ResNet | None = None,
) -> dict[str, Any]:
    """Initialises a new run's ``{'params', 'batch_stats'}`` from ``path`` (config.init_from).

    ``path``: a converted checkpoint directory, a training workdir (or its checkpoints/),
    or a ``.pth``/``.safetensors`` file (converted on the fly, architecture from its keys).
    ``target_variables``: the freshly initialised variables of the new model (arrays with
    their shardings); the result has the same structure, dtypes and shardings. A classifier
    of another size keeps its fresh initialisation (``log`` says so); any other difference
    raises ConversionError naming the first variable. ``model``: the new model; when given,
    fields that change what the weights mean without changing their shapes (the stride
    position of a bottleneck, BN epsilon, ...) must equal those of the recorded source
    model (a torchvision ResNet-50 has ``stride_on_3x3=True``; this project's default is False).
    """
    variables, record = load_variables(path)
    if record is not None:
        log(
            f"init_from {path}: weights of {record.get('model')} "
            f"({record.get('arch') or record.get('source')})"
        )
        if model is not None:
            check_same_meaning(_build(record, {}, Path(path)), model, f"init_from {path}", "the new model")
    return match_variables(variables, target_variables, origin=f"init_from {path}", log=log)


def load_for_init(path: str, target_variables: Mapping[str, Any], model: models.ResNet) -> dict[str, Any]:
    """The trainer's weight loader for ``config.init_from`` (``train_and_evaluate(...,
    load_weights=load_for_init)``): :func:`init_variables_from`, logging what it matched."""
    return init_variables_from(path, target_variables, log=log.info, model=model)


def export_state_dict(
    path: str | os.PathLike, arch: str | None = None, ema: bool | None = False
) -> tuple[dict[str, np.ndarray], str]:
    """(torch state dict as numpy, arch) of a converted checkpoint or training workdir; its raw
    weights, or with ``ema`` the moving average (as :func:`restore_variables` reads it).

    The run's model must be one torchvision/timm can hold: the fields that change what the
    weights mean without changing their shapes (stride position, epsilon, ...) are compared
    with the target's, not only the shapes.
    """
    path = Path(path)
    variables, record = load_variables(path, ema=ema)
    if record is None and arch is None:
        raise ConversionError(f"{path} records no model; pass the architecture (e.g. resnet50)")
    if record is not None:
        model = _build(record, {}, path)
        if arch is None:
            arch = record.get("arch") or record["model"]
    classes = int(np.shape(variables["params"]["head"]["bias"])[0])
    target = layout.build_target(arch, classes)
    if record is not None:
        check_same_meaning(model, target, f"{path}", f"{arch} in torch")
    return layout.to_state_dict(variables, arch), arch


def check_same_meaning(
    source: models.ResNet, target: models.ResNet, source_name: str, target_name: str
) -> None:
    """Refuses two models whose weights have equal shapes but mean different things."""
    src_block = models.network.block_class(source.block_cls)
    dst_block = models.network.block_class(target.block_cls)
    if src_block is not dst_block:
        raise ConversionError(
            f"{source_name} uses {src_block.__name__} blocks, {target_name} uses {dst_block.__name__}"
        )
    for field in _SEMANTIC_FIELDS:
        if field == "stride_on_3x3" and src_block.expansion == 1:
            continue  # basic blocks have no 1x1 conv: the field does not apply
        mine, theirs = getattr(source, field), getattr(target, field)
        if isinstance(mine, (list, tuple)):
            mine, theirs = tuple(mine), tuple(theirs)
        if mine != theirs:
            raise ConversionError(
                f"{source_name} has {field}={mine!r}, but {target_name} has "
                f"{field}={theirs!r}; the weights would mean something else there"
            )
