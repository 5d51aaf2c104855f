"""A drop-in `lax.conv_general_dilated` whose weight gradient is one matrix product (im2col).

Why: profiling the CIFAR ResNet-20 train step on XLA:CPU (scripts/benchmark_cpu_vs_torch.py)
shows the weight gradient of the 16-channel 3x3 convolutions at 32x32 taking several times
their forward pass, and more than torch's whole forward + backward of the same layer. XLA
expresses that gradient as a convolution of the input with the output gradient, batch and
channels swapped: a "kernel" the size of the feature map over few channels, the shape its
CPU convolution kernels handle worst. Written as columns instead,
`dW[kh, kw, c, o] = sum_n cols[n, (kh, kw, c)] * dy[n, o]`, it is a single GEMM with a long
contraction and a small output, which Eigen's matmul runs well. The forward pass and the
input gradient stay XLA's own.

The columns are built and multiplied one cache-sized piece of the batch at a time
(`PIECE_BYTES`, a `fori_loop`), because building them for the whole batch at once costs more
than the product itself: a profile of the step (2026-11-29, 2 cores) had the pads, slices and
concatenation of whole-batch columns at 1.2 of the 2 thread-seconds per step, the GEMMs at
0.12. In pieces of about 2 MB the step went from about 86 to about 125 images/s.

Use: `ResNet(conv_impl='im2col')` (what `build_model` picks on CPU), or in any layer
`flax.linen.Conv(..., conv_general_dilated=cpu_conv.conv_general_dilated)`. Only NHWC
inputs with HWIO kernels, no dilation and one feature group take the new path; anything else
goes to `lax.conv_general_dilated` unchanged, so the function is safe to pass everywhere.
Outputs are identical; gradients equal XLA's to float rounding (tests/test_cpu_conv.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_lax_conv = lax.conv_general_dilated  # the original, even if someone patches lax later
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated`, with a GEMM weight gradient where the case allows it."""
    plain = functools.partial(
        _lax_conv,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if (
        lhs.ndim != 4
        or rhs.ndim != 4
        or feature_group_count != 1
        or batch_group_count != 1
        or preferred_element_type is not None
        or any(d != 1 for d in (lhs_dilation or (1, 1)))
        or any(d != 1 for d in (rhs_dilation or (1, 1)))
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    ):
        return plain()
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(p < 0 for pair in pads for p in pair):
        return plain()
    return _conv(lhs, rhs, strides, tuple(pads), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(
    x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: tuple[tuple[int, int], ...], precision: Any
) -> jax.Array:
    return _lax_conv(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(
        lambda x: _lax_conv(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision), x
    )
    (dx,) = input_vjp(dy)
    return dx, weight_grad(x, dy, w.shape, strides, pads, precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


# Bytes of im2col columns per piece of the batch. The whole batch's columns (72 MB for a
# 16-channel 3x3 convolution at 32x32, batch 128) go out to memory and back; a piece of about
# this size stays in the cache and costs a third to a sixth of the time (measured on 2 AMD EPYC
# cores: 114 -> 18-28 ms for that layer).
PIECE_BYTES = 2 << 20


def weight_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel_shape: Sequence[int],
    strides: tuple[int, int],
    pads: Sequence[tuple[int, int]],
    precision: Any = None,
) -> jax.Array:
    """dL/dW of an NHWC/HWIO convolution: the sum of `_piece_grad` over cache-sized pieces of the batch.

    Pieces are strided (image b goes to piece b % pieces). Only where JAX has a single device.
    """
    kh, kw, cin, cout = kernel_shape
    batch, out_h, out_w, _ = dy.shape
    per_image = out_h * out_w * kh * kw * cin * jnp.dtype(x.dtype).itemsize
    pieces = 1
    # One device only: with the batch sharded over several, GSPMD would gather the pieces
    # across devices (seen in the 8-device step's HLO), which costs more than it saves.
    if jax.device_count() == 1:
        while batch % (2 * pieces) == 0 and per_image * batch // pieces > PIECE_BYTES:
            pieces *= 2
    if pieces == 1:
        return _piece_grad(x, dy, kernel_shape, strides, pads, precision).astype(x.dtype)
    xs = x.reshape(batch // pieces, pieces, *x.shape[1:])
    dys = dy.reshape(batch // pieces, pieces, *dy.shape[1:])

    def add_piece(j: jax.Array, total: jax.Array) -> jax.Array:
        piece = (
            lax.dynamic_index_in_dim(xs, j, axis=1, keepdims=False),
            lax.dynamic_index_in_dim(dys, j, axis=1, keepdims=False),
        )
        return total + _piece_grad(*piece, kernel_shape, strides, pads, precision)

    total = lax.fori_loop(0, pieces, add_piece, jnp.zeros(tuple(kernel_shape), _accumulator(x.dtype)))
    return total.astype(x.dtype)


def _piece_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel_shape: Sequence[int],
    strides: tuple[int, int],
    pads: Sequence[tuple[int, int]],
    precision: Any,
) -> jax.Array:
    """cols^T @ dy accumulated in float32 (float64 for float64 inputs), cols ordered (kh, kw, c) like HWIO."""
    kh, kw, cin, cout = kernel_shape
    batch, out_h, out_w, _ = dy.shape
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    taps = [
        lax.slice(
            xp, (0, i, j, 0), (batch, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, cin), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]
    cols = jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * cin)
    grad = jnp.dot(
        cols.T, dy.reshape(-1, cout), precision=precision, preferred_element_type=_accumulator(x.dtype)
    )
    return grad.reshape(kh, kw, cin, cout)


def _accumulator(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)
