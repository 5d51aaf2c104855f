"""Key-by-key correspondence between torchvision/timm ResNet state dicts and this project's variables.

Pure numpy: nothing here imports torch, so the mapping can be used (and inspected) without it.

Supported architectures (``SUPPORTED``): torchvision's ``resnet{18,34,50,101,152}`` (the
IMAGENET1K_V1 and V2 weights share one layout) and timm's ``resnet{18,26,34,50,101,152}``
with the plain 7x7 stem (every pretrained tag of those names, e.g. ``resnet50.a1_in1k`` or
``resnet50.tv2_in1k``, has that layout: the tags are training recipes, not architectures).
Both put the bottleneck's stride on the 3x3 conv, so the matching model here is
``build_model('resnetN', stride_on_3x3=True)`` (ResNet-26 = bottleneck stages (2, 2, 2, 2)).
timm's deep-stem / average-pool-shortcut variants (``resnet50c``, ``resnet50d``, ``-s``,
``-t``, ...) need layers this project's ResNet does not have and are refused by name.

Layout (torch -> here): conv weights (O, I, H, W) -> kernels (H, W, I, O); BN
``weight, bias`` -> params ``scale, bias``; ``running_mean, running_var`` -> batch_stats
``mean, var``; ``num_batches_tracked`` is a counter that does not affect the output when
BN momentum is set (it is, in both libraries): it is accepted and not imported, and written
as 0 on export. ``fc.weight`` (classes, C) -> ``head/kernel`` (C, classes).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from resnet_jax import models
from resnet_jax.errors import UserError

SOURCES = {"torchvision": (18, 34, 50, 101, 152), "timm": (18, 26, 34, 50, 101, 152)}
TIMM_RESNET26 = (models.Bottleneck, (2, 2, 2, 2))
# depth -> ('basic' | 'bottleneck', stage sizes): the models' depth table plus timm's ResNet-26,
# for the depths some source has (neither has ResNet-200).
DEPTHS = {
    depth: (models.block_kind(block), sizes)
    for depth, (block, sizes) in sorted({**models.IMAGENET_DEPTHS, 26: TIMM_RESNET26}.items())
    if any(depth in depths for depths in SOURCES.values())
}
SUPPORTED = tuple(f"{src}:resnet{d}" for src, depths in SOURCES.items() for d in depths)
COUNTER = "num_batches_tracked"


class ConversionError(UserError, ValueError):
    """A file or a set of variables does not fit the architecture asked for; says where."""


def parse_arch(arch: str) -> tuple[str, int]:
    """'resnet50' | 'torchvision:resnet50' | 'timm:resnet26' -> (source, depth).

    A bare name means torchvision, except resnet26, which only timm has.
    """
    text = str(arch).strip().lower()
    source, _, name = text.rpartition(":")
    name = name.split(".", 1)[0]  # timm pretrained tags: 'resnet50.a1_in1k' -> 'resnet50'
    match = re.fullmatch(r"resnet(\d+)([a-z]*)", name)
    if not source:
        source = "timm" if match and match.group(1) == "26" else "torchvision"
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r} in {arch!r}; allowed: {sorted(SOURCES)}")
    if match and match.group(2) and source == "timm":
        raise ConversionError(
            f"timm model {name!r} is not supported: its variant suffix {match.group(2)!r} "
            "(deep stem and/or average-pool shortcuts) has layers this project's ResNet does not "
            f"have; supported: {', '.join(SUPPORTED)}"
        )
    if not match or match.group(2) or int(match.group(1)) not in SOURCES[source]:
        raise ConversionError(f"{arch!r} is not a supported architecture; supported: {', '.join(SUPPORTED)}")
    return source, int(match.group(1))


def build_target(arch: str, num_classes: int = 1000, **overrides: Any) -> models.ResNet:
    """This project's model with the architecture of ``arch`` (stride on the 3x3, option B)."""
    _, depth = parse_arch(arch)
    kind, sizes = DEPTHS[depth]
    base = "resnet18" if kind == "basic" else "resnet50"
    return models.build_model(
        base, stage_sizes=sizes, stride_on_3x3=True, num_classes=num_classes, **overrides
    )


def model_name(arch: str) -> str:
    """The build_model name for ``arch``: resnetN, except timm's ResNet-26, which the depth
    table lacks: 'resnet50' with ``stage_sizes=(2, 2, 2, 2)`` (see :func:`build_target`)."""
    _, depth = parse_arch(arch)
    return "resnet50" if depth == 26 else f"resnet{depth}"


def canonical_arch(arch: str) -> str:
    """'resnet50' -> 'torchvision:resnet50', 'timm:resnet26.bt_in1k' -> 'timm:resnet26'."""
    source, depth = parse_arch(arch)
    return f"{source}:resnet{depth}"


def _conv(jax_path: tuple[str, ...], torch_key: str, shape: tuple[int, ...]):
    yield torch_key + ".weight", ("params", *jax_path, "kernel"), "conv", shape


def _bn(jax_path: tuple[str, ...], torch_key: str, channels: int):
    yield torch_key + ".weight", ("params", *jax_path, "scale"), "vec", (channels,)
    yield torch_key + ".bias", ("params", *jax_path, "bias"), "vec", (channels,)
    yield torch_key + ".running_mean", ("batch_stats", *jax_path, "mean"), "vec", (channels,)
    yield torch_key + ".running_var", ("batch_stats", *jax_path, "var"), "vec", (channels,)
    yield torch_key + "." + COUNTER, None, "counter", ()


def correspondence(arch: str, num_classes: int = 1000) -> Iterator[tuple[str, Any, str, tuple[int, ...]]]:
    """(torch key, variables path or None, kind, torch shape) in torch's state_dict order.

    kind: 'conv' (OIHW <-> HWIO), 'vec', 'fc_weight' (transposed), 'counter' (not imported).
    The shapes follow the 2015 paper's Table 1 (torchvision's ``ResNet``); the parity tests
    check them against both torch and this project's model.
    """
    _, depth = parse_arch(arch)
    kind, sizes = DEPTHS[depth]
    yield from _conv(("stem_conv",), "conv1", (64, 3, 7, 7))
    yield from _bn(("stem_bn",), "bn1", 64)
    cin = 64
    for i, size in enumerate(sizes):
        width = 64 * 2**i
        for j in range(size):
            block, prefix = f"stage{i + 1}_block{j + 1}", f"layer{i + 1}.{j}"
            if kind == "basic":
                convs = [(width, cin, 3, 3), (width, width, 3, 3)]
            else:
                convs = [(width, cin, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            for c, shape in enumerate(convs, start=1):
                yield from _conv((block, f"conv{c}"), f"{prefix}.conv{c}", shape)
                yield from _bn((block, f"bn{c}"), f"{prefix}.bn{c}", shape[0])
            cout = convs[-1][0]
            # torchvision/timm project where the shape changes (option B): the first block
            # of every stage except the first stage of a basic net (64 -> 64, stride 1).
            if j == 0 and (cin != cout or i > 0):
                yield from _conv((block, "proj_conv"), f"{prefix}.downsample.0", (cout, cin, 1, 1))
                yield from _bn((block, "proj_bn"), f"{prefix}.downsample.1", cout)
            cin = cout
    yield "fc.weight", ("params", "head", "kernel"), "fc_weight", (num_classes, cin)
    yield "fc.bias", ("params", "head", "bias"), "vec", (num_classes,)


def _to_jax(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "fc_weight":
        return np.transpose(value)
    return value


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(value, (3, 2, 0, 1))
    if kind == "fc_weight":
        return np.transpose(value)
    return value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def expected_shapes(arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """torch key -> shape for ``arch`` with ``num_classes`` outputs."""
    return {key: shape for key, _, _, shape in correspondence(arch, num_classes)}


def num_classes_of(state_dict: Mapping[str, Any]) -> int:
    if "fc.weight" not in state_dict:
        raise ConversionError(
            "the state dict has no fc.weight, so it is not a torchvision/timm "
            f"ResNet classifier (first keys: {list(state_dict)[:3]})"
        )
    return int(np.shape(state_dict["fc.weight"])[0])


def detect_arch(state_dict: Mapping[str, Any]) -> str | None:
    """The supported architecture whose keys and shapes the state dict has, if any."""
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "timm:resnet26"):
        try:
            check_state_dict(state_dict, arch)
        except ConversionError:
            continue
        return arch
    return None


def check_state_dict(state_dict: Mapping[str, Any], arch: str) -> None:
    """Raises ConversionError naming the first key (torch order) that is missing, extra or
    of the wrong shape for ``arch``. ``num_batches_tracked`` counters may be absent."""
    classes = num_classes_of(state_dict)
    expected = expected_shapes(arch, classes)
    given = list(state_dict)
    for key, shape in expected.items():
        if key not in state_dict:
            if key.endswith(COUNTER):
                continue
            raise ConversionError(f"key {key!r} that {arch} needs is missing from the state dict")
        got = tuple(np.shape(state_dict[key]))
        if got != shape:
            raise ConversionError(f"key {key!r} has shape {got}; {arch} needs {shape}")
    extra = [k for k in given if k not in expected]
    if extra:
        raise ConversionError(
            f"key {extra[0]!r} in the state dict is not part of {arch} "
            f"({len(extra)} unexpected key(s) in all); nothing is dropped "
            "silently: remove them or choose the architecture that has them"
        )


def _describe_mismatch(state_dict: Mapping[str, Any], arch: str, error: ConversionError) -> str:
    guess = detect_arch(state_dict)
    hint = f"; the file looks like {guess}" if guess and guess != arch else ""
    return f"{error}{hint}"


def from_state_dict(state_dict: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` (float32 numpy) for ``build_target(arch, num_classes)``.

    ``state_dict`` maps torch keys to arrays (numpy, or anything ``np.asarray`` reads).
    """
    try:
        check_state_dict(state_dict, arch)
    except ConversionError as e:
        raise ConversionError(_describe_mismatch(state_dict, arch, e)) from None
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, path, kind, _ in correspondence(arch):
        if path is not None:
            value = np.asarray(state_dict[key], dtype=np.float32)
            _set(variables, path, np.ascontiguousarray(_to_jax(value, kind)))
    return variables


def to_state_dict(variables: Mapping[str, Any], arch: str) -> dict[str, np.ndarray]:
    """The torch state dict (numpy values, torch key order) of ``variables`` for ``arch``.

    Every leaf of ``variables`` must be used: a tree from another architecture is refused,
    naming the first leaf that does not fit.
    """
    used = set()
    out: dict[str, np.ndarray] = {}
    for key, path, kind, _ in correspondence(arch):
        if path is None:
            out[key] = np.zeros((), np.int64)
            continue
        try:
            leaf = _get(variables, path)
        except (KeyError, TypeError):
            raise ConversionError(
                f"variables have no {'/'.join(path)}, which {arch} needs (for {key!r})"
            ) from None
        used.add(path)
        out[key] = np.ascontiguousarray(_to_torch(np.asarray(leaf, np.float32), kind))
    leaves = _paths(variables)
    extra = [p for p in leaves if p not in used]
    if extra:
        raise ConversionError(
            f"variable {'/'.join(extra[0])} is not part of {arch} "
            f"({len(extra)} extra leaves); is this another architecture?"
        )
    expected = expected_shapes(arch, int(out["fc.weight"].shape[0]))
    for key, shape in expected.items():
        if tuple(out[key].shape) != shape:
            raise ConversionError(
                f"variables give {key!r} the shape {tuple(out[key].shape)}; {arch} needs {shape}"
            )
    return out


def _paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.extend(_paths(v, prefix + (k,)))
        else:
            out.append(prefix + (k,))
    return out
