"""ImageNet input pipelines: tfds `imagenet2012` or an image folder, read by tf.data.

Owns the sources (`ImageNetSpec`), checking them, their labels, and the per-process train
and evaluation batch iterators the trainer calls. Per-image transforms live in
`image_transforms.py`. TensorFlow (and tfds) is imported inside functions only, so the
package imports on machines without it.

Determinism. Train step s uses global-batch rows `train_indices(seed, s)` (batching.py's
per-epoch permutation) and example row r of step s is augmented with the stateless seed
(seed, s * global_batch + r); process p yields rows [p*n, (p+1)*n), n = global_batch /
process_count, and reads only those files. So step s is a pure function of (seed, s):
resuming at `start_step` repeats an uninterrupted run, and the union over processes does
not depend on how many there are. tfds tfrecords have no random access, so that source
is exact on resume but depends on process_count (see `_tfds_train`).

Bad files. An undecodable file stops the iterator with a DataError naming it (the failing
step's files are re-decoded one by one to find it). With `skip_bad_files=True` the
pipeline drops failed decodes and fills their rows in place, so batch shapes, row positions
and every other example stay exactly as without the bad file: in training, a bad row takes
a copy (image and label) of the next good row of the same step's batch on this process
(cyclically), so no blank image or wrong label reaches the step or the BN statistics, and
the substitute is a pure function of (seed, step) and the set of bad files, so resuming
stays exact; in evaluation, a bad row is masked out (`mask=False`). Each skip is logged
with the file name and kept in the iterator's `bad_files` list; a training batch whose rows
all fail stops with a DataError.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from resnet_jax.data import DataError
from resnet_jax.data.batching import train_indices
from resnet_jax.data.constants import EIGVAL, EIGVEC, MEAN_RGB, STD_RGB  # noqa: F401 (re-exported)

SOURCES = ("tfds", "folder")
TRANSFORMS = ("paper", "inception")
PROTOCOLS = ("center", "ten_crop", "multi_scale")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
NUM_CLASSES = 1000

_FOLDER_HOW = (
    "an image folder needs <data_dir>/train/<class>/*.JPEG and <data_dir>/val/<class>/*.JPEG "
    "(class = synset id such as n01440764; the official validation tar is flat, so sort its "
    "images into class folders with the ILSVRC2012 validation ground truth first)"
)
_TFDS_HOW = (
    "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into "
    "<manual_dir> (default <data_dir>/downloads/manual) and prepare once with "
    "`tfds build imagenet2012 --data_dir=<data_dir> --manual_dir=<manual_dir>` "
    "(about 150 GB of tfrecords; see tfds' imagenet2012 page)"
)


@dataclasses.dataclass(frozen=True)
class ImageNetSpec:
    """Where ImageNet comes from.

    source: 'tfds' (`tfds_name`, default imagenet2012, from tfds `data_dir`) or 'folder'
        (`data_dir` holds `train/` and `val/`, one subfolder per class).
    train_split / eval_split: tfds split names; for a folder, the subfolder names, with
        'validation' read from `val/` (ImageNet's conventional name).
    """

    source: str
    data_dir: str | None
    tfds_name: str = "imagenet2012"
    train_split: str = "train"
    eval_split: str = "validation"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"ImageNetSpec.source: got {self.source!r}, want one of {SOURCES}")
        if self.source == "folder" and not self.data_dir:
            raise ValueError(f"ImageNetSpec.data_dir: a folder source needs its root; {_FOLDER_HOW}")


def _split_name(spec: ImageNetSpec, split: str) -> str:
    # Roles 'train'/'eval' resolve through the spec; other names are used as they are.
    return {"train": spec.train_split, "eval": spec.eval_split}.get(split, split)


def _folder_dir(spec: ImageNetSpec, split: str) -> Path:
    name = _split_name(spec, split)
    root = Path(spec.data_dir)
    if name == "validation" and not (root / name).is_dir():
        name = "val"
    return root / name


# ---------------------------------------------------------------------------- folder listing

@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 synsets in tfds imagenet2012's label order (sorted ids).

    Read from the label file tfds ships (tfds is a dependency), without importing tfds.
    Empty if that file is missing.
    """
    spec = importlib.util.find_spec("tensorflow_datasets")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "imagenet2012" / "labels.txt"
        if path.is_file():
            return tuple(path.read_text().split())
    return ()


def _class_dirs(directory: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


@functools.lru_cache(maxsize=4)
def _folder_classes(root: str) -> tuple[str, ...]:
    names = set()
    for sub in ("train", "val", "validation"):
        if (Path(root) / sub).is_dir():
            names.update(_class_dirs(Path(root) / sub))
    synsets = imagenet_synsets()
    # ImageNet subsets keep the 1000-class indices, so torchvision-converted weights
    # predict the right class on any subset of the synsets.
    if names and synsets and names <= set(synsets):
        return synsets
    return tuple(sorted(names))


@functools.lru_cache(maxsize=4)
def _list_folder(directory: str, root: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(paths, int32 labels) of every image under directory/<class>/, sorted by class then name."""
    index = {name: i for i, name in enumerate(_folder_classes(root))}
    paths, labels = [], []
    for name in _class_dirs(Path(directory)):
        files = sorted(e.name for e in os.scandir(Path(directory) / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(os.path.join(directory, name, f) for f in files)
        labels.extend([index[name]] * len(files))
    return tuple(paths), np.asarray(labels, dtype=np.int32)


def _folder_files(spec: ImageNetSpec, split: str) -> tuple[tuple[str, ...], np.ndarray]:
    directory = _folder_dir(spec, split)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory; {_FOLDER_HOW}")
    paths, labels = _list_folder(str(directory), str(Path(spec.data_dir)))
    if not paths:
        raise DataError(f"{directory}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders; {_FOLDER_HOW}")
    return paths, labels


# ---------------------------------------------------------------------------- tfds

def _tfds_builder(spec: ImageNetSpec):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(spec.tfds_name, data_dir=spec.data_dir)
    except Exception as err:  # unknown name, unreadable dir: say which
        raise DataError(f"tfds dataset {spec.tfds_name!r} in data_dir={spec.data_dir}: {err}") from err
    return builder


def _tfds_count(builder, spec: ImageNetSpec, split: str) -> int:
    try:
        return int(builder.info.splits[split].num_examples)
    except Exception as err:
        raise DataError(
            f"tfds {spec.tfds_name} split {split!r} is not prepared under {builder.data_dir} ({err}); "
            + (_TFDS_HOW if spec.tfds_name == "imagenet2012" else f"prepare it with `tfds build {spec.tfds_name}`")
        ) from err


# ---------------------------------------------------------------------------- public metadata

def num_examples(spec: ImageNetSpec, split: str) -> int:
    """Examples in a split ('train', 'eval' or a split name); no decoding. DataError if missing."""
    if spec.source == "folder":
        return len(_folder_files(spec, split)[0])
    return _tfds_count(_tfds_builder(spec), spec, _split_name(spec, split))


def class_names(spec: ImageNetSpec) -> tuple[str, ...]:
    """Class names in label order: sorted synsets (tfds' order; for a folder of synset
    subfolders, all 1000 ILSVRC-2012 synsets, so subsets keep the standard indices)."""
    if spec.source == "folder":
        classes = _folder_classes(str(Path(spec.data_dir)))
        if not classes:
            raise DataError(f"{spec.data_dir}: no class subfolders; {_FOLDER_HOW}")
        return classes
    return tuple(_tfds_builder(spec).info.features["label"].names)


def check(spec: ImageNetSpec, splits: Sequence[str] = ("train", "eval")) -> None:
    """Raises DataError naming what is missing and how to prepare it; cheap (no decoding)."""
    if spec.source == "folder" and not Path(spec.data_dir).is_dir():
        raise DataError(f"{spec.data_dir}: no such directory; {_FOLDER_HOW}")
    for split in splits:
        num_examples(spec, split)


def num_eval_batches(spec: ImageNetSpec, per_process_batch: int, process_count: int) -> int:
    """Batches every process yields in `eval_batches` (the same on all processes)."""
    _check_positive("per_process_batch", per_process_batch)
    _check_positive("process_count", process_count)
    return _eval_batch_count(num_examples(spec, "eval"), per_process_batch, process_count)


def _eval_batch_count(n: int, per_process_batch: int, process_count: int) -> int:
    return max(1, math.ceil(math.ceil(n / process_count) / per_process_batch))


def _check_positive(name, value):
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: got {value!r}, want an integer >= 1")


def _check_process(process_index, process_count):
    _check_positive("process_count", process_count)
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index: got {process_index!r}, want 0 <= index < process_count={process_count}")


# ---------------------------------------------------------------------------- iterator

class BatchIterator:
    """An iterator of batches with the files it skipped (`bad_files`, in order met)."""

    def __init__(self, generator_fn: Callable[["BatchIterator"], Iterator[dict]]):
        self.bad_files: list[str] = []
        self._it = generator_fn(self)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def _skipped(self, name: str) -> None:
        self.bad_files.append(name)
        logging.warning("skipping unreadable image %s (%d skipped so far)", name, len(self.bad_files))


def _options(tf, threads):
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = int(threads)
    return options


def _find_bad_file(files: Sequence[str], err: Exception, where: str) -> DataError:
    """Re-decodes `files` one by one (eagerly) to name the one that failed."""
    import tensorflow as tf

    from resnet_jax.data import image_transforms as T

    for path in files:
        if not path:
            continue
        try:
            T.decode(tf.io.read_file(path))
        except Exception as one:  # noqa: BLE001 - any failure names this file
            return DataError(f"{path}: cannot be decoded as an image ({_first_line(one)}); fix or remove it, "
                             "or pass skip_bad_files=True to skip and count such files")
    return DataError(f"reading {where} failed: {_first_line(err)} (files: {', '.join(files[:4])}...)")


def _first_line(err: Exception) -> str:
    text = str(getattr(err, "message", err)).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _assemble(elements, plan, make_row, on_bad):
    """Skip mode: builds batches in Python from the surviving elements of `plan`.

    `elements` yields dicts with 'pos' in increasing order (failed ones dropped);
    `plan` yields per batch (positions [n], names [n]); rows without an element are
    filled by `on_bad(name)` -> row dict, or, where it returns None, by `_substitute`.
    """
    pending = next(elements, None)
    for positions, names in plan:
        rows = []
        for pos, name in zip(positions, names):
            if pending is not None and pending["pos"] == pos:
                rows.append(make_row(pending))
                pending = next(elements, None)
            else:
                rows.append(on_bad(name))
        rows = _substitute(rows, names)
        yield {key: _stack([row[key] for row in rows]) for key in rows[0]}


def _substitute(rows: list, names: Sequence[str]) -> list:
    """Each None row becomes the next good row of the batch, cyclically (a training row
    whose file failed: a real example in its place, never a blank one)."""
    good = [i for i, row in enumerate(rows) if row is not None]
    if len(good) == len(rows):
        return rows
    if not good:
        raise DataError(f"every file of a training batch failed to decode (first: {names[0]}); "
                        "skip_bad_files=True can only replace a bad row by a good one of the same batch")
    n = len(rows)
    return [row if row is not None else rows[min(good, key=lambda g: (g - i) % n)] for i, row in enumerate(rows)]


def _stack(values):
    if isinstance(values[0], tuple):
        return tuple(np.stack(group) for group in zip(*values))
    return np.stack(values)


# ---------------------------------------------------------------------------- train

def train_batches(spec: ImageNetSpec, *, seed: int, start_step: int, global_batch: int, process_index: int,
                  process_count: int, image_size: int = 224, transform: str = "paper",
                  scale_range=(256, 480), pca_std: float = 0.1, mean=MEAN_RGB, std=STD_RGB,
                  skip_bad_files: bool = False, threads: int | None = None) -> BatchIterator:
    """Infinite iterator of this process's rows of the global batch, steps start_step, ...

    Each item: {'image': float32 [global_batch // process_count, S, S, 3] normalised,
    'label': int32 [...]}. transform: 'paper' (He et al. Sec. 3.4: scale augmentation in
    `scale_range`, crop, flip, PCA lighting with `pca_std`) or 'inception' (random-resized
    crop + flip, torchvision/Flax/Goyal et al.). See the module docstring for determinism.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform: got {transform!r}, want one of {TRANSFORMS}")
    _check_process(process_index, process_count)
    _check_positive("global_batch", global_batch)
    if global_batch % process_count:
        raise ValueError(f"global_batch: got {global_batch}, want a multiple of process_count={process_count}")
    if transform == "paper" and not image_size <= scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range: got {scale_range}, want image_size={image_size} <= low <= high")
    if not isinstance(start_step, (int, np.integer)) or start_step < 0:
        raise ValueError(f"start_step: got {start_step!r}, want an integer >= 0")
    per = global_batch // process_count

    def image_fn(image_bytes, example_seed):
        from resnet_jax.data import image_transforms as T

        if transform == "paper":
            return T.train_paper(image_bytes, example_seed, image_size=image_size, scale_range=scale_range,
                                 pca_std=pca_std, mean=mean, std=std)
        return T.train_inception(image_bytes, example_seed, image_size=image_size, mean=mean, std=std)

    args = dict(seed=int(seed), start_step=int(start_step), global_batch=global_batch, per=per,
                process_index=process_index, process_count=process_count, image_fn=image_fn,
                image_size=image_size, skip_bad_files=skip_bad_files, threads=threads)
    if spec.source == "folder":
        return BatchIterator(lambda it: _folder_train(it, spec, **args))
    return BatchIterator(lambda it: _tfds_train(it, spec, **args))


def _step_plan(seed, step, global_batch, n, per, process_index, chunk):
    """(indices [chunk, per], positions [chunk, per]) of this process for steps step.. ."""
    rows = slice(process_index * per, (process_index + 1) * per)
    indices = train_indices(seed, step, chunk, global_batch, n)[:, rows]
    steps = np.arange(step, step + chunk, dtype=np.int64)[:, None]
    positions = steps * global_batch + np.arange(rows.start, rows.stop, dtype=np.int64)[None, :]
    return indices, positions


def _folder_train(it, spec, *, seed, start_step, global_batch, per, process_index, process_count, image_fn,
                  image_size, skip_bad_files, threads):
    import tensorflow as tf

    paths, labels = _folder_files(spec, "train")
    n = len(paths)
    if global_batch > n:
        raise ValueError(f"global_batch: got {global_batch}, larger than the {n} training images in {spec.data_dir}")
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

    signature = (tf.TensorSpec([per], tf.string), tf.TensorSpec([per], tf.int32), tf.TensorSpec([per], tf.int64))
    ds = tf.data.Dataset.from_generator(generator, output_signature=signature).unbatch()

    def load(path, label, pos):
        example_seed = tf.stack([tf.constant(seed, tf.int64), pos])
        return {"image": image_fn(tf.io.read_file(path), example_seed), "label": label, "pos": pos}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_bad_files:
        ds = ds.ignore_errors().prefetch(2 * per).with_options(_options(tf, threads))

        def plan():
            for _, indices, positions in plan_chunks():
                for idx, pos in zip(indices, positions):
                    yield pos, [paths[i] for i in idx]

        def on_bad(name):
            it._skipped(name)
            return None  # replaced by a good row of the same batch (_substitute)

        yield from _assemble(ds.as_numpy_iterator(), plan(),
                             lambda e: {"image": e["image"], "label": e["label"]}, on_bad)
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


def _tfds_train(it, spec, *, seed, start_step, global_batch, per, process_index, process_count, image_fn,
                image_size, skip_bad_files, threads):
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

    builder = _tfds_builder(spec)
    split = spec.train_split
    n = _tfds_count(builder, spec, split)
    steps_per_epoch = n // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global_batch: got {global_batch}, larger than the {n} examples of {spec.tfds_name}")
    share = tfds.even_splits(split, n=process_count)[process_index]
    epoch, position = divmod(start_step, steps_per_epoch)
    while True:
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        read_config = tfds.ReadConfig(shuffle_seed=epoch_seed, interleave_cycle_length=16)
        ds = builder.as_dataset(split=share, shuffle_files=True, read_config=read_config,
                                decoders={"image": tfds.decode.SkipDecoding()})
        ds = ds.shuffle(10_000, seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.take(steps_per_epoch * per).skip(position * per)
        first = epoch * steps_per_epoch + position
        offsets = tf.data.Dataset.range(position * per, steps_per_epoch * per)

        def load(example, k, epoch=epoch):
            step = epoch * steps_per_epoch + k // per
            pos = step * global_batch + process_index * per + k % per
            example_seed = tf.stack([tf.constant(seed, tf.int64), pos])
            return {"image": image_fn(example["image"], example_seed), "label": tf.cast(example["label"], tf.int32),
                    "pos": pos}

        ds = tf.data.Dataset.zip(ds, offsets).map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        steps = range(first, (epoch + 1) * steps_per_epoch)
        if skip_bad_files:
            ds = ds.ignore_errors().prefetch(2 * per).with_options(_options(tf, threads))

            def plan():
                for step in steps:
                    pos = step * global_batch + process_index * per + np.arange(per)
                    yield pos, [f"{spec.tfds_name}/{split} record at step {step}, row {r}" for r in range(per)]

            def on_bad(name):
                it._skipped(name)
                return None  # replaced by a good row of the same batch (_substitute)

            yield from _assemble(ds.as_numpy_iterator(), plan(),
                                 lambda e: {"image": e["image"], "label": e["label"]}, on_bad)
        else:
            ds = ds.batch(per, drop_remainder=True).map(lambda b: {"image": b["image"], "label": b["label"]})
            iterator = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf, threads)).as_numpy_iterator()
            for step in steps:
                try:
                    batch = next(iterator)
                except tf.errors.OpError as err:
                    raise DataError(f"tfds {spec.tfds_name}/{split} (data_dir {builder.data_dir}): a record of "
                                    f"training step {step} failed to decode: {_first_line(err)}; pass "
                                    "skip_bad_files=True to skip and count such records") from None
                yield batch
        epoch, position = epoch + 1, 0


# ---------------------------------------------------------------------------- eval

def _eval_fn(protocol, image_size, resize_size, scales, mean, std):
    def views(image_bytes):
        from resnet_jax.data import image_transforms as T

        if protocol == "center":
            return (T.eval_center(image_bytes, image_size=image_size, resize_size=resize_size, mean=mean, std=std),)
        if protocol == "ten_crop":
            return (T.eval_ten_crop(image_bytes, image_size=image_size, resize_size=resize_size, mean=mean, std=std),)
        return T.eval_multi_scale(image_bytes, scales=scales, mean=mean, std=std)

    return views


def eval_batches(spec: ImageNetSpec, *, protocol: str = "center", per_process_batch: int, process_index: int,
                 process_count: int, image_size: int = 224, resize_size: int = 256,
                 scales=(224, 256, 384, 480, 640), mean=MEAN_RGB, std=STD_RGB, skip_bad_files: bool = False,
                 threads: int | None = None) -> BatchIterator:
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
    _check_positive("per_process_batch", per_process_batch)
    views = _eval_fn(protocol, image_size, resize_size, tuple(scales), mean, std)
    args = dict(views=views, b=per_process_batch, process_index=process_index, process_count=process_count,
                skip_bad_files=skip_bad_files, threads=threads)
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
        return DataError(f"tfds {spec.tfds_name}/{share} (data_dir {builder.data_dir}): a record of eval batch {k} "
                         f"failed to decode: {_first_line(err)}; pass skip_bad_files=True to skip and count such records")

    yield from _run_eval(it, tf, ds, b, num_batches, names, skip_bad_files, on_error)
