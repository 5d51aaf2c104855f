"""NNX fine-tuning of a linen ResNet through resnet_jax.interop.nnx equals the linen trainer.

Three SGD steps (momentum 0.9, weight decay on all but BN, the project's `sgd`) taken with
`nnx.Optimizer` / `nnx.value_and_grad` / `nnx.jit` on the `to_nnx` module, against the same
steps of `train_step` (resnet_jax/train/steps.py) on a `TrainState`: same parameters, same
BatchNorm running statistics, same eval logits afterwards.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax.interop.layout import ConversionError
from resnet_jax.interop.nnx import to_linen, to_nnx
from resnet_jax.interop.weights import pretrained, save_converted
from resnet_jax.models import build_model
from resnet_jax.train.optim import sgd, weight_decay_mask
from resnet_jax.train.state import TrainState
from resnet_jax.train.steps import cross_entropy, train_step

STEPS, BATCH, LR, WD = 3, 16, 0.1, 5e-4
# Both sides run the same linen forward and backward and the same optax update, but in two
# different XLA programs (nnx.jit vs jax.jit). On the CPU they agree bit for bit (checked on
# 2026-12-02, jax 0.10.2, flax 0.12.8); another backend or XLA version may fuse or reorder
# the reductions differently: float32 rounding (~1e-7 relative) grown over three steps at
# lr 0.1 stays far below 1e-5.
# A missing BN update or a wrong decay mask differs by orders of magnitude more (checked
# below: training moves every compared leaf by more than 1e-3).
RTOL, ATOL = 1e-5, 1e-6


def cifar_batches(cifar_dir, n):
    """The first n * BATCH training images (the binary format: label byte, 3x32x32 CHW)."""
    raw = np.fromfile(cifar_dir / "data_batch_1.bin", np.uint8, count=n * BATCH * 3073).reshape(-1, 3073)
    images = raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0 - 0.5
    labels = raw[:, 0].astype(np.int32)
    return [
        {
            "image": jnp.asarray(images[i * BATCH : (i + 1) * BATCH]),
            "label": jnp.asarray(labels[i * BATCH : (i + 1) * BATCH]),
        }
        for i in range(n)
    ]


def make_tx():
    return sgd(lambda step: LR, 0.9, False, WD, lambda params: weight_decay_mask(params, "no_bn"))


def assert_trees_close(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path)
        )


def max_change(after, before):
    """The smallest, over the leaves, of the largest change of an element."""
    pairs = zip(jax.tree.leaves(after), jax.tree.leaves(before))
    return min(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)


def test_nnx_training_steps_equal_the_linen_train_step(cifar_dir, tmp_path):
    model = build_model("cifar_resnet8")
    batches = cifar_batches(cifar_dir, STEPS + 1)
    variables = model.init(jax.random.key(0), batches[0]["image"][:1], train=False)

    # The linen trainer.
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=make_tx().init(variables["params"]),
        apply_fn=model.apply,
        tx=make_tx(),
    )
    linen_step = jax.jit(train_step)
    for batch in batches[:STEPS]:
        state, _ = linen_step(state, batch)

    # The documented NNX loop (docs/pretrained.md, "Fine-tuning in NNX").
    net = to_nnx(model, variables)
    optimizer = nnx.Optimizer(net, make_tx(), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(net, optimizer, images, labels):
        def loss_fn(net):
            return jnp.mean(cross_entropy(net(images, train=True), labels))

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        optimizer.update(net, grads)
        return loss

    for batch in batches[:STEPS]:
        nnx_step(net, optimizer, batch["image"], batch["label"])

    trained = to_linen(net)
    assert_trees_close(trained["params"], state.params)
    assert_trees_close(trained["batch_stats"], state.batch_stats)
    assert int(optimizer.step[...]) == STEPS
    # The comparison is not vacuous: both collections moved, every leaf by > 1e-3.
    assert max_change(trained["params"], variables["params"]) > 1e-3
    assert max_change(trained["batch_stats"], variables["batch_stats"]) > 1e-3

    # train=False uses the trained running statistics; the exported variables give it back.
    held_out = batches[STEPS]["image"]
    expected = np.asarray(model.apply(state.variables, held_out, train=False))
    np.testing.assert_allclose(np.asarray(net(held_out, train=False)), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(to_nnx(model, trained)(held_out, train=False)),
        np.asarray(model.apply(trained, held_out, train=False)),
    )
    # Saved with the project's tools and loaded back with the one-liner.
    save_converted(tmp_path / "finetuned", trained, {"model": "cifar_resnet8", "model_overrides": {}})
    loaded_model, loaded = pretrained(tmp_path / "finetuned")
    np.testing.assert_array_equal(
        np.asarray(loaded_model.apply(loaded, held_out, train=False)),
        np.asarray(model.apply(trained, held_out, train=False)),
    )
    # and evaluation leaves the statistics alone.
    assert_trees_close(to_linen(net)["batch_stats"], trained["batch_stats"])


def test_train_mode_outside_jit_updates_the_statistics_like_linen():
    model = build_model("cifar_resnet8")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = model.init(jax.random.key(0), x[:1], train=False)
    net = to_nnx(model, variables)
    logits = net(x, train=True)
    expected, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-6, atol=1e-6)
    assert_trees_close(to_linen(net)["batch_stats"], updates["batch_stats"])
    assert max_change(to_linen(net)["batch_stats"], variables["batch_stats"]) > 1e-4


def test_to_nnx_refuses_a_foreign_collection():
    model = build_model("cifar_resnet8")
    variables = dict(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    variables["cache"] = {"x": jnp.zeros(3)}
    with pytest.raises(ConversionError, match="cache/x has no place"):
        to_nnx(model, variables)
