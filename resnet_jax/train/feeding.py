"""CIFAR on the devices: the whole dataset lives in device memory, replicated.

A compiled function runs K train steps in one `lax.scan`; each step gathers its global
batch by indices (a seeded per-epoch permutation computed on the host, a few KB per
dispatch), augments it on the device with a key derived from the step number, and calls
the pure `train_step`. The gathered batch is sharded along the mesh's 'data' axis, so each
device gathers and augments only its own share; the data order and the random crops
depend on (seed, step) only, not on the number of devices or on where a run resumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from resnet_jax import parallel
from resnet_jax.data import augment, batching, cifar
from resnet_jax.train.state import TrainState
from resnet_jax.train.steps import StepFn


@flax.struct.dataclass
class DeviceSplit:
    images: jax.Array  # uint8 [N, H, W, C], replicated
    labels: jax.Array  # int32 [N], replicated

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


@flax.struct.dataclass
class DeviceData:
    train: DeviceSplit
    test: DeviceSplit
    mean: jax.Array
    std: jax.Array


def put_on_devices(
    data: cifar.CifarData,
    mesh: Mesh,
    normalization: str,
    train_subset: int = 0,
    eval_subset: int = 0,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> DeviceData:
    """`data` replicated on the mesh, with the (mean, std) the inputs are normalised by:
    `stats` when given (a run's stored record: an evaluation need not read the training
    images), else computed from the first `train_subset` training images, as training does."""
    rep = parallel.replicated(mesh)
    n_train = train_subset or len(data.train_labels)
    n_eval = eval_subset or len(data.test_labels)
    train_images = data.train_images[:n_train]
    mean, std = augment.normalization_stats(train_images, normalization) if stats is None else stats

    def split(images, labels):
        return DeviceSplit(
            parallel.host_to_global(images, rep), parallel.host_to_global(np.asarray(labels, np.int32), rep)
        )

    return DeviceData(
        train=split(train_images, data.train_labels[:n_train]),
        test=split(data.test_images[:n_eval], data.test_labels[:n_eval]),
        mean=parallel.host_to_global(np.asarray(mean, np.float32), rep),
        std=parallel.host_to_global(np.asarray(std, np.float32), rep),
    )


class TrainChunk:
    """K train steps per call: (state, data, indices[K, B]) -> (state, metrics stacked over K).

    Fused into one `lax.scan` dispatch on GPU/TPU, so small batches are not bound by
    launch overhead. On CPU, XLA runs convolutions inside a while loop ~25x slower than
    outside one (measured: CIFAR ResNet-20, batch 128, 17 s vs 0.7 s a step), so there the
    same K steps are dispatched one by one. Both donate the state.
    """

    def __init__(
        self, step_fn: StepFn, mesh: Mesh, *, seed: int, pad: int, flip: bool, fuse: bool | None = None
    ):
        batch_sharding = parallel.batch_sharded(mesh)
        # The seed's augmentation key is an argument, not a constant of the compiled program:
        # runs that differ only in the seed (a sweep over seeds) share one compilation.
        root = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
        self._aug_root = parallel.host_to_global(np.asarray(root), parallel.replicated(mesh))

        def one_step(state: TrainState, data: DeviceData, idx: jax.Array, aug_root: jax.Array):
            key = jax.random.fold_in(jax.random.wrap_key_data(aug_root), state.step)
            images = jax.lax.with_sharding_constraint(data.train.images[idx], batch_sharding)
            batch = {
                "image": augment.augment_batch(
                    key, images, data.mean, data.std, pad=pad, flip=flip, dtype=jnp.float32
                ),
                "label": jax.lax.with_sharding_constraint(data.train.labels[idx], batch_sharding),
            }
            return step_fn(state, batch)

        def scan(state: TrainState, data: DeviceData, indices: jax.Array, aug_root: jax.Array):
            return jax.lax.scan(lambda s, idx: one_step(s, data, idx, aug_root), state, indices)

        self.fused = mesh.devices.flat[0].platform != "cpu" if fuse is None else fuse
        self._scan = jax.jit(scan, donate_argnums=(0,))
        self._step = jax.jit(one_step, donate_argnums=(0,))
        self._compiled: dict[tuple[int, ...], Callable] = {}  # ahead-of-time, by indices shape

    def compile(self, state: TrainState, data: DeviceData, indices: jax.Array) -> float:
        """Compiles ahead of time for this shape; returns the seconds it took."""
        start = time.perf_counter()
        if self.fused:
            self._compiled[indices.shape] = self._scan.lower(state, data, indices, self._aug_root).compile()
        else:
            self._compiled[indices.shape[1:]] = self._step.lower(
                state, data, indices[0], self._aug_root
            ).compile()
        return time.perf_counter() - start

    def __call__(self, state: TrainState, data: DeviceData, indices: jax.Array):
        if self.fused:
            return self._compiled.get(indices.shape, self._scan)(state, data, indices, self._aug_root)
        step = self._compiled.get(indices.shape[1:], self._step)
        metrics = []
        for row in range(indices.shape[0]):
            state, m = step(state, data, indices[row], self._aug_root)
            metrics.append(m)
        return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)


def make_evaluate(eval_fn: Callable, mesh: Mesh):
    """jit(state, data, indices[nb, B], mask[nb, B]) -> summed metrics over every test image."""
    batch_sharding = parallel.batch_sharded(mesh)

    def evaluate(state: TrainState, data: DeviceData, indices: jax.Array, mask: jax.Array):
        def body(total, xs):
            idx, m = xs
            images = jax.lax.with_sharding_constraint(data.test.images[idx], batch_sharding)
            batch = {
                "image": augment.eval_batch(images, data.mean, data.std, dtype=jnp.float32),
                "label": data.test.labels[idx],
                "mask": m,
            }
            out = eval_fn(state, batch)
            return jax.tree.map(jnp.add, total, out), None

        zero = {k: jnp.float32(0) for k in ("loss_sum", "wrong", "wrong5", "count")}
        total, _ = jax.lax.scan(body, zero, (indices, mask))
        return total

    return jax.jit(evaluate)


def make_train_view(mesh: Mesh):
    """jit(data, indices[B]) -> training images [B, H, W, C] through the evaluation transform
    (normalisation only, no augmentation), sharded along the batch like a train step's."""
    batch_sharding = parallel.batch_sharded(mesh)

    def view(data: DeviceData, idx: jax.Array) -> jax.Array:
        images = jax.lax.with_sharding_constraint(data.train.images[idx], batch_sharding)
        return augment.eval_batch(images, data.mean, data.std, dtype=jnp.float32)

    return jax.jit(view)


def eval_arrays(n: int, batch_size: int, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """Indices and mask [num_batches, batch] covering each of the n examples exactly once."""
    batches = batching.eval_batches(n, batch_size)
    idx = np.stack([b[0] for b in batches]).astype(np.int32)
    mask = np.stack([b[1] for b in batches])
    sharding = parallel.batch_sharded(mesh, axis=1)
    return parallel.host_to_global(idx, sharding), parallel.host_to_global(mask, sharding)
