"""ImageNet training pipelines: this process's rows of each global batch, augmented.

Determinism. Train step s uses global-batch rows `train_indices(seed, s)` (batching.py's
per-epoch permutation) and example row r of step s is augmented with the stateless seed
(seed, s * global_batch + r); process p yields rows [p*n, (p+1)*n), n = global_batch /
process_count, and reads only those files. So step s is a pure function of (seed, s):
resuming at `start_step` repeats an uninterrupted run, and the union over processes does
not depend on how many there are. tfds tfrecords have no random access, so that source
is exact on resume but depends on process_count (see `_tfds_train`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from resnet_jax.data import DataError
from resnet_jax.data.batching import check_positive, train_indices
from resnet_jax.data.constants import MEAN_RGB, STD_RGB
from resnet_jax.data.imagenet.bad_files import BatchIterator, _assemble, _find_bad_file
from resnet_jax.data.imagenet.spec import (
    ImageNetSpec,
    _check_process,
    _folder_files,
    _options,
    _tfds_builder,
    _tfds_count,
)
from resnet_jax.errors import first_line

TRANSFORMS = ("paper", "inception")


def train_batches(
    spec: ImageNetSpec,
    *,
    seed: int,
    start_step: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    image_size: int = 224,
    transform: str = "paper",
    scale_range=(256, 480),
    pca_std: float = 0.1,
    mean=MEAN_RGB,
    std=STD_RGB,
    skip_bad_files: bool = False,
    threads: int | None = None,
) -> BatchIterator:
    """Infinite iterator of this process's rows of the global batch, steps start_step, ...

    Each item: {'image': float32 [global_batch // process_count, S, S, 3] normalised,
    'label': int32 [...]}. transform: 'paper' (He et al. Sec. 3.4: scale augmentation in
    `scale_range`, crop, flip, PCA lighting with `pca_std`) or 'inception' (random-resized
    crop + flip, torchvision/Flax/Goyal et al.). See the module docstring for determinism.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform: got {transform!r}, want one of {TRANSFORMS}")
    _check_split(global_batch, process_index, process_count)
    if transform == "paper" and not image_size <= scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range: got {scale_range}, want image_size={image_size} <= low <= high")
    if not isinstance(start_step, (int, np.integer)) or start_step < 0:
        raise ValueError(f"start_step: got {start_step!r}, want an integer >= 0")

    def image_fn(image_bytes, example_seed):
        from resnet_jax.data import image_transforms as T

        if transform == "paper":
            return T.train_paper(
                image_bytes,
                example_seed,
                image_size=image_size,
                scale_range=scale_range,
                pca_std=pca_std,
                mean=mean,
                std=std,
            )
        return T.train_inception(image_bytes, example_seed, image_size=image_size, mean=mean, std=std)

    rows = _Rows(int(seed), int(start_step), global_batch, process_index, process_count)
    return _train_iterator(spec, rows, image_fn, skip_bad_files, threads)


def centred_train_batches(
    spec: ImageNetSpec,
    *,
    seed: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    image_size: int = 224,
    resize_size: int = 256,
    mean=MEAN_RGB,
    std=STD_RGB,
    skip_bad_files: bool = False,
    threads: int | None = None,
) -> BatchIterator:
    """`train_batches` from step 0 (the same images, rows and processes), each image through the
    evaluation's centre crop (shorter side `resize_size`, centre `image_size`) instead of the
    augmentation: deterministic training images, e.g. for recomputing BN statistics."""

    def centre(image_bytes, example_seed):
        del example_seed
        from resnet_jax.data import image_transforms as T

        view = T.eval_center(image_bytes, image_size=image_size, resize_size=resize_size, mean=mean, std=std)
        return view[0]

    _check_split(global_batch, process_index, process_count)
    rows = _Rows(int(seed), 0, global_batch, process_index, process_count)
    return _train_iterator(spec, rows, centre, skip_bad_files, threads)


def _check_split(global_batch, process_index, process_count):
    """A valid process of `process_count`, and a global batch they share evenly."""
    _check_process(process_index, process_count)
    check_positive("global_batch", global_batch)
    if global_batch % process_count:
        raise ValueError(
            f"global_batch: got {global_batch}, want a multiple of process_count={process_count}"
        )


class _Rows(NamedTuple):
    """Which rows of which steps this process yields (see the module docstring)."""

    seed: int
    start_step: int
    global_batch: int
    process_index: int
    process_count: int

    @property
    def per(self) -> int:
        return self.global_batch // self.process_count


def _train_iterator(spec, rows, image_fn, skip_bad_files, threads) -> BatchIterator:
    """`rows` from the spec's source, each image through `image_fn(image_bytes, example_seed)`."""
    source = _folder_train if spec.source == "folder" else _tfds_train
    return BatchIterator(lambda it: source(it, spec, rows, image_fn, skip_bad_files, threads))


def _skipping_bad_rows(it, tf, ds, plan, per, threads):
    """Skip mode of both training sources: `ds` (elements with 'pos') loses its failed decodes,
    and each missing row becomes a good row of the same batch (`_assemble`, `_substitute`)."""
    ds = ds.ignore_errors().prefetch(2 * per).with_options(_options(tf, threads))

    def on_bad(name):
        it._skipped(name)  # returns None: the row is filled by `_substitute`

    return _assemble(
        ds.as_numpy_iterator(), plan, lambda e: {"image": e["image"], "label": e["label"]}, on_bad
    )


def _step_plan(seed, step, global_batch, n, per, process_index, chunk):
    """(indices [chunk, per], positions [chunk, per]) of this process for steps step.. ."""
    rows = slice(process_index * per, (process_index + 1) * per)
    indices = train_indices(seed, step, chunk, global_batch, n)[:, rows]
    steps = np.arange(step, step + chunk, dtype=np.int64)[:, None]
    positions = steps * global_batch + np.arange(rows.start, rows.stop, dtype=np.int64)[None, :]
    return indices, positions


def _folder_train(it, spec, rows, image_fn, skip_bad_files, threads):
    import tensorflow as tf

    seed, start_step, global_batch, process_index, _ = rows
    per = rows.per
    paths, labels = _folder_files(spec, "train")
    n = len(paths)
    if global_batch > n:
        raise ValueError(
            f"global_batch: got {global_batch}, larger than the {n} training images in {spec.data_dir}"
        )
    paths_array = np.asarray(paths, dtype=object)
    chunk = 16

    def plan_chunks():
        step = start_step
        while True:
            yield step, *_step_plan(seed, step, global_batch, n, per, process_index, chunk)
            step += chunk

    def generator():
        for _, indices, positions in plan_chunks():
            for idx, pos in zip(indices, positions):
                yield paths_array[idx].astype(bytes), labels[idx], pos

    signature = (
        tf.TensorSpec([per], tf.string),
        tf.TensorSpec([per], tf.int32),
        tf.TensorSpec([per], tf.int64),
    )
    ds = tf.data.Dataset.from_generator(generator, output_signature=signature).unbatch()

    def load(path, label, pos):
        example_seed = tf.stack([tf.constant(seed, tf.int64), pos])
        return {"image": image_fn(tf.io.read_file(path), example_seed), "label": label, "pos": pos}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_bad_files:

        def plan():
            for _, indices, positions in plan_chunks():
                for idx, pos in zip(indices, positions):
                    yield pos, [paths[i] for i in idx]

        yield from _skipping_bad_rows(it, tf, ds, plan(), per, threads)
        return
    ds = ds.batch(per, drop_remainder=True).map(lambda b: {"image": b["image"], "label": b["label"]})
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf, threads))
    iterator = ds.as_numpy_iterator()
    step = start_step
    while True:
        try:
            batch = next(iterator)
        except tf.errors.OpError as err:
            indices, _ = _step_plan(seed, step, global_batch, n, per, process_index, 1)
            raise _find_bad_file([paths[i] for i in indices[0]], err, f"training step {step}") from None
        yield batch
        step += 1


def _tfds_train(it, spec, rows, image_fn, skip_bad_files, threads):
    """tfds tfrecords: exact resume, process_count-dependent order.

    Epoch e of process p reads its even share of the split (`tfds.even_splits`) with
    files shuffled by seed (seed, e) and a seeded 10k-example shuffle buffer, and uses the
    first steps_per_epoch * n examples (steps_per_epoch = split size // global_batch, the
    same on every process). Resuming at step s rebuilds epoch s // steps_per_epoch and
    skips its first (s % steps_per_epoch) * n records before decoding (reading, not
    decoding, them: about a minute per epoch-fraction on ImageNet). Augmentation seeds
    are (seed, global position) as for folders. Changing process_count changes which
    examples form a step (each process reads only its own tfrecord share).
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    seed, start_step, global_batch, process_index, process_count = rows
    per = rows.per
    builder = _tfds_builder(spec)
    split = spec.train_split
    n = _tfds_count(builder, spec, split)
    steps_per_epoch = n // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"global_batch: got {global_batch}, larger than the {n} examples of {spec.tfds_name}"
        )
    share = tfds.even_splits(split, n=process_count)[process_index]
    epoch, position = divmod(start_step, steps_per_epoch)
    while True:
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        read_config = tfds.ReadConfig(shuffle_seed=epoch_seed, interleave_cycle_length=16)
        ds = builder.as_dataset(
            split=share,
            shuffle_files=True,
            read_config=read_config,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        ds = ds.shuffle(10_000, seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.take(steps_per_epoch * per).skip(position * per)
        first = epoch * steps_per_epoch + position
        offsets = tf.data.Dataset.range(position * per, steps_per_epoch * per)

        def load(example, k, epoch=epoch):
            step = epoch * steps_per_epoch + k // per
            pos = step * global_batch + process_index * per + k % per
            example_seed = tf.stack([tf.constant(seed, tf.int64), pos])
            return {
                "image": image_fn(example["image"], example_seed),
                "label": tf.cast(example["label"], tf.int32),
                "pos": pos,
            }

        ds = tf.data.Dataset.zip(ds, offsets).map(
            load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        steps = range(first, (epoch + 1) * steps_per_epoch)
        if skip_bad_files:

            def plan(steps=steps):
                for step in steps:
                    pos = step * global_batch + process_index * per + np.arange(per)
                    yield (
                        pos,
                        [f"{spec.tfds_name}/{split} record at step {step}, row {r}" for r in range(per)],
                    )

            yield from _skipping_bad_rows(it, tf, ds, plan(), per, threads)
        else:
            ds = ds.batch(per, drop_remainder=True).map(lambda b: {"image": b["image"], "label": b["label"]})
            iterator = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf, threads)).as_numpy_iterator()
            for step in steps:
                try:
                    batch = next(iterator)
                except tf.errors.OpError as err:
                    raise DataError(
                        f"tfds {spec.tfds_name}/{split} (data_dir {builder.data_dir}): a record of "
                        f"training step {step} failed to decode: {first_line(err)}; pass "
                        "skip_bad_files=True to skip and count such records"
                    ) from None
                yield batch
        epoch, position = epoch + 1, 0
