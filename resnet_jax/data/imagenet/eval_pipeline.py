"""ImageNet evaluation pipelines: each process's share of the split, as padded, masked batches.

Views per protocol (centre crop, 10-crop, multi-scale) come from `image_transforms`;
every process yields the same number of batches, and padding rows carry mask=False, so
each image counts exactly once over all processes.
"""

from __future__ import annotations

import math

import numpy as np

from resnet_jax.data import DataError
from resnet_jax.data.batching import check_positive
from resnet_jax.data.constants import MEAN_RGB, STD_RGB
from resnet_jax.data.imagenet.bad_files import BatchIterator, _assemble, _find_bad_file
from resnet_jax.data.imagenet.spec import (
    ImageNetSpec,
    _check_process,
    _folder_dir,
    _folder_files,
    _options,
    _tfds_builder,
    _tfds_count,
    num_examples,
)
from resnet_jax.errors import first_line

PROTOCOLS = ("center", "ten_crop", "multi_scale")


def num_eval_batches(spec: ImageNetSpec, per_process_batch: int, process_count: int) -> int:
    """Batches every process yields in `eval_batches` (the same on all processes)."""
    check_positive("per_process_batch", per_process_batch)
    check_positive("process_count", process_count)
    return _eval_batch_count(num_examples(spec, "eval"), per_process_batch, process_count)


def _eval_batch_count(n: int, per_process_batch: int, process_count: int) -> int:
    return max(1, math.ceil(math.ceil(n / process_count) / per_process_batch))


def _eval_fn(protocol, image_size, resize_size, scales, mean, std):
    def views(image_bytes):
        from resnet_jax.data import image_transforms as T

        if protocol == "center":
            return (
                T.eval_center(
                    image_bytes, image_size=image_size, resize_size=resize_size, mean=mean, std=std
                ),
            )
        if protocol == "ten_crop":
            return (
                T.eval_ten_crop(
                    image_bytes, image_size=image_size, resize_size=resize_size, mean=mean, std=std
                ),
            )
        return T.eval_multi_scale(image_bytes, scales=scales, mean=mean, std=std)

    return views


def eval_batches(
    spec: ImageNetSpec,
    *,
    protocol: str = "center",
    per_process_batch: int,
    process_index: int,
    process_count: int,
    image_size: int = 224,
    resize_size: int = 256,
    scales=(224, 256, 384, 480, 640),
    mean=MEAN_RGB,
    std=STD_RGB,
    skip_bad_files: bool = False,
    threads: int | None = None,
) -> BatchIterator:
    """Finite iterator over this process's share of the evaluation split.

    Each batch: {'views': tuple of float32 [b, V, H, W, 3] (one group; multi_scale: one
    per scale), 'label': int32 [b], 'mask': bool [b]}. Protocols: 'center' (V=1: shorter
    side `resize_size`, centre `image_size`), 'ten_crop' (V=10: corners, centre and their
    flips, torchvision TenCrop order), 'multi_scale' (V=2 per scale s: shorter side s,
    centre s x s and its flip; see image_transforms.eval_multi_scale). Process p reads the
    contiguous block [p*m, (p+1)*m) of the split, m = ceil(N / process_count); every
    process yields `num_eval_batches` batches, padding rows carry mask=False, so each image
    counts exactly once over all processes.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: got {protocol!r}, want one of {PROTOCOLS}")
    _check_process(process_index, process_count)
    check_positive("per_process_batch", per_process_batch)
    views = _eval_fn(protocol, image_size, resize_size, tuple(scales), mean, std)
    args = dict(
        views=views,
        b=per_process_batch,
        process_index=process_index,
        process_count=process_count,
        skip_bad_files=skip_bad_files,
        threads=threads,
    )
    if spec.source == "folder":
        return BatchIterator(lambda it: _folder_eval(it, spec, **args))
    return BatchIterator(lambda it: _tfds_eval(it, spec, **args))


def _dummy_jpeg(tf):
    # Padding rows decode this 8x8 grey JPEG instead of a real file.
    return tf.io.encode_jpeg(tf.fill([8, 8, 3], tf.constant(128, tf.uint8)))


def _eval_pipeline(tf, ds, views, b, threads, skip_bad_files):
    def load(image_bytes, label, mask, pos):
        return {"views": views(image_bytes), "label": label, "mask": mask, "pos": pos}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_bad_files:
        return ds.ignore_errors().prefetch(2 * b).with_options(_options(tf, threads))
    ds = ds.batch(b, drop_remainder=True).map(lambda x: {k: x[k] for k in ("views", "label", "mask")})
    return ds.prefetch(2).with_options(_options(tf, threads))


def _run_eval(it, tf, ds, b, num_batches, names_of_batch, skip_bad_files, on_error):
    if skip_bad_files:
        zero_views = tuple(np.zeros(spec.shape, np.float32) for spec in ds.element_spec["views"])

        def plan():
            for k in range(num_batches):
                yield np.arange(k * b, (k + 1) * b), names_of_batch(k)

        def make_row(e):
            return {"views": e["views"], "label": e["label"], "mask": e["mask"]}

        def on_bad(name):
            it._skipped(name)
            return {"views": zero_views, "label": np.int32(0), "mask": np.bool_(False)}

        yield from _assemble(ds.as_numpy_iterator(), plan(), make_row, on_bad)
        return
    iterator = ds.as_numpy_iterator()
    for k in range(num_batches):
        try:
            batch = next(iterator)
        except tf.errors.OpError as err:
            raise on_error(k, err) from None
        yield batch


def _folder_eval(it, spec, *, views, b, process_index, process_count, skip_bad_files, threads):
    import tensorflow as tf

    paths, labels = _folder_files(spec, "eval")
    n = len(paths)
    share = math.ceil(n / process_count)
    num_batches = _eval_batch_count(n, b, process_count)
    start, stop = min(n, process_index * share), min(n, (process_index + 1) * share)
    total = num_batches * b
    mine = list(paths[start:stop]) + [""] * (total - (stop - start))
    mine_labels = np.zeros(total, np.int32)
    mine_labels[: stop - start] = labels[start:stop]
    mask = np.arange(total) < stop - start
    dummy = _dummy_jpeg(tf)

    def read(path, label, valid, pos):
        image_bytes = tf.cond(valid, lambda: tf.io.read_file(path), lambda: dummy)
        return image_bytes, label, valid, pos

    ds = tf.data.Dataset.from_tensor_slices((mine, mine_labels, mask, np.arange(total, dtype=np.int64)))
    ds = _eval_pipeline(tf, ds.map(read), views, b, threads, skip_bad_files)

    def names(k):
        return mine[k * b : (k + 1) * b]

    def on_error(k, err):
        return _find_bad_file(names(k), err, f"{_folder_dir(spec, 'eval')} batch {k}")

    yield from _run_eval(it, tf, ds, b, num_batches, names, skip_bad_files, on_error)


def _tfds_eval(it, spec, *, views, b, process_index, process_count, skip_bad_files, threads):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = _tfds_builder(spec)
    split = spec.eval_split
    n = _tfds_count(builder, spec, split)
    num_batches = _eval_batch_count(n, b, process_count)
    share = tfds.even_splits(split, n=process_count)[process_index]
    ds = builder.as_dataset(split=share, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    # take(): the share's own count, so padding starts exactly where the share ends.
    ds = ds.take(_tfds_count(builder, spec, share))
    ds = ds.map(lambda e: (e["image"], tf.cast(e["label"], tf.int32), tf.constant(True)))
    dummy = _dummy_jpeg(tf)
    padding = tf.data.Dataset.from_tensors((dummy, tf.constant(0, tf.int32), tf.constant(False))).repeat()
    ds = ds.concatenate(padding).take(num_batches * b)
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(num_batches * b)).map(lambda x, pos: (*x, pos))
    ds = _eval_pipeline(tf, ds, views, b, threads, skip_bad_files)

    def names(k):
        return [f"{spec.tfds_name}/{share} record {k * b + r}" for r in range(b)]

    def on_error(k, err):
        return DataError(
            f"tfds {spec.tfds_name}/{share} (data_dir {builder.data_dir}): a record of eval batch {k} "
            f"failed to decode: {first_line(err)}; pass skip_bad_files=True to skip and count such records"
        )

    yield from _run_eval(it, tf, ds, b, num_batches, names, skip_bad_files, on_error)
