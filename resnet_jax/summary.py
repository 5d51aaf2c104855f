"""Per-stage output shapes, parameter counts and FLOPs of a model: the paper's Table 1.

Nothing is computed on real data: ``jax.eval_shape`` traces the model once while a Flax
method interceptor records the input and output shapes of every ``nn.Conv`` / ``nn.Dense``
call, from which the multiply-adds follow. "FLOPs" means multiply-adds of the conv and
fully connected layers at batch 1, the convention of the 2015 paper (ResNet-50: 3.8e9);
BN, ReLU, pooling and additions are not counted.

Command line::

    python -m resnet_jax.summary resnet50
    python -m resnet_jax.summary cifar_resnet110 --json
    python -m resnet_jax.summary resnet50 --image-size 320 --set stride_on_3x3=True

With ``--json`` a single JSON object is printed (``params``, ``flops``, ``stages``, ...).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import ResNet, build_model, count_params

# Row labels of the 2015 paper's Table 1 for the ImageNet nets.
_PAPER_NAMES = {
    "stem": "conv1",
    "stage1": "conv2_x",
    "stage2": "conv3_x",
    "stage3": "conv4_x",
    "stage4": "conv5_x",
    "head": "fc",
}


def default_image_size(model: ResNet) -> int:
    """224 for ImageNet stems, 32 for CIFAR stems."""
    return 224 if model.stem == "imagenet" else 32


def _group(top_level_name: str) -> str:
    """Row of a top-level submodule: 'stem', 'stage{i}' or 'head'."""
    if top_level_name.startswith("stem_"):
        return "stem"
    if top_level_name.startswith("stage"):
        return top_level_name.split("_")[0]
    return "head"


def _macs(module: nn.Module, inputs: Any, outputs: Any) -> int:
    """Multiply-adds of one Conv/Dense call, per example."""
    per_example_positions = int(np.prod(outputs.shape[1:-1]))
    if isinstance(module, nn.Conv):
        kernel = int(np.prod(module.kernel_size))
        in_per_group = inputs.shape[-1] // module.feature_group_count
        return per_example_positions * outputs.shape[-1] * kernel * in_per_group
    return per_example_positions * inputs.shape[-1] * outputs.shape[-1]


def summarize(model: ResNet, image_size: int | None = None) -> dict[str, Any]:
    """Params, FLOPs (multiply-adds, batch 1) and per-stage shapes of ``model``.

    Returns ``{'stem', 'image_size', 'params', 'flops', 'stages': {'stem': {...}, 'stage1': {...},
    ..., 'head': {...}}}``; each stage row holds ``shape`` (H, W, C without the batch),
    ``params`` and ``flops``. 'stem' is the stem conv's output (before the max-pool).
    """
    size = default_image_size(model) if image_size is None else image_size
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"image_size={image_size!r} must be a positive int")
    calls: list[tuple[str, int]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
            calls.append((_group(module.path[0]), _macs(module, args[0], out)))
        return out

    def trace(x):
        with nn.intercept_methods(record):
            variables = model.init(jax.random.key(0), x, train=False)
        return variables, model.apply(variables, x, train=False, method=ResNet.features)

    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables, feats = jax.eval_shape(trace, x)
    return {"stem": model.stem, **_report(variables["params"], feats, calls, size, model.num_classes)}


def _report(
    params: Any, feats: dict, calls: list[tuple[str, int]], size: int, num_classes: int
) -> dict[str, Any]:
    rows = {name: {"shape": list(feats[name].shape[1:])} for name in _ordered(feats)}
    rows["head"] = {"shape": [num_classes]}
    for name, row in rows.items():
        row["params"] = sum(count_params(sub) for key, sub in params.items() if _group(key) == name)
        row["flops"] = sum(macs for group, macs in calls if group == name)
    return {
        "image_size": size,
        "params": count_params(params),
        "flops": sum(macs for _, macs in calls),
        "stages": rows,
    }


def _ordered(feats: dict) -> list[str]:
    return ["stem"] + sorted((k for k in feats if k != "stem"), key=lambda k: int(k[5:]))


def format_table(name: str, summary: dict[str, Any]) -> str:
    """Human-readable Table-1-style report."""
    size = summary["image_size"]
    # Table 1's row names only describe the ImageNet layout.
    paper_names = _PAPER_NAMES if summary["stem"] == "imagenet" else {}
    lines = [
        f"{name} at {size}x{size}, batch 1 (FLOPs = conv/fc multiply-adds)",
        f"{'layer':<8} {'paper':<8} {'output':<16} {'params':>12} {'FLOPs':>10}",
    ]
    for row_name, row in summary["stages"].items():
        shape = "x".join(map(str, row["shape"]))
        lines.append(
            f"{row_name:<8} {paper_names.get(row_name, ''):<8} {shape:<16} "
            f"{row['params']:>12,} {_si(row['flops']):>10}"
        )
    lines.append(f"{'total':<8} {'':<8} {'':<16} {summary['params']:>12,} {_si(summary['flops']):>10}")
    lines.append(f"FLOPs: {summary['flops'] / 1e9:.3g} x 10^9, params: {summary['params'] / 1e6:.3g}M")
    return "\n".join(lines)


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def parse_value(text: str) -> Any:
    """'true'/'false'/'none' (any case), Python literals (3, 0.5, (1, 2), 1,2), else the string."""
    special = {"true": True, "false": False, "none": None}
    if text.lower() in special:
        return special[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """['key=value', ...] -> {key: parsed value}."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} must look like key=value")
        overrides[key.strip()] = parse_value(value.strip())
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="a registry name, e.g. resnet50, cifar_resnet110")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--image-size", type=int, default=None, help="square input size (default 224 ImageNet, 32 CIFAR)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ResNet field, e.g. --set shortcut=C (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        model = build_model(args.model, **parse_overrides(args.set))
        summary = summarize(model, args.image_size)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps({"model": args.model, **summary}))
    else:
        print(format_table(args.model, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
