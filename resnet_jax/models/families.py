"""Depth tables, the family constructors and the name registry (``build_model``).

Families and their defaults (every default can be overridden by keyword):

=========================  ===========================  ========  ========  =======
name pattern               blocks                       stem      shortcut  classes
=========================  ===========================  ========  ========  =======
resnet{18..200}            Basic / Bottleneck           imagenet  B         1000
plain{18..200}             PlainBlock / PlainBottleneck imagenet  (none)    1000
preact_resnet{18..200}     PreAct Basic / Bottleneck    imagenet  B         1000
cifar_resnet{6n+2}         BasicBlock, widths 16/32/64  cifar     A         10
cifar_plain{6n+2}          PlainBlock                   cifar     (none)    10
cifar_preact_resnet{N}     PreAct Basic (6n+2) or       cifar     A / B     10
                           Bottleneck (9n+2, N >= 164)
=========================  ===========================  ========  ========  =======

The CIFAR pre-activation bottleneck nets (ResNet-164/1001) default to shortcut 'B', a
1x1 projection where the shape changes, as in the 2016 paper's released code (zero-padding
16 channels up to 64 in the first stage would leave three quarters of them empty); the
pre-activation basic nets keep the 2015 CIFAR choice 'A'.

Every family takes ``conv_impl`` as well: 'auto' (the default) picks the im2col weight
gradient ('im2col') when JAX's default backend is the CPU and XLA's convolution ('xla')
elsewhere, read once here, when the model is built (see ``ResNet.conv_impl``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

from resnet_jax.models.blocks import (
    BasicBlock,
    Bottleneck,
    PlainBlock,
    PlainBottleneck,
    PreActBasicBlock,
    PreActBottleneck,
)
from resnet_jax.models.network import ResNet, conv_impl_for

# The 2015 paper's Table 1 (ResNet-200 from the 2016 paper): depth -> (block, stage sizes).
IMAGENET_DEPTHS: dict[int, tuple[type, tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)

# CIFAR nets: three stages of n blocks; depth = (layers per block) * 3n + 2 (stem + head).
CIFAR_LAYERS_PER_BLOCK = {"basic": 2, "bottleneck": 3}
CIFAR_WIDTHS = (16, 32, 64)

# Same depth-table entry, different block family.
VARIANTS: dict[str, dict[str, type]] = {
    "resnet": {"basic": BasicBlock, "bottleneck": Bottleneck},
    "plain": {"basic": PlainBlock, "bottleneck": PlainBottleneck},
    "preact": {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck},
}

RESNET_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(ResNet) if f.name not in ("parent", "name")
)


def block_kind(block: type) -> str:
    """'basic' (output channels = width) or 'bottleneck' (4x width) for a block class."""
    return "basic" if block.expansion == 1 else "bottleneck"


def _make(
    defaults: Mapping[str, Any], overrides: Mapping[str, Any], extra_allowed: tuple[str, ...] = ()
) -> ResNet:
    unknown = sorted(set(overrides) - set(RESNET_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown}; allowed keys: {sorted(RESNET_FIELDS + extra_allowed)}"
        )
    fields = {**defaults, **overrides}
    if fields.get("conv_impl", "auto") == "auto":
        # Read here, not in the module: the model stays a pure function of its fields.
        fields["conv_impl"] = conv_impl_for(jax.default_backend())
    return ResNet(**fields)


def _imagenet(depth: int, variant: str, overrides: Mapping[str, Any]) -> ResNet:
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(
            f"depth {depth} is not in the ImageNet depth table; allowed depths: {sorted(IMAGENET_DEPTHS)}"
        )
    block, sizes = IMAGENET_DEPTHS[depth]
    defaults = dict(
        stage_sizes=sizes,
        block_cls=VARIANTS[variant][block_kind(block)],
        num_classes=1000,
        stem="imagenet",
        stage_widths=IMAGENET_WIDTHS,
        shortcut="B",
        stride_on_3x3=False,
    )
    return _make(defaults, overrides)


def cifar_blocks_per_stage(depth: int, block: str = "basic") -> int:
    """n such that depth = 6n + 2 (basic/plain blocks) or 9n + 2 (bottleneck), n >= 1."""
    if block not in CIFAR_LAYERS_PER_BLOCK:
        raise ValueError(f"block={block!r} is not one of {tuple(CIFAR_LAYERS_PER_BLOCK)}")
    step = 3 * CIFAR_LAYERS_PER_BLOCK[block]
    if not isinstance(depth, int) or depth < step + 2 or (depth - 2) % step:
        examples = {"basic": "20, 32, 44, 56, 110, 1202", "bottleneck": "164, 1001"}[block]
        raise ValueError(
            f"depth {depth} is not {step}n+2 with n >= 1, as CIFAR nets with "
            f"{block} blocks require (e.g. {examples})"
        )
    return (depth - 2) // step


def _cifar(
    depth: int,
    variant: str,
    block: str,
    shortcut: str,
    overrides: Mapping[str, Any],
    extra_allowed: tuple[str, ...] = (),
) -> ResNet:
    n = cifar_blocks_per_stage(depth, block)
    defaults = dict(
        stage_sizes=(n,) * len(CIFAR_WIDTHS),
        block_cls=VARIANTS[variant][block],
        num_classes=10,
        stem="cifar",
        stage_widths=CIFAR_WIDTHS,
        shortcut=shortcut,
    )
    return _make(defaults, overrides, extra_allowed)


def resnet(depth: int, **overrides: Any) -> ResNet:
    """ImageNet ResNet-{18,34,50,101,152,200} of the 2015 paper (option B, stride in the 1x1)."""
    return _imagenet(depth, "resnet", overrides)


def plain(depth: int, **overrides: Any) -> ResNet:
    """ImageNet plain net with the layout of ResNet-``depth`` but no shortcuts."""
    return _imagenet(depth, "plain", overrides)


def preact_resnet(depth: int, **overrides: Any) -> ResNet:
    """ImageNet pre-activation ResNet (2016 paper; ResNet-200 there)."""
    return _imagenet(depth, "preact", overrides)


def cifar_resnet(depth: int, **overrides: Any) -> ResNet:
    """CIFAR ResNet of the 2015 paper: depth 6n+2, widths 16/32/64, option A shortcuts."""
    return _cifar(depth, "resnet", "basic", "A", overrides)


def cifar_plain(depth: int, **overrides: Any) -> ResNet:
    """CIFAR plain net of the 2015 paper: depth 6n+2, no shortcuts."""
    return _cifar(depth, "plain", "basic", "A", overrides)


def cifar_preact_resnet(depth: int, block: str | None = None, **overrides: Any) -> ResNet:
    """CIFAR pre-activation ResNet of the 2016 paper.

    ``block=None`` picks the bottleneck (9n+2, shortcut 'B') for depth >= 164 when depth is
    9n+2 (ResNet-164: n=18, ResNet-1001: n=111), else the basic block (6n+2, shortcut 'A',
    e.g. ResNet-110). ``block='basic' | 'bottleneck'`` forces the choice.
    """
    if block is None:
        is_bottleneck = isinstance(depth, int) and depth >= 164 and (depth - 2) % 9 == 0
        block = "bottleneck" if is_bottleneck else "basic"
    shortcut = "B" if block == "bottleneck" else "A"
    return _cifar(depth, "preact", block, shortcut, overrides, extra_allowed=("block",))


FAMILIES: dict[str, tuple[Callable[..., ResNet], str]] = {
    "resnet": (resnet, f"resnet{{{','.join(map(str, IMAGENET_DEPTHS))}}}"),
    "plain": (plain, f"plain{{{','.join(map(str, IMAGENET_DEPTHS))}}}"),
    "preact_resnet": (preact_resnet, f"preact_resnet{{{','.join(map(str, IMAGENET_DEPTHS))}}}"),
    "cifar_resnet": (cifar_resnet, "cifar_resnet{6n+2}"),
    "cifar_plain": (cifar_plain, "cifar_plain{6n+2}"),
    "cifar_preact_resnet": (cifar_preact_resnet, "cifar_preact_resnet{6n+2 | 9n+2 >= 164}"),
}

# The networks the two papers report on. build_model also accepts any other valid depth of
# the CIFAR families (e.g. cifar_resnet1202 is listed, cifar_resnet26 is accepted too).
MODEL_NAMES: tuple[str, ...] = (
    *(f"resnet{d}" for d in IMAGENET_DEPTHS),
    *(f"plain{d}" for d in (18, 34)),
    *(f"preact_resnet{d}" for d in (152, 200)),
    *(f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 1202)),
    *(f"cifar_plain{d}" for d in (20, 32, 44, 56, 110)),
    *(f"cifar_preact_resnet{d}" for d in (110, 164, 1001)),
)

_NAME = re.compile(r"([a-z_]+?)(\d+)")


def list_models() -> list[str]:
    """The paper networks of :data:`MODEL_NAMES`, sorted; see :data:`FAMILIES` for patterns."""
    return sorted(MODEL_NAMES)


def build_model(name: str, **overrides: Any) -> ResNet:
    """A ResNet from a name such as 'resnet50' or 'cifar_resnet110', with field overrides.

    Overrides are :class:`ResNet` field names (``shortcut``, ``dtype`` as a string,
    ``num_classes``, ``ghost_batch_size``, ...); ``cifar_preact_resnet`` also takes
    ``block``. ``conv_impl`` is 'auto' unless given: 'im2col' when JAX's default backend
    is the CPU, 'xla' elsewhere; 'xla' or 'im2col' forces one. Every error is a ValueError
    raised before anything is traced.
    """
    match = _NAME.fullmatch(name.strip().lower()) if isinstance(name, str) else None
    if match is None or match.group(1) not in FAMILIES:
        patterns = ", ".join(pattern for _, pattern in FAMILIES.values())
        raise ValueError(f"unknown model name {name!r}; valid patterns: {patterns}")
    constructor, _ = FAMILIES[match.group(1)]
    return constructor(int(match.group(2)), **overrides)
