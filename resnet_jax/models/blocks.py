"""Residual and plain building blocks, their shortcuts, and the batch-norm they use.

Every block is a :class:`Block` and shares its fields, ``(filters, strides, conv, norm, act,
shortcut, zero_init_last)``: ``conv`` and ``norm`` arrive as ``functools.partial``s already
bound by the network (initialiser, dtypes, convolution, train/eval mode, BN momentum and
scope), so a block only decides *topology*. Class attributes tell the network what a block is:

* ``expansion``: output channels = ``filters * expansion`` (1 basic, 4 bottleneck);
* ``residual``: whether the block has a shortcut at all (False for the plain nets);
* ``preact``: 2016 pre-activation ordering (the network then tells the first block that its
  input is already activated by the stem, and adds a final BN-ReLU before pooling).

Submodule names are fixed (``conv1``, ``bn1``, ..., ``proj_conv``, ``proj_bn``) so that
checkpoints and weight converters can rely on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

ModuleDef = Any
Array = Any

SHORTCUTS = ("A", "B", "C")


class GhostBatchNorm(nn.Module):
    """Batch normalisation whose statistics may cover sub-batches ("ghost" batches).

    ``ghost_batch_size=None`` normalises over the whole (global) batch, exactly what
    ``nn.BatchNorm`` does. An int ``G`` normalises each run of ``G`` consecutive examples
    with its own mean/variance, reproducing the 2015 paper's ImageNet setting where BN
    statistics were per GPU (32 images) rather than over the 256-image batch. The running
    statistics are then updated with the mean over groups of the group statistics.

    Parameters (``scale``, ``bias``) and ``batch_stats`` (``mean``, ``var``) have the
    names, shapes and float32 dtype of ``nn.BatchNorm``'s, so checkpoints are
    interchangeable. Statistics and normalisation are computed in float32 whatever the
    compute ``dtype`` (in float64 when ``dtype`` or ``param_dtype`` is float64: the
    reference path); the result is cast to ``dtype``. As in Flax, the running averages
    are not touched while initialising, and the variance is the biased one.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    ghost_batch_size: int | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        stats_dtype = jnp.promote_types(jnp.promote_types(self.dtype, self.param_dtype), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), stats_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), stats_dtype))
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)

        x32 = x.astype(stats_dtype)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = _affine_normalise(x32, mean, var, scale, bias, self.epsilon)
        else:
            groups = self._grouped(x32)
            reduce_axes = tuple(range(1, groups.ndim - 1))
            # Per-group statistics with shape (num_groups, 1, ..., 1, C) so that they
            # broadcast over each group's examples and spatial positions.
            mean = jnp.mean(groups, axis=reduce_axes, keepdims=True)
            mean_sq = jnp.mean(jnp.square(groups), axis=reduce_axes, keepdims=True)
            # E[x^2] - E[x]^2 can dip below zero by round-off; clipping avoids NaNs.
            var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
            y = _affine_normalise(groups, mean, var, scale, bias, self.epsilon).reshape(x.shape)
            if not self.is_initializing():
                batch_mean = jnp.mean(mean.reshape(-1, features), axis=0)
                batch_var = jnp.mean(var.reshape(-1, features), axis=0)
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * batch_mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * batch_var
        return y.astype(self.dtype)

    def _grouped(self, x: Array) -> Array:
        """Reshapes (B, ...) to (B / G, G, ...); the whole batch is one group when G is None."""
        batch = x.shape[0]
        size = batch if self.ghost_batch_size is None else self.ghost_batch_size
        if size <= 0 or batch % size:
            raise ValueError(
                f"ghost_batch_size={self.ghost_batch_size} must be a positive divisor of the "
                f"batch size {batch} (or None for whole-batch statistics)"
            )
        return x.reshape((batch // size, size) + x.shape[1:])


def _affine_normalise(x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float) -> Array:
    # Same order of operations as flax's BatchNorm, so that ghost_batch_size=None agrees
    # with nn.BatchNorm to the last few ulps.
    mul = lax.rsqrt(var + epsilon) * scale.astype(x.dtype)
    return (x - mean) * mul + bias.astype(x.dtype)


def pad_shortcut(x: Array, out_channels: int, strides: int) -> Array:
    """Option A shortcut: subsample by ``strides``, append zero channels up to ``out_channels``.

    Parameter-free, as in the 2015 paper's CIFAR nets. The new channels are appended after
    the existing ones (the paper only says "extra zero entries padded").
    """
    if strides != 1:
        x = x[:, ::strides, ::strides, :]
    extra = out_channels - x.shape[-1]
    if extra < 0:
        raise ValueError(
            f"shortcut='A' cannot reduce channels ({x.shape[-1]} -> {out_channels}); use shortcut='B' or 'C'"
        )
    if extra:
        x = jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))
    return x


def _check_shortcut(shortcut: str) -> None:
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut={shortcut!r} is not one of {SHORTCUTS}")


def _needs_projection(x: Array, out_channels: int, strides: int, shortcut: str) -> bool:
    _check_shortcut(shortcut)
    if shortcut == "C":
        return True
    return shortcut == "B" and (strides != 1 or x.shape[-1] != out_channels)


class Block(nn.Module):
    """What every block shares: the fields the network passes and the class attributes it reads.

    Attributes:
      filters: width of the block's convolutions; it outputs ``filters * expansion`` channels.
      strides: stride of the block's downsampling convolution (and of its shortcut).
      conv: ``nn.Conv`` partial bound by the network (initialiser, dtypes, convolution).
      norm: :class:`GhostBatchNorm` partial bound by the network (mode, momentum, dtypes).
      act: the activation (``nn.relu``).
      shortcut: 'A' | 'B' | 'C' (see :data:`SHORTCUTS`); accepted and ignored by plain blocks.
      zero_init_last: zero-initialise the end of the residual branch (Goyal et al. 2017);
        where depends on the block, and plain blocks reject it.

    A subclass sets the class attributes where it differs from a basic post-activation
    residual block (``expansion = 1``, ``residual = True``, ``preact = False``), adds its own
    fields after these and defines ``__call__``.
    """

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    shortcut: str = "B"
    zero_init_last: bool = False

    expansion: ClassVar[int] = 1
    residual: ClassVar[bool] = True
    preact: ClassVar[bool] = False


def _conv3x3(conv: ModuleDef, filters: int, strides: int, name: str, **kw: Any) -> nn.Module:
    # Symmetric padding of 1 (not 'SAME', which pads asymmetrically for stride 2 on even
    # sizes) keeps the sampling grid identical to the paper's Caffe/Torch models.
    return conv(filters, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)), name=name, **kw)


def _conv1x1(conv: ModuleDef, filters: int, strides: int, name: str, **kw: Any) -> nn.Module:
    return conv(filters, (1, 1), strides=(strides, strides), padding="VALID", name=name, **kw)


def _last_bn(norm: ModuleDef, zero_init_last: bool, name: str) -> nn.Module:
    if zero_init_last:
        return norm(scale_init=nn.initializers.zeros, name=name)
    return norm(name=name)


def _last_conv_kw(zero_init_last: bool) -> dict:
    return {"kernel_init": nn.initializers.zeros} if zero_init_last else {}


def _reject_zero_init(block: Block) -> None:
    if block.zero_init_last:
        raise ValueError(
            f"zero_init_last=True is not allowed for {type(block).__name__}: a plain block has "
            "no identity path, so a zero residual branch would cut the signal; use False"
        )


def _post_act_shortcut(block: Block, x: Array, out_channels: int) -> Array:
    """Shortcut of a post-activation block: identity, option A, or 1x1 conv + BN."""
    if _needs_projection(x, out_channels, block.strides, block.shortcut):
        y = _conv1x1(block.conv, out_channels, block.strides, name="proj_conv")(x)
        return block.norm(name="proj_bn")(y)
    return pad_shortcut(x, out_channels, block.strides)


def _pre_act_shortcut(block: Block, x: Array, preact: Array, out_channels: int) -> Array:
    """Shortcut of a pre-activation block.

    A projection (options B/C: a 1x1 conv with no BN, as in the 2016 paper's code) reads the
    *pre-activated* input ``relu(bn1(x))``, like the residual branch; the parameter-free
    paths (identity, option A) carry the raw ``x`` so the signal passes through untouched.
    """
    if _needs_projection(x, out_channels, block.strides, block.shortcut):
        return _conv1x1(block.conv, out_channels, block.strides, name="proj_conv")(preact)
    return pad_shortcut(x, out_channels, block.strides)


def _pre_activation(block: Block, x: Array) -> Array:
    """``relu(bn1(x))``, or ``x`` itself when the block's input is already activated.

    The network's stem ends in BN-ReLU, and the 2016 paper takes that as the first
    block's pre-activation ("the first activation right after conv1 and before splitting
    into two paths"), so the first block of the first stage has no BN-ReLU of its own at
    the input (``preactivate_input=False``; the 'no_preact' first block of the authors'
    Torch code, fb.resnet.torch ``models/preresnet.lua``) and both of its paths read the
    activated input. Every other block pre-activates its raw input with ``bn1``.
    """
    if block.preactivate_input:
        return block.act(block.norm(name="bn1")(x))
    return x


class PlainBlock(Block):
    """Two 3x3 convs, each followed by BN-ReLU, no shortcut (the 2015 paper's plain nets).

    ``shortcut`` is accepted for the shared signature and ignored.
    """

    residual = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _reject_zero_init(self)
        y = _conv3x3(self.conv, self.filters, self.strides, "conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = _conv3x3(self.conv, self.filters, 1, "conv2")(y)
        return self.act(self.norm(name="bn2")(y))


class BasicBlock(Block):
    """``relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x))`` (2015, post-activation).

    ``zero_init_last`` initialises ``bn2``'s scale to 0 (Goyal et al. 2017), making the block
    ``relu(shortcut(x))`` at init.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = _conv3x3(self.conv, self.filters, self.strides, "conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = _conv3x3(self.conv, self.filters, 1, "conv2")(y)
        y = _last_bn(self.norm, self.zero_init_last, "bn2")(y)
        return self.act(y + _post_act_shortcut(self, x, self.filters))


def _bottleneck_strides(strides: int, stride_on_3x3: bool) -> tuple[int, int]:
    """(stride of the first 1x1, stride of the 3x3)."""
    return (1, strides) if stride_on_3x3 else (strides, 1)


class Bottleneck(Block):
    """1x1 reduce, 3x3, 1x1 expand (x4), BN after each, ReLU after the addition (2015).

    ``stride_on_3x3=False`` downsamples in the first 1x1 as in the paper; True puts the
    stride on the 3x3 ("ResNet v1.5" of torchvision and the Flax example, ~+0.5% top-1,
    more FLOPs). ``zero_init_last`` zero-initialises ``bn3``'s scale (Goyal et al. 2017).
    """

    stride_on_3x3: bool = False

    expansion = 4

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = self.filters * self.expansion
        s1, s3 = _bottleneck_strides(self.strides, self.stride_on_3x3)
        y = self.act(self.norm(name="bn1")(_conv1x1(self.conv, self.filters, s1, "conv1")(x)))
        y = self.act(self.norm(name="bn2")(_conv3x3(self.conv, self.filters, s3, "conv2")(y)))
        y = _conv1x1(self.conv, out, 1, "conv3")(y)
        y = _last_bn(self.norm, self.zero_init_last, "bn3")(y)
        return self.act(y + _post_act_shortcut(self, x, out))


class PlainBottleneck(Block):
    """The bottleneck without its shortcut (plain counterpart of ResNet-50/101/152)."""

    stride_on_3x3: bool = False

    expansion = 4
    residual = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _reject_zero_init(self)
        s1, s3 = _bottleneck_strides(self.strides, self.stride_on_3x3)
        y = self.act(self.norm(name="bn1")(_conv1x1(self.conv, self.filters, s1, "conv1")(x)))
        y = self.act(self.norm(name="bn2")(_conv3x3(self.conv, self.filters, s3, "conv2")(y)))
        y = _conv1x1(self.conv, self.filters * self.expansion, 1, "conv3")(y)
        return self.act(self.norm(name="bn3")(y))


class PreActBasicBlock(Block):
    """``x + conv3x3(relu(BN(conv3x3(relu(BN(x))))))`` (2016, full pre-activation).

    Nothing follows the addition, so a zero residual branch makes the block exactly the
    identity. There is no BN closing the branch, so ``zero_init_last`` zero-initialises the
    last conv's kernel instead of a BN scale. ``preactivate_input=False`` drops ``bn1``: the
    input is taken as already activated (see :func:`_pre_activation`).
    """

    preactivate_input: bool = True

    preact = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pre = _pre_activation(self, x)
        y = _conv3x3(self.conv, self.filters, self.strides, "conv1")(pre)
        y = self.act(self.norm(name="bn2")(y))
        y = _conv3x3(self.conv, self.filters, 1, "conv2", **_last_conv_kw(self.zero_init_last))(y)
        return y + _pre_act_shortcut(self, x, pre, self.filters)


class PreActBottleneck(Block):
    """Pre-activation bottleneck (2016; ResNet-164/1001 on CIFAR, ResNet-200 on ImageNet).

    BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 (x4), plus the shortcut; nothing
    after the addition. ``zero_init_last`` zero-initialises ``conv3``'s kernel.
    ``stride_on_3x3`` as in :class:`Bottleneck`; ``preactivate_input`` as in
    :class:`PreActBasicBlock`.
    """

    stride_on_3x3: bool = False
    preactivate_input: bool = True

    expansion = 4
    preact = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = self.filters * self.expansion
        s1, s3 = _bottleneck_strides(self.strides, self.stride_on_3x3)
        pre = _pre_activation(self, x)
        y = _conv1x1(self.conv, self.filters, s1, "conv1")(pre)
        y = _conv3x3(self.conv, self.filters, s3, "conv2")(self.act(self.norm(name="bn2")(y)))
        y = _conv1x1(self.conv, out, 1, "conv3", **_last_conv_kw(self.zero_init_last))(
            self.act(self.norm(name="bn3")(y))
        )
        return y + _pre_act_shortcut(self, x, pre, out)
