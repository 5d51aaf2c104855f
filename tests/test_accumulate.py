"""Gradient accumulation (`accumulate_steps` = k): one update from k micro-batches.

What is the same as one update of the full batch with ghost BN of the micro-batch size: the
gradients, hence the parameters and the momentum, and the loss and error. What is not: the BN
running statistics get k momentum updates per step instead of one; both are checked against
the closed form of the per-micro-batch statistics.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _configs import tiny_config
from _workdirs import final_arrays
from test_parallel import assert_trees_close, cache_dir, load, run_ok, start, train_losses  # noqa: F401

from resnet_jax import models, parallel
from resnet_jax.train import config as config_lib
from resnet_jax.train import feeding, loop, steps
from resnet_jax.train.state import create_train_state

K = 4


def float64_setup(batch: int, momentum: float = 0.9):
    """A one-stage CIFAR-style ResNet in float64 (call under jax.enable_x64): stem conv-BN-ReLU,
    one basic block (two BNs), the head; small enough to compile in seconds. Its state with SGD +
    momentum + weight decay, and a batch of random 16x16 images with labels over 10 classes."""
    model = models.ResNet(
        stage_sizes=(1,),
        block_cls=models.BasicBlock,
        num_classes=10,
        stem="cifar",
        stage_widths=(8,),
        shortcut="A",
        dtype="float64",
        bn_momentum=momentum,
    )
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = create_train_state(model, tx, jax.random.key(0, impl="rbg"), (16, 16, 3), mesh)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, 16, 16, 3))
    labels = rng.integers(0, 10, size=batch).astype(np.int32)
    return model, state, {"image": jnp.asarray(images, jnp.float64), "label": jnp.asarray(labels)}


@functools.partial(jax.jit, static_argnums=0)
def micro_batch_stats(model, state, images: jax.Array) -> dict:
    """The BN statistics of `images` alone: a train-mode pass with momentum 0 keeps exactly them."""
    _, updates = model.clone(bn_momentum=0.0).apply(
        state.variables, images, train=True, mutable=["batch_stats"]
    )
    return updates["batch_stats"]


def test_k_micro_batches_update_like_the_full_batch_with_ghost_batchnorm():
    """In float64, so that the only differences are the order of float64 sums: measured, the
    parameters and the momentum agreed to 4e-16 of their scale and the loss exactly; 1e-10 leaves
    room for other CPUs' kernels and BN's amplification of round-off, and is far below the 0.66
    by which the wrong grouping of examples (consecutive runs, checked below) moves them."""
    batch, micro, mu = 32, 32 // K, 0.9
    with jax.enable_x64(True):
        model, state, data = float64_setup(batch, momentum=mu)
        accumulated, m_acc = jax.jit(functools.partial(steps.train_step, accumulate_steps=K))(state, data)

        # The reference: micro-batch i is data[i::K] (steps.micro_batches); laid out one after
        # another, they are the consecutive ghost groups of a full-batch step.
        order = np.concatenate([np.arange(i, batch, K) for i in range(K)])
        ghost = model.clone(ghost_batch_size=micro)
        reordered = {k: v[order] for k, v in data.items()}
        full, m_full = jax.jit(steps.train_step)(state.replace(apply_fn=ghost.apply), reordered)
        # Consecutive micro-batches (the wrong grouping) give another update: the test can fail.
        wrong, _ = jax.jit(steps.train_step)(state.replace(apply_fn=ghost.apply), data)

        for name in ("params", "opt_state"):
            a, b = getattr(accumulated, name), getattr(full, name)
            jax.tree.map(
                lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-10 * np.abs(y).max()), a, b
            )
        gap = max(
            float(np.abs(x - y).max() / np.abs(y).max())
            for x, y in zip(jax.tree.leaves(wrong.params), jax.tree.leaves(full.params))
        )
        assert gap > 1e-2, gap
        np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-12)
        assert float(m_acc["error"]) == float(m_full["error"])
        np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-10)

        # Running statistics: s_i, micro-batch i's statistics under the (unchanged) parameters.
        # k updates: r <- mu r + (1 - mu) s_i for i = 0..k-1; the full batch: one update with
        # the mean of the s_i.
        per_micro = [micro_batch_stats(model, state, data["image"][i::K]) for i in range(K)]
        r0 = state.batch_stats
        k_updates = jax.tree.map(
            lambda r, *s: mu**K * r + (1 - mu) * sum(mu ** (K - 1 - i) * si for i, si in enumerate(s)),
            r0,
            *per_micro,
        )
        one_update = jax.tree.map(lambda r, *s: mu * r + (1 - mu) * sum(s) / K, r0, *per_micro)
        close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-12)
        jax.tree.map(close, accumulated.batch_stats, k_updates)
        jax.tree.map(close, full.batch_stats, one_update)
        differ = [
            np.abs(a - b).max() for a, b in zip(jax.tree.leaves(k_updates), jax.tree.leaves(one_update))
        ]
        assert max(differ) > 1e-3, "k updates and one must differ, or the test tells them apart by nothing"


def test_bad_accumulate_steps_is_one_config_error_naming_the_field(cifar_dir):
    def refused(num_devices: int = 1, **overrides) -> str:
        with pytest.raises(config_lib.ConfigError) as e:
            config_lib.validate(tiny_config(cifar_dir, **overrides), num_devices=num_devices)
        return str(e.value)

    # batch 32: k must divide it; on 8 devices each micro-batch must still cover all 8.
    assert "accumulate_steps = 3" in (msg := refused(accumulate_steps=3)) and "[1, 2, 4, 8, 16, 32]" in msg
    assert "[1, 2, 4]" in (msg := refused(8, accumulate_steps=8, eval_batch_size=200))
    msg = refused(accumulate_steps=8, model__ghost_batch_size=8)
    assert "accumulate_steps = 8" in msg and "model.ghost_batch_size = 8" in msg and "[1, 2, 4]" in msg
    assert "accumulate_steps = 0: must be an integer in [1," in refused(accumulate_steps=0)
    config_lib.validate(tiny_config(cifar_dir, accumulate_steps=4, model__ghost_batch_size=2), num_devices=1)


# k=4 of batch 32 (micro-batches of 8): 4 steps, 2 per dispatch, a checkpoint after each
# dispatch; an eval batch that divides by 8 devices.
RUN = {
    "accumulate_steps": K,
    "schedule__total_steps": 4,
    "schedule__boundaries": (),
    "steps_per_dispatch": 2,
    "log_every_steps": 2,
    "eval_every_steps": 4,
    "checkpoint_every_steps": 2,
    "eval_batch_size": 200,
}


def checkpoint_arrays(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Parameters and BN statistics of checkpoint `step`, keyed as the worker's .npz files."""
    mngr = ocp.CheckpointManager(os.path.abspath(workdir / "checkpoints"))
    try:
        items = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        mngr.close()
    leaves = jax.tree_util.tree_flatten_with_path({k: items[k] for k in ("params", "batch_stats")})[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, cache_dir):  # noqa: F811
    """The same run on 8 simulated devices, in a subprocess started first so that it compiles
    while this process runs the 1-device one; the 8-device test waits for it."""
    root = tmp_path_factory.mktemp("accumulate8")
    run = {
        "workdir": str(root / "run8"),
        "overrides": RUN,
        "out": str(root / "8.npz"),
        "first_out": str(root / "8.first.npz"),
    }
    job = {"mode": "train", "runs": [run], "hlo": str(root / "hlo8.txt"), "hlo_scan": False}
    proc = start(job, 8, cache_dir)
    yield proc, root
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def straight(eight_devices, cifar_dir, tmp_path_factory) -> Path:
    """The run on 1 device, never interrupted."""
    workdir = tmp_path_factory.mktemp("accumulate") / "straight"
    loop.train_and_evaluate(tiny_config(cifar_dir, **RUN), str(workdir))
    return workdir


def test_resume_after_a_crash_with_accumulation_ends_bit_identical(
    straight, cifar_dir, tmp_path, monkeypatch
):
    original = feeding.TrainChunk.__call__
    calls = {"n": 0}

    def crash_on_second_chunk(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash after the checkpoint at step 2")
        return original(self, *args)

    config = tiny_config(cifar_dir, **RUN)
    monkeypatch.setattr(feeding.TrainChunk, "__call__", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(feeding.TrainChunk, "__call__", original)
    assert loop.train_and_evaluate(config, str(tmp_path / "resumed"))["resumed_from"] == 2

    step_a, a = final_arrays(straight)
    step_b, b = final_arrays(tmp_path / "resumed")
    assert step_a == step_b == 4
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_eight_devices_accumulate_like_one_without_moving_the_batch(straight, eight_devices):
    """k=4 on 8 simulated devices (one example of each micro-batch per device): after two
    updates every parameter and BN statistic agrees with the 1-device run's to float32
    rounding of reordered sums (8 partial sums and an all-reduce; measured 7e-7 of each
    array's scale; 1e-5, as test_parallel holds one update of global BN to); the losses
    likewise. The compiled 8-device step moves no image between devices."""
    proc, root = eight_devices
    run_ok([proc])
    eight = load(root / "8.first.npz")
    assert int(eight.pop("step")) == 2
    eight = {k: v for k, v in eight.items() if k.startswith(("['params']", "['batch_stats']"))}
    one = checkpoint_arrays(straight, 2)
    assert len(one) == 37  # resnet8: parameters and BN statistics
    assert_trees_close(one, eight, rel=1e-5)
    np.testing.assert_allclose(train_losses(root / "run8"), train_losses(straight), rtol=1e-5)
    # The step as CPUs run it: a loop over micro-batches, gradients and BN sums all-reduced,
    # and no image gathered from another device.
    hlo = (root / "hlo8.txt").read_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" not in hlo
    assert "all-reduce" in hlo and "while" in hlo
