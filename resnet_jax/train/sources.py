"""The seam between the trainer and its data: one source per kind of dataset.

The loop asks a source four things and never learns which source it has:
  - `train(state, step, n)`: run the train steps step .. step+n-1 (the source decides how
    their inputs are made) and return the new state and the per-step metrics, stacked;
  - `evaluate(state)`: the summed eval metrics over every evaluation image, each once;
  - `compile(state, step, n)`: compile ahead of time, returning the seconds it took;
  - `recalibration_pieces(num_images, piece)`: fixed training images, un-augmented, for
    recomputing BN statistics after training (train/recalibrate.py).
What a source needs from a checkpoint to resume exactly is nothing but the step: both
sources make the examples and the augmentation of step s a pure function of (seed, s),
so a run resumed at step s sees what an uninterrupted run saw from s on.

- `CifarSource`: the whole dataset on the devices; indices of the next K steps go over,
  the gather and augmentation run on the device (fused into one `lax.scan` on GPU/TPU).
- `ImageNetSource`: a tf.data pipeline on each host yields its rows of each global batch;
  they become global arrays (`parallel.host_local_to_global`), two batches ahead of the
  step, and feed one compiled step.

`describe(config)` says, cheaply and before anything is compiled, how big the dataset is
and what shape its images have, so the config and the model can be checked against it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from resnet_jax import parallel
from resnet_jax.data import batching, cifar, normalization
from resnet_jax.train import config as config_lib
from resnet_jax.train import feeding
from resnet_jax.train.state import TrainState
from resnet_jax.train.steps import EvalFn, StepFn


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer must know of a dataset before it reads any image."""

    num_train: int
    num_eval: int
    num_classes: int
    image_shape: tuple[int, int, int]  # the training input, for initialising the model
    eval_split: str


class DataSource(Protocol):
    info: DatasetInfo
    # What the model's inputs go through (data/normalization.py), recorded with the checkpoints.
    normalization: dict[str, Any]

    def compile(self, state: TrainState, step: int, n: int) -> float: ...

    def train(self, state: TrainState, step: int, n: int) -> tuple[TrainState, dict[str, jax.Array]]: ...

    def evaluate(self, state: TrainState) -> dict[str, Any]: ...

    def recalibration_pieces(self, num_images: int, piece: int) -> Iterator[jax.Array]: ...


def describe(config: ml_collections.ConfigDict, splits: tuple[str, ...] = ("train", "eval")) -> DatasetInfo:
    """Sizes, classes and input shape of `config.dataset`; DataError if the data is missing.

    `splits`: which must be there (an evaluation needs no training set; its size is then 0).
    """
    d = config.dataset
    if d.name in config_lib.CIFAR_DATASETS:
        num_train, num_eval = config_lib.dataset_sizes(config)  # CIFAR's follow from the config
        classes = cifar.LAYOUTS[d.name].num_classes[d.label_mode]
        return DatasetInfo(
            num_train, num_eval, classes, cifar.IMAGE_SHAPE, "validation" if d.validation_size else "test"
        )
    from resnet_jax.data import imagenet

    spec = imagenet_spec(d)
    imagenet.check(spec, splits=splits)
    return DatasetInfo(
        imagenet.num_examples(spec, "train") if "train" in splits else 0,
        imagenet.num_examples(spec, "eval"),
        len(imagenet.class_names(spec)),
        (d.image_size, d.image_size, 3),
        "validation",
    )


def build(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    info: DatasetInfo,
    train_step: StepFn,
    eval_step: EvalFn,
    *,
    stored_normalization: dict[str, Any] | None = None,
    eval_only: bool = False,
) -> DataSource:
    """The source for `config.dataset.name`, with its data opened (CIFAR: on the devices).

    For an evaluation of trained weights (CIFAR): `stored_normalization`, the run's record
    (data/normalization.py), replaces the statistics of the training images, and with
    `eval_only` too only the test file is read (no `train`, no recalibration then). The
    trainer passes neither: it computes the statistics and stores them.
    """
    if config.dataset.name in config_lib.CIFAR_DATASETS:
        return CifarSource(
            config, mesh, info, train_step, eval_step, stored_normalization=stored_normalization,
            eval_only=eval_only,
        )  # fmt: skip
    return ImageNetSource(config, mesh, info, train_step, eval_step)


def imagenet_spec(dataset: ml_collections.ConfigDict) -> Any:
    from resnet_jax.data import imagenet

    if dataset.name == "image_folder":
        return imagenet.ImageNetSpec(source="folder", data_dir=dataset.data_dir)
    return imagenet.ImageNetSpec(source="tfds", data_dir=dataset.data_dir, tfds_name=dataset.tfds_name)


def _cifar_stats(rec: dict[str, Any], info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of a stored record, which must be in the units and size CIFAR's on-device
    pipeline feeds (raw bytes / 255, 32x32); ConfigError says what the record holds."""
    mean, std = normalization.arrays(rec, where="the weights' stored normalisation")
    size = list(info.image_shape[:2])
    if rec["value_range"] != [0, 1] or rec["image_size"] != size:
        raise config_lib.ConfigError(
            f"the weights' stored normalisation ({rec['source']}) is for {rec['image_size']} images in "
            f"{rec['value_range']} units; a CIFAR config feeds {size} images in [0, 1] units"
        )
    return mean, std


class CifarSource:
    """CIFAR on the devices: see `feeding` for how the steps gather and augment."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        info: DatasetInfo,
        train_step: StepFn,
        eval_step: EvalFn,
        *,
        stored_normalization: dict[str, Any] | None = None,
        eval_only: bool = False,
    ):
        d = config.dataset
        self.info = info
        stats = None if stored_normalization is None else _cifar_stats(stored_normalization, info)
        # A validation split is the tail of the training files: those are read then.
        test_only = stats is not None and eval_only and not d.validation_size
        data = cifar.load_cifar(
            d.name, d.source, d.data_dir, d.validation_size, label_mode=d.label_mode, test_only=test_only
        )
        self.data = feeding.put_on_devices(
            data, mesh, d.normalization, d.train_subset, d.eval_subset, stats=stats
        )
        if stats is not None:
            self.normalization = dict(stored_normalization)
        else:
            self.normalization = normalization.record(
                d.normalization,
                self.data.mean.addressable_data(0),  # replicated: any device's copy is the whole
                self.data.std.addressable_data(0),
                image_size=info.image_shape[:2],
                value_range=(0, 1),
                source=f"the first {self.data.train.size} training images of {d.name}",
            )
        self._seed = config.seed
        self._batch = config.batch_size
        self._chunk = feeding.TrainChunk(train_step, mesh, seed=config.seed, pad=d.pad, flip=d.flip)
        self._evaluate = feeding.make_evaluate(eval_step, mesh)
        self._eval_idx, self._eval_mask = feeding.eval_arrays(
            self.data.test.size, config.eval_batch_size, mesh
        )
        self._idx_sharding = parallel.batch_sharded(mesh, axis=1)
        self._mesh = mesh

    def _indices(self, step: int, n: int) -> jax.Array:
        host = batching.train_indices(self._seed, step, n, self._batch, self.data.train.size)
        return parallel.host_to_global(host, self._idx_sharding)

    def compile(self, state: TrainState, step: int, n: int) -> float:
        return self._chunk.compile(state, self.data, self._indices(step, n))

    def train(self, state: TrainState, step: int, n: int):
        return self._chunk(state, self.data, self._indices(step, n))

    def evaluate(self, state: TrainState) -> dict[str, Any]:
        return jax.device_get(self._evaluate(state, self.data, self._eval_idx, self._eval_mask))

    def recalibration_pieces(self, num_images: int, piece: int) -> Iterator[jax.Array]:
        """The first `num_images` training images of epoch 0's order, `piece` at a time, through
        the evaluation transform (no augmentation): deterministic inputs for BN recalibration."""
        view = feeding.make_train_view(self._mesh)
        sharding = parallel.batch_sharded(self._mesh)
        for row in batching.train_indices(self._seed, 0, num_images // piece, piece, self.data.train.size):
            yield view(self.data, parallel.host_to_global(row, sharding))


def _flatten_views(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    flat = {k: v for k, v in batch.items() if k != "views"}
    flat.update({f"views_{i}": v for i, v in enumerate(batch["views"])})
    return flat


def _unflatten_views(batch: dict[str, Any]) -> dict[str, Any]:
    views = tuple(
        batch[k]
        for k in sorted((k for k in batch if k.startswith("views_")), key=lambda k: int(k.split("_")[1]))
    )
    out = {k: v for k, v in batch.items() if not k.startswith("views_")}
    out["views"] = views
    return out


class ImageNetSource:
    """A host input pipeline per process (tf.data), one compiled step, any number of hosts.

    The train iterator is rebuilt whenever the loop asks for a step other than the next
    one (at the start, after a resume); it yields step s's rows as a function of
    (seed, s), so rebuilding it loses nothing.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        info: DatasetInfo,
        train_step: StepFn,
        eval_step: EvalFn,
    ):
        from resnet_jax.data import imagenet

        d = config.dataset
        self.info = info
        self._imagenet = imagenet
        self._mesh = mesh
        self._spec = imagenet_spec(d)
        self._dataset = d
        self.normalization = normalization.imagenet(d.image_size, d.eval_resize)
        self._seed = config.seed
        self._batch = config.batch_size
        self._eval_batch = config.eval_batch_size
        self._step = jax.jit(train_step, donate_argnums=(0,))
        self._eval = jax.jit(eval_step)
        self._compiled: Callable | None = None
        self._batches: Iterator[dict[str, jax.Array]] | None = None
        self._next_step: int | None = None
        self._check_batch_split()

    def _check_batch_split(self) -> None:
        processes = jax.process_count()
        for field, size in (("batch_size", self._batch), ("eval_batch_size", self._eval_batch)):
            if size % processes:
                raise config_lib.ConfigError(
                    f"config field {field} = {size} does not divide by the "
                    f"{processes} processes: each reads an equal share"
                )

    def _train_batches(self, step: int) -> Iterator[dict[str, jax.Array]]:
        d = self._dataset
        host = self._imagenet.train_batches(
            self._spec,
            seed=self._seed,
            start_step=step,
            global_batch=self._batch,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            image_size=d.image_size,
            transform=d.train_transform,
            scale_range=tuple(d.scale_range),
            pca_std=d.pca_std,
            skip_bad_files=d.skip_bad_files,
        )
        return parallel.prefetch_to_mesh(host, self._mesh)

    def _abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        size = self._dataset.image_size
        sharding = parallel.batch_sharded(self._mesh)
        return {
            "image": jax.ShapeDtypeStruct((self._batch, size, size, 3), jnp.float32, sharding=sharding),
            "label": jax.ShapeDtypeStruct((self._batch,), jnp.int32, sharding=sharding),
        }

    def compile(self, state: TrainState, step: int, n: int) -> float:
        del step, n
        start = time.perf_counter()
        self._compiled = self._step.lower(state, self._abstract_batch()).compile()
        return time.perf_counter() - start

    def train(self, state: TrainState, step: int, n: int):
        if self._batches is None or self._next_step != step:
            self._batches = self._train_batches(step)
        run = self._compiled or self._step
        metrics = []
        for _ in range(n):
            state, m = run(state, next(self._batches))
            metrics.append(m)
        self._next_step = step + n
        return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        d = self._dataset
        host = self._imagenet.eval_batches(
            self._spec,
            protocol=d.eval_protocol,
            per_process_batch=self._eval_batch // jax.process_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            image_size=d.image_size,
            resize_size=d.eval_resize,
            scales=tuple(d.eval_scales),
            skip_bad_files=d.skip_bad_files,
        )
        for batch in parallel.prefetch_to_mesh((_flatten_views(b) for b in host), self._mesh):
            yield _unflatten_views(batch)

    def recalibration_pieces(self, num_images: int, piece: int) -> Iterator[jax.Array]:
        """The first `num_images` images of the training order (steps 0, 1, ... at batch `piece`),
        `piece` at a time, through the evaluation's centre crop: deterministic inputs for BN
        recalibration. Each process reads its rows of each piece, as in training."""
        d = self._dataset
        if piece % jax.process_count():
            raise config_lib.ConfigError(
                f"BN recalibration: pieces of {piece} images do not divide by the "
                f"{jax.process_count()} processes: each reads an equal share"
            )
        host = self._imagenet.centred_train_batches(
            self._spec,
            seed=self._seed,
            global_batch=piece,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            image_size=d.image_size,
            resize_size=d.eval_resize,
            skip_bad_files=d.skip_bad_files,
        )
        for batch in parallel.prefetch_to_mesh(itertools.islice(host, num_images // piece), self._mesh):
            yield batch["image"]

    def evaluate(self, state: TrainState) -> dict[str, Any]:
        total: dict[str, Any] | None = None
        for batch in self.eval_batches():
            out = self._eval(state, batch)
            total = out if total is None else jax.tree.map(jnp.add, total, out)
        return jax.device_get(total)
