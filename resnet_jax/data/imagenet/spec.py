"""Where ImageNet comes from: `ImageNetSpec`, the image-folder listing, labels and tfds access.

Owns everything about a source that needs no decoding: which files or tfds splits exist,
how many examples each holds, the class names in label order, and the argument checks
the pipelines share. TensorFlow and tfds are imported inside functions only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from resnet_jax.data import DataError
from resnet_jax.data.batching import check_positive

SOURCES = ("tfds", "folder")
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
        files = sorted(
            e.name
            for e in os.scandir(Path(directory) / name)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        paths.extend(os.path.join(directory, name, f) for f in files)
        labels.extend([index[name]] * len(files))
    return tuple(paths), np.asarray(labels, dtype=np.int32)


def _folder_files(spec: ImageNetSpec, split: str) -> tuple[tuple[str, ...], np.ndarray]:
    directory = _folder_dir(spec, split)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory; {_FOLDER_HOW}")
    paths, labels = _list_folder(str(directory), str(Path(spec.data_dir)))
    if not paths:
        raise DataError(
            f"{directory}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders; {_FOLDER_HOW}"
        )
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
            + (
                _TFDS_HOW
                if spec.tfds_name == "imagenet2012"
                else f"prepare it with `tfds build {spec.tfds_name}`"
            )
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


# ---------------------------------------------------------------------------- shared by the pipelines


def _check_process(process_index, process_count):
    check_positive("process_count", process_count)
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index: got {process_index!r}, want 0 <= index < process_count={process_count}"
        )


def _options(tf, threads):
    # Deterministic: the same elements in the same order whatever the thread timing (exact resume).
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = int(threads)
    return options
