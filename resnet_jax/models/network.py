"""The ResNet network: stem, stages of blocks, head, backbone features; field validation.

One :class:`ResNet` covers every network of both papers; which one is decided by its
fields (block class, stage sizes and widths, stem, shortcut option, ...), normally filled
in by :mod:`resnet_jax.models.families`. Fields are validated when the module is
constructed, so a bad configuration fails before anything is traced or compiled.

Top-level submodule names: ``stem_conv``, ``stem_bn``, ``stage{i}_block{j}`` (1-based),
``final_bn`` (pre-activation nets only) and ``head``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.models import cpu_conv
from resnet_jax.models.blocks import SHORTCUTS, GhostBatchNorm, ModuleDef

Array = Any

STEMS = ("imagenet", "cifar")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# float64 is a reference path (tests compare the model's mathematics with a float64
# reference where float32 rounding would decide the outcome); it needs 64-bit JAX.
REFERENCE_DTYPES = {"float64": jnp.float64}
KERNEL_INIT_MODES = ("fan_in", "fan_out")
# The convolution every conv layer calls (``ResNet.conv_impl``): XLA's own, or cpu_conv's, which
# has XLA's forward pass and input gradient but computes the weight gradient as one im2col
# matrix product (XLA:CPU runs it as a slow direct convolution: 10x the forward pass at 16
# channels, 32x32). Same outputs; gradients equal to float rounding (tests/test_cpu_conv.py).
CONV_IMPLS: dict[str, Callable] = {"xla": lax.conv_general_dilated, "im2col": cpu_conv.conv_general_dilated}


def conv_impl_for(backend: str) -> str:
    """The ``conv_impl`` the model families pick on ``backend``: 'im2col' on CPU, else 'xla'."""
    return "im2col" if backend == "cpu" else "xla"


def he_normal(mode: str = "fan_in") -> Callable:
    """He et al. 2015 ("Delving deep") init: N(0, 2 / fan), fan = fan_in or fan_out."""
    if mode not in KERNEL_INIT_MODES:
        raise ValueError(f"kernel_init={mode!r} is not one of {KERNEL_INIT_MODES} or a callable")
    return nn.initializers.variance_scaling(2.0, mode, "normal")


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """Maps 'float32' | 'bfloat16' | 'float16' | 'float64' (or the dtype itself) to a numpy dtype.

    'float64' only with 64-bit JAX enabled (``with jax.enable_x64(True):``); without it JAX
    would silently compute in float32 while the model claimed float64.
    """
    names = {**DTYPES, **REFERENCE_DTYPES}
    try:
        resolved = np.dtype(names.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        resolved = None
    if resolved not in {np.dtype(d) for d in names.values()}:
        raise ValueError(f"dtype={dtype!r} is not one of {tuple(names)}")
    if resolved == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype='float64' needs 64-bit JAX: build and apply the model inside "
            "`with jax.enable_x64(True):` (a reference path for tests, not for training)"
        )
    return resolved


def storage_dtype(dtype: Any) -> jnp.dtype:
    """Parameters, BN statistics, pooling and logits: float32, or float64 on the float64 path."""
    return jnp.promote_types(resolve_dtype(dtype), jnp.float32)


def block_class(block_cls: ModuleDef) -> type:
    """The block class behind ``block_cls``, which may be a ``functools.partial`` of it."""
    while isinstance(block_cls, functools.partial):
        block_cls = block_cls.func
    return block_cls


def count_params(variables_or_params: Mapping[str, Any]) -> int:
    """Number of parameters: the ``params`` collection if given full variables, else the tree.

    Works on real arrays and on ``jax.ShapeDtypeStruct`` trees from ``jax.eval_shape``.
    """
    tree = variables_or_params
    if isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))


def scaled_width(width: int, multiplier: float) -> int:
    """``width * multiplier`` rounded, at least 1."""
    return max(1, int(round(width * multiplier)))


class ResNet(nn.Module):
    """A ResNet (or plain net) of He et al. 2015 / 2016.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50, (n, n, n) on CIFAR.
      block_cls: a block class of :mod:`resnet_jax.models.blocks` (or a partial of one).
      num_classes: classifier outputs.
      stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max-pool with padding 1 as in
        torchvision) or 'cifar' (3x3 conv, BN, ReLU). With pre-activation blocks the last
        stage is followed by BN-ReLU before pooling, and the first block of the first stage
        has no BN-ReLU of its own (``preactivate_input=False``): it takes the stem's
        activation as its pre-activation, on both of its paths. The 2016 paper: "for the
        first Residual Unit (that follows a stand-alone convolutional layer, conv1), we
        adopt the first activation right after conv1 and before splitting into two paths";
        the authors' Torch code (fb.resnet.torch ``models/preresnet.lua``, the 'no_preact'
        first block) builds the ImageNet nets so. The stem has ``stage_widths[0]`` channels
        (64 on ImageNet, 16 on CIFAR).
      stage_widths: per-stage block width ``filters`` (a bottleneck outputs 4x this).
      width_multiplier: scales every width, the stem's included (1 = paper).
      shortcut: 'A' zero-padding identity (2015 paper, CIFAR), 'B' projection only where the
        shape changes (2015 paper, ImageNet), 'C' projection everywhere (2015 Table 3).
      zero_init_last: zero-init the last BN scale of each residual branch (last conv kernel
        for pre-activation blocks); Goyal et al. 2017. False = paper. Not for plain nets.
      stride_on_3x3: bottleneck blocks only (ignored otherwise): False = paper (stride in the
        first 1x1), True = "v1.5" (torchvision, Flax example).
      dtype: compute dtype, 'float32' | 'bfloat16' | 'float16' or the dtype. Parameters,
        BN statistics, pooling and logits stay float32. 'float64' (under
        ``jax.enable_x64(True)``) computes everything, parameters included, in float64: the
        path on which tests compare the model with float64 references free of rounding.
      bn_momentum: running-average decay, Flax convention (0.9 = torch momentum 0.1).
      bn_epsilon: BN epsilon.
      ghost_batch_size: None = BN statistics over the whole global batch; G = over each
        G consecutive examples (the 2015 paper's per-GPU BN of 32 images on ImageNet).
      kernel_init: conv initialiser: 'fan_in' (default; He et al. 2015 "Delving deep", which
        the paper cites), 'fan_out' (torchvision) or any initialiser callable.
      bn_frozen: every BN normalises with its running statistics and leaves them unchanged
        even when ``train=True`` (BN scale and bias still train): for fine-tuning pretrained
        weights with batches too small or too different for fresh statistics. False = paper.
      input_size: None = images go to the stem as they come; N = they are first resized
        bilinearly to N x N (on the device): to run ImageNet-pretrained weights on small
        images at the scale they were trained at (CIFAR-10 upsampled to 224).
      conv_impl: the convolution function of every conv layer (see :data:`CONV_IMPLS`):
        'xla' (default) = ``lax.conv_general_dilated``; 'im2col' = XLA's forward pass and
        input gradient, but the weight gradient as one matrix product
        (:mod:`resnet_jax.models.cpu_conv`), several times faster on XLA:CPU. Outputs are
        identical, gradients equal to float rounding; no parameters depend on it. The model
        families (:func:`~resnet_jax.models.build_model`) pick 'im2col' when JAX's default
        backend is the CPU and 'xla' elsewhere (their ``conv_impl='auto'``).

    The classifier is Dense with LeCun-normal kernel (variance 1 / fan_in) and zero bias:
    no ReLU follows it, so He's factor 2 has no reason to be there; this is also the variance
    of the Caffe/Torch-era default up to a constant, and the papers do not specify it.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    stem: str = "imagenet"
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    width_multiplier: float = 1.0
    shortcut: str = "B"
    zero_init_last: bool = False
    stride_on_3x3: bool = False
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    ghost_batch_size: int | None = None
    kernel_init: str | Callable = "fan_in"
    bn_frozen: bool = False
    input_size: int | None = None
    conv_impl: str = "xla"

    def __post_init__(self) -> None:
        validate(self)
        super().__post_init__()

    def __call__(self, x: Array, train: bool = True) -> Array:
        """Logits (float32; float64 on the float64 path) of images ``x`` (N, H, W, C); any H, W
        that survive the strides."""
        return self._forward(x, train, with_head=True)[1]

    def features(self, x: Array, train: bool = False) -> dict[str, Array]:
        """Backbone outputs without the head: {'stem', 'stage1', ..., 'stageN'}.

        'stem' is the stem's output (conv, BN, ReLU) before the max-pool, at stride 2 for the
        ImageNet stem; stage i is at stride 2**(i+1) on ImageNet (4, 8, 16, 32) and 2**(i-1)
        on CIFAR. Stage outputs of pre-activation nets
        are the raw sums (the final BN-ReLU belongs to the head).
        """
        return self._forward(x, train, with_head=False)[0]

    @nn.compact
    def _forward(self, x: Array, train: bool, with_head: bool) -> tuple[dict, Array | None]:
        dtype, store = resolve_dtype(self.dtype), storage_dtype(self.dtype)
        if self.input_size is not None:
            x = jax.image.resize(x, (x.shape[0], self.input_size, self.input_size, x.shape[-1]), "bilinear")
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=dtype,
            param_dtype=store,
            kernel_init=_kernel_init(self.kernel_init),
            conv_general_dilated=CONV_IMPLS[self.conv_impl],
        )
        norm = functools.partial(
            GhostBatchNorm,
            use_running_average=not train or self.bn_frozen,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=dtype,
            param_dtype=store,
            ghost_batch_size=self.ghost_batch_size,
        )
        preact = block_class(self.block_cls).preact
        feats = {}
        x = self._stem(x.astype(dtype), conv, norm, feats)
        for i, size in enumerate(self.stage_sizes):
            for j in range(size):
                x = self.block_cls(
                    filters=scaled_width(self.stage_widths[i], self.width_multiplier),
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=conv,
                    norm=norm,
                    act=nn.relu,
                    shortcut=self.shortcut,
                    zero_init_last=self.zero_init_last,
                    name=f"stage{i + 1}_block{j + 1}",
                    **_block_options(
                        self.block_cls, self.stride_on_3x3, input_activated=preact and i == 0 and j == 0
                    ),
                )(x)
            feats[f"stage{i + 1}"] = x
        if not with_head:
            return feats, None
        if preact:
            x = nn.relu(norm(name="final_bn")(x))
        # Pool and classify in float32 (at least) so the loss sees full-precision logits.
        x = jnp.mean(x.astype(store), axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=store, param_dtype=store, name="head")(x)
        return feats, logits

    def _stem(self, x: Array, conv: ModuleDef, norm: ModuleDef, feats: dict) -> Array:
        width = scaled_width(self.stage_widths[0], self.width_multiplier)
        if self.stem == "imagenet":
            x = conv(width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
        else:
            x = conv(width, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
        # Pre-activation nets too: this BN-ReLU is the first block's pre-activation (shared
        # by its two paths, see the class docstring), and on ImageNet it comes before the
        # max-pool, so the pool sees activations, not raw conv outputs.
        x = nn.relu(norm(name="stem_bn")(x))
        feats["stem"] = x
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return x


def _kernel_init(kernel_init: str | Callable) -> Callable:
    return he_normal(kernel_init) if isinstance(kernel_init, str) else kernel_init


def _block_options(block_cls: ModuleDef, stride_on_3x3: bool, input_activated: bool) -> dict:
    """Block-specific fields the network forwards (only to blocks that declare them).

    ``input_activated``: the block follows the ImageNet stem's BN-ReLU, so a pre-activation
    block must not activate its input a second time.
    """
    fields = getattr(block_class(block_cls), "__dataclass_fields__", {})
    options = {"stride_on_3x3": stride_on_3x3} if "stride_on_3x3" in fields else {}
    if input_activated and "preactivate_input" in fields:
        options["preactivate_input"] = False
    return options


def _positive_ints(name: str, values: Any) -> None:
    if (
        isinstance(values, (str, bytes))
        or not isinstance(values, Sequence)
        or not values
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise ValueError(f"{name}={values!r} must be a non-empty sequence of positive ints")


def validate(net: ResNet) -> None:
    """Raises ValueError naming the field, its value and what is allowed."""
    _positive_ints("stage_sizes", net.stage_sizes)
    _positive_ints("stage_widths", net.stage_widths)
    if len(net.stage_widths) != len(net.stage_sizes):
        raise ValueError(
            f"stage_widths={tuple(net.stage_widths)} must have one width per stage "
            f"(stage_sizes={tuple(net.stage_sizes)} has {len(net.stage_sizes)})"
        )
    block = block_class(net.block_cls)
    if not all(hasattr(block, attr) for attr in ("expansion", "residual", "preact")):
        raise ValueError(
            f"block_cls={net.block_cls!r} is not a block of resnet_jax.models.blocks "
            "(needs class attributes expansion, residual, preact)"
        )
    if net.stem not in STEMS:
        raise ValueError(f"stem={net.stem!r} is not one of {STEMS}")
    if net.shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut={net.shortcut!r} is not one of {SHORTCUTS}")
    if not isinstance(net.width_multiplier, (int, float)) or net.width_multiplier <= 0:
        raise ValueError(f"width_multiplier={net.width_multiplier!r} must be a positive number")
    if not isinstance(net.num_classes, (int, np.integer)) or net.num_classes <= 0:
        raise ValueError(f"num_classes={net.num_classes!r} must be a positive int")
    if net.zero_init_last and not block.residual:
        raise ValueError(
            f"zero_init_last=True is not allowed with {block.__name__}: plain nets "
            "have no identity path (a zero branch would cut the signal)"
        )
    if not 0.0 <= net.bn_momentum < 1.0:
        raise ValueError(
            f"bn_momentum={net.bn_momentum!r} must be in [0, 1) (Flax convention: "
            "weight of the old running average)"
        )
    if not net.bn_epsilon > 0:
        raise ValueError(f"bn_epsilon={net.bn_epsilon!r} must be > 0")
    if net.ghost_batch_size is not None and (
        not isinstance(net.ghost_batch_size, (int, np.integer)) or net.ghost_batch_size <= 0
    ):
        raise ValueError(f"ghost_batch_size={net.ghost_batch_size!r} must be None or a positive int")
    if not callable(net.kernel_init) and net.kernel_init not in KERNEL_INIT_MODES:
        raise ValueError(
            f"kernel_init={net.kernel_init!r} is not one of {KERNEL_INIT_MODES} or an initialiser callable"
        )
    if not isinstance(net.bn_frozen, bool):
        raise ValueError(f"bn_frozen={net.bn_frozen!r} must be True or False")
    if net.input_size is not None and (
        not isinstance(net.input_size, (int, np.integer))
        or isinstance(net.input_size, bool)
        or net.input_size <= 0
    ):
        raise ValueError(f"input_size={net.input_size!r} must be None or a positive int")
    if not isinstance(net.conv_impl, str) or net.conv_impl not in CONV_IMPLS:
        raise ValueError(
            f"conv_impl={net.conv_impl!r} is not one of {tuple(CONV_IMPLS)} (the model "
            "families also take 'auto': 'im2col' on CPU, else 'xla')"
        )
    resolve_dtype(net.dtype)
