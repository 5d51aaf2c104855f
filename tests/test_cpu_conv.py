"""cpu_conv.conv_general_dilated: XLA's outputs exactly, XLA's gradients to float rounding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax.models import cpu_conv

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("cin,cout,k,stride,padding", [
    (3, 16, 3, 1, ((1, 1), (1, 1))),  # the CIFAR stem
    (16, 16, 3, 1, "SAME"),
    (16, 32, 3, 2, ((1, 1), (1, 1))),  # a stage's first, strided conv
    (16, 32, 1, 2, "VALID"),  # a projection shortcut (options B/C)
    (8, 8, 7, 2, ((3, 3), (3, 3))),  # the ImageNet stem's shape, smaller
])
def test_gradients_equal_xla(cin, cout, k, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 12, 12, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin))
    probe = jnp.asarray(rng.standard_normal(lax.conv_general_dilated(x, w, (stride,) * 2, padding,
                                                                     dimension_numbers=NHWC).shape, np.float32))

    def loss(conv, x, w):  # a non-trivial cotangent: every output element weighs differently
        return jnp.sum(jnp.tanh(conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)) * probe)

    ref_y = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    y = cpu_conv.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref_y))
    ref = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w), argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(lambda x, w: loss(cpu_conv.conv_general_dilated, x, w), argnums=(0, 1)))(x, w)
    for name, a, b in zip(("input", "weight"), got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()),
                                   err_msg=name)


def test_in_a_flax_conv_and_the_fallback():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32))
    plain = nn.Conv(6, (3, 3), use_bias=False)
    ours = nn.Conv(6, (3, 3), use_bias=False, conv_general_dilated=cpu_conv.conv_general_dilated)
    params = plain.init(jax.random.key(0), x)
    g_plain = jax.grad(lambda p: jnp.sum(plain.apply(p, x) ** 3))(params)
    g_ours = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 3))(params)
    np.testing.assert_allclose(g_ours["params"]["kernel"], g_plain["params"]["kernel"], rtol=1e-4, atol=1e-4)
    # Dilation is not the GEMM path's case: handed to XLA as it is, same numbers.
    w = params["params"]["kernel"]
    dilated = cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC)
    np.testing.assert_array_equal(dilated, lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                                                    dimension_numbers=NHWC))
