"""cpu_conv.conv_general_dilated: XLA's outputs exactly, XLA's gradients to float rounding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax import models
from resnet_jax.models import cpu_conv

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize(
    "cin,cout,k,stride,padding",
    [
        (3, 16, 3, 1, ((1, 1), (1, 1))),  # the CIFAR stem
        (16, 16, 3, 1, "SAME"),
        (16, 32, 3, 2, ((1, 1), (1, 1))),  # a stage's first, strided conv
        (16, 32, 1, 2, "VALID"),  # a projection shortcut (options B/C)
        (8, 8, 7, 2, ((3, 3), (3, 3))),  # the ImageNet stem's shape, smaller
    ],
)
def test_gradients_equal_xla(cin, cout, k, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 12, 12, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin))
    probe = jnp.asarray(
        rng.standard_normal(
            lax.conv_general_dilated(x, w, (stride,) * 2, padding, dimension_numbers=NHWC).shape, np.float32
        )
    )

    def loss(conv, x, w):  # a non-trivial cotangent: every output element weighs differently
        return jnp.sum(jnp.tanh(conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)) * probe)

    ref_y = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    y = cpu_conv.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref_y))
    ref = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w), argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(lambda x, w: loss(cpu_conv.conv_general_dilated, x, w), argnums=(0, 1)))(x, w)
    for name, a, b in zip(("input", "weight"), got, ref):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()), err_msg=name
        )


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
    np.testing.assert_array_equal(
        dilated, lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC)
    )


def test_conv_impl_is_chosen_by_backend_when_the_model_is_built():
    assert models.conv_impl_for("cpu") == "im2col"
    assert models.conv_impl_for("gpu") == models.conv_impl_for("tpu") == "xla"
    assert models.CONV_IMPLS == {"xla": lax.conv_general_dilated, "im2col": cpu_conv.conv_general_dilated}
    assert jax.default_backend() == "cpu"  # the test suite runs on CPU
    assert models.build_model("cifar_resnet8").conv_impl == "im2col"
    assert models.build_model("cifar_resnet8", conv_impl="auto").conv_impl == "im2col"
    assert models.build_model("cifar_resnet8", conv_impl="xla").conv_impl == "xla"
    assert models.build_model("resnet18", conv_impl="im2col").conv_impl == "im2col"
    # Constructed directly, a ResNet reads no backend: XLA's convolution unless told otherwise.
    assert models.ResNet(stage_sizes=(1,), stage_widths=(8,), block_cls=models.BasicBlock).conv_impl == "xla"


def test_whole_model_outputs_equal_and_gradients_equal_xla():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((8, 32, 32, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, 10, 8))
    ours, reference = (
        models.build_model("cifar_resnet8"),
        models.build_model("cifar_resnet8", conv_impl="xla"),
    )
    variables = ours.init(jax.random.key(0), x, train=False)

    def loss(model, params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), logits

    def grads(model):
        return jax.jit(jax.grad(lambda p: loss(model, p), has_aux=True))(variables["params"])

    # The field really switches the traced convolution: im2col's weight gradient is a custom VJP.
    assert "custom_vjp_call" in str(jax.make_jaxpr(jax.grad(lambda p: loss(ours, p)[0]))(variables["params"]))
    assert "custom_vjp_call" not in str(
        jax.make_jaxpr(jax.grad(lambda p: loss(reference, p)[0]))(variables["params"])
    )
    (g_ours, logits_ours), (g_ref, logits_ref) = grads(ours), grads(reference)
    np.testing.assert_array_equal(np.asarray(logits_ours), np.asarray(logits_ref))  # same forward pass
    np.testing.assert_array_equal(
        ours.apply(variables, x, train=False), reference.apply(variables, x, train=False)
    )
    reference_leaves = dict(jax.tree_util.tree_leaves_with_path(g_ref))
    assert len(reference_leaves) == len(jax.tree_util.tree_leaves(g_ours))
    for path, a in jax.tree_util.tree_leaves_with_path(g_ours):
        b = reference_leaves[path]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()), err_msg=str(path))


@pytest.mark.parametrize("stride,pads", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))])
def test_weight_grad_in_pieces_equals_the_whole_batch(monkeypatch, stride, pads):
    """Cache-sized pieces (strided over the batch) sum to the whole batch's gradient and XLA's."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((8, 10, 10, 4), np.float32))
    out = 10 // stride
    dy = jnp.asarray(rng.standard_normal((8, out, out, 6), np.float32))

    def grad():  # a new function each time: jit's trace cache does not see PIECE_BYTES
        return jax.jit(lambda x, dy: cpu_conv.weight_grad(x, dy, (3, 3, 4, 6), (stride, stride), pads))

    monkeypatch.setattr(cpu_conv, "PIECE_BYTES", 1 << 40)
    assert "while" not in grad().lower(x, dy).as_text()
    whole = grad()(x, dy)
    monkeypatch.setattr(cpu_conv, "PIECE_BYTES", 1)  # one image per piece: 8 pieces
    assert "while" in grad().lower(x, dy).as_text()
    pieces = grad()(x, dy)
    _, vjp = jax.vjp(
        lambda w: lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=NHWC),
        jnp.zeros((3, 3, 4, 6), jnp.float32),
    )
    (reference,) = vjp(dy)
    scale = float(jnp.abs(reference).max())
    np.testing.assert_allclose(np.asarray(pieces), np.asarray(whole), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(pieces), np.asarray(reference), rtol=1e-5, atol=1e-5 * scale)
