"""CIFAR-10 and CIFAR-100 sources: the official binary version (directory, tar.gz, or
downloaded once into a cache) and tfds.

Owns reading CIFAR into host numpy arrays (`CifarData`), validating the files on the way
in, and carving the paper's held-out validation split out of the training set. The two
datasets differ only in data: a `Layout` each (`CIFAR10`, `CIFAR100`: label bytes per
record, file names, archive, class counts), read by one reader. `load_cifar(name, ...)` is
the entry point; `load_cifar10` / `load_cifar100` are its shorthands. Downloading lives in
`download.py`, augmentation in `augment.py`, batch index plans in `batching.py`.
TensorFlow is imported only inside the tfds source, so this module works without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.data import DataError, download

IMAGE_SHAPE = (32, 32, 3)
PIXEL_BYTES = 32 * 32 * 3  # R, G, B planes, each row-major 32x32, after the label bytes
SOURCES = ("auto", "binary", "tfds")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One CIFAR variant's binary version: record layout, files, archive and classes.

    A record is `len(label_columns)` label bytes, then PIXEL_BYTES pixel bytes; the label
    a load uses is the byte `label_columns[label_mode]`, every label byte is checked.
    """

    name: str  # the dataset name in configs, and the tfds builder's name
    title: str  # how messages name it
    label_columns: Mapping[str, int]  # label mode -> its byte in the record; first mode is the default
    num_classes: Mapping[str, int]  # label mode -> classes
    train_files: tuple[str, ...]
    test_file: str
    records: Mapping[str, int]  # records per file
    names_files: Mapping[str, str]  # label mode -> file of class names, one a line (optional)
    default_names: Mapping[str, tuple[str, ...]]  # label mode -> names used without that file
    archive: download.ArchiveSpec  # URL, size, MD5, SHA256; unpacks to archive.directory
    env_var: str  # names a local copy (directory or archive)
    file_sha256: Mapping[str, str]  # official digests of the record files, where known
    tfds_label_keys: Mapping[str, str]  # label mode -> the tfds feature holding it

    def __post_init__(self) -> None:
        modes = set(self.label_columns)
        for field in ("num_classes", "names_files", "tfds_label_keys"):
            if set(getattr(self, field)) != modes:
                raise ValueError(
                    f"Layout {self.name}.{field}: keys {sorted(getattr(self, field))}, "
                    f"want the label modes {sorted(modes)}"
                )
        if sorted(self.label_columns.values()) != list(range(len(modes))):
            raise ValueError(
                f"Layout {self.name}.label_columns: {dict(self.label_columns)}, "
                f"want bytes 0..{len(modes) - 1}"
            )
        if set(self.records) != set(self.files) or tuple(self.archive.files) != self.files:
            raise ValueError(f"Layout {self.name}: records and archive.files must name exactly {self.files}")

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file)

    @property
    def directory(self) -> str:
        return self.archive.directory

    @property
    def label_bytes(self) -> int:
        return len(self.label_columns)

    @property
    def record_bytes(self) -> int:
        return self.label_bytes + PIXEL_BYTES

    @property
    def num_train(self) -> int:
        return sum(self.records[name] for name in self.train_files)

    @property
    def label_modes(self) -> tuple[str, ...]:
        return tuple(self.label_columns)

    def how_to_get(self) -> str:
        return (
            f"To get {self.title}: leave data_dir and ${self.env_var} unset to download it into the cache "
            f"(${download.CACHE_ENV}, default ~/.cache/resnet_jax), or download {self.archive.url} yourself "
            f"and pass the archive, or the {self.directory}/ directory it unpacks to, as data_dir (or set "
            f"${self.env_var}); or prepare the tfds dataset offline from that archive with "
            f"resnet_jax.data.cifar.prepare_tfds(data_dir, archive, name={self.name!r}) (what `tfds build "
            f"{self.name}` does, without the network; tfds accepts only the official archive, by its "
            "registered checksum)."
        )


_CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))

CIFAR10 = Layout(
    name="cifar10",
    title="CIFAR-10",
    label_columns={"fine": 0},
    num_classes={"fine": 10},
    train_files=_CIFAR10_TRAIN,
    test_file="test_batch.bin",
    records={name: 10_000 for name in (*_CIFAR10_TRAIN, "test_batch.bin")},
    names_files={"fine": "batches.meta.txt"},
    default_names={
        "fine": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    },
    # The official archives: MD5 as the CIFAR home page publishes it, size and SHA256 as
    # tensorflow-datasets registers them (its url_checksums/cifar10.txt, cifar100.txt).
    archive=download.ArchiveSpec(
        name="cifar-10-binary.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        size=170_052_171,
        md5="c32a1d4ab5d03f1284b67883e8d87530",
        sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        directory="cifar-10-batches-bin",
        files=(*_CIFAR10_TRAIN, "test_batch.bin"),
    ),
    env_var="CIFAR10_DIR",
    # Digests of the files inside the official archive. Kept here rather than read from a
    # SHA256SUMS shipped beside the data, because a sums file travelling with a bad copy
    # cannot vouch for it, and the official archive carries none.
    file_sha256={
        "data_batch_1.bin": "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
        "data_batch_2.bin": "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
        "data_batch_3.bin": "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
        "data_batch_4.bin": "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
        "data_batch_5.bin": "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
        "test_batch.bin": "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
    },
    tfds_label_keys={"fine": "label"},
)

# CIFAR-100: one file per split; a record is a coarse label byte (20 superclasses), a fine
# label byte (100 classes), then the same pixel bytes. No official per-file digests are
# known (tfds registers only the archive's), so verify_checksums has none to check; the
# download checks the archive's MD5 and SHA256 as for CIFAR-10.
CIFAR100 = Layout(
    name="cifar100",
    title="CIFAR-100",
    label_columns={"fine": 1, "coarse": 0},
    num_classes={"fine": 100, "coarse": 20},
    train_files=("train.bin",),
    test_file="test.bin",
    records={"train.bin": 50_000, "test.bin": 10_000},
    names_files={"fine": "fine_label_names.txt", "coarse": "coarse_label_names.txt"},
    default_names={},  # the names are a convenience; the labels alone define the task
    archive=download.ArchiveSpec(
        name="cifar-100-binary.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        size=168_513_733,
        md5="03b5dce01913d631647c71ecec9e9cb8",
        sha256="58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
        directory="cifar-100-binary",
        files=("train.bin", "test.bin"),
    ),
    env_var="CIFAR100_DIR",
    file_sha256={},
    tfds_label_keys={"fine": "label", "coarse": "coarse_label"},
)
LAYOUTS = {layout.name: layout for layout in (CIFAR10, CIFAR100)}
DATASETS = tuple(LAYOUTS)

# The tables' entries under the short names the tests use.
CIFAR10_ARCHIVE = CIFAR10.archive
ARCHIVE_NAME = CIFAR10.archive.name
BATCHES_DIR = CIFAR10.directory
TEST_FILE = CIFAR10.test_file
META_FILE = CIFAR10.names_files["fine"]
ENV_VAR = CIFAR10.env_var
RECORD_BYTES = CIFAR10.record_bytes
CIFAR100_ARCHIVE = CIFAR100.archive
CIFAR100_ARCHIVE_NAME = CIFAR100.archive.name
CIFAR100_DIR = CIFAR100.directory
CIFAR100_TRAIN, CIFAR100_TEST = (*CIFAR100.train_files, CIFAR100.test_file)
CIFAR100_ENV_VAR = CIFAR100.env_var


@dataclasses.dataclass(frozen=True, eq=False)
class CifarData:
    """CIFAR-10 or CIFAR-100 in host memory, NHWC uint8 images and int32 labels.

    Labels are 0 <= label < num_classes = len(class_names). `test_*` is the official test set,
    or the held-out tail of the training set when loaded with `validation_size > 0` (then
    `source` says so).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
                raise ValueError(
                    f"{split}_images: got {images.dtype}{list(images.shape)}, "
                    f"want uint8[N,{','.join(map(str, IMAGE_SHAPE))}]"
                )
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels: got {labels.dtype}{list(labels.shape)}, "
                    f"want int32[{images.shape[0]}] to match {split}_images"
                )
            if labels.size and not 0 <= labels.min() <= labels.max() < len(self.class_names):
                raise ValueError(
                    f"{split}_labels: values outside 0..{len(self.class_names) - 1} "
                    f"({len(self.class_names)} class_names)"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_cifar(
    name: str,
    source: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    validation_size: int = 0,
    *,
    label_mode: str = "fine",
    verify_checksums: bool = False,
    test_only: bool = False,
) -> CifarData:
    """Loads CIFAR-10 (`name='cifar10'`) or CIFAR-100 (`'cifar100'`).

    With neither data_dir nor $CIFAR10_DIR / $CIFAR100_DIR, the official binary
    archive is taken from the download cache (`download.cache_dir()`), downloaded
    there the first time (source 'auto' first looks for a prepared tfds dataset).
    `label_mode` picks CIFAR-100's 100 'fine' classes or its 20 'coarse' superclasses
    (CIFAR-10 has only 'fine'). `test_only`: the binary source reads only the test file (an
    evaluation with a stored normalisation needs no training files); the train arrays are
    then empty. Other arguments: see `load_cifar10`.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name: got {name!r}, allowed {', '.join(map(repr, DATASETS))}")
    layout = CIFAR10 if name == CIFAR10.name else CIFAR100  # read at call time: tests replace them
    if label_mode not in layout.label_modes:
        raise ValueError(
            f"label_mode: got {label_mode!r}, allowed for {name}: {', '.join(map(repr, layout.label_modes))}"
        )
    if test_only and validation_size:
        raise ValueError(
            f"test_only with validation_size = {validation_size}: the validation split is part of "
            "the training files; allowed: validation_size 0"
        )
    return _load(layout, source, data_dir, validation_size, label_mode, verify_checksums, test_only)


def load_cifar10(
    source: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    validation_size: int = 0,
    *,
    verify_checksums: bool = False,
) -> CifarData:
    """Loads CIFAR-10 from the official binary files or from tfds.

    Args:
      source: 'binary' reads `data_batch_{1..5}.bin` + `test_batch.bin` from a
        directory, a directory holding `cifar-10-batches-bin/`, or the
        `cifar-10-binary.tar.gz` archive (read in memory, never extracted); with
        neither data_dir nor $CIFAR10_DIR, from the download cache (downloaded
        and verified the first time, see `download.py`).
        'tfds' reads a prepared tensorflow_datasets `cifar10` (data_dir is then the
        tfds data dir). 'auto' takes the binary files when data_dir or $CIFAR10_DIR
        locates them, else a prepared tfds dataset (data_dir or the tfds default),
        else the download cache.
      data_dir: where to look; for 'binary' defaults to $CIFAR10_DIR.
      validation_size: 0 keeps the 50k/10k train/test split; k > 0 moves the last
        k training images into `test_*` (the papers' 45k/5k split with k=5000).
      verify_checksums: hash the binary files against the official digests
        (~0.5 s). tfds verifies its archive itself when preparing, so the flag
        has nothing left to check there.

    Both sources give identical arrays in the official record order.
    """
    return _load(CIFAR10, source, data_dir, validation_size, "fine", verify_checksums)


def load_cifar100(
    source: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    validation_size: int = 0,
    *,
    label_mode: str = "fine",
    verify_checksums: bool = False,
) -> CifarData:
    """Loads CIFAR-100 with its 100 fine labels, or its 20 coarse ones (`label_mode='coarse'`).

    Sources as for `load_cifar10`: 'binary' reads `train.bin` + `test.bin` from
    data_dir, $CIFAR100_DIR, or the download cache; 'tfds' a prepared tfds `cifar100`;
    'auto' the first of these that is there, downloading as the last resort.
    """
    return _load(CIFAR100, source, data_dir, validation_size, label_mode, verify_checksums)


def hold_out_validation(data: CifarData, validation_size: int) -> CifarData:
    """Moves the last `validation_size` training examples into `test_*`."""
    _check_validation_size(validation_size, len(data.train_labels))
    if validation_size == 0:
        return data
    cut = len(data.train_labels) - validation_size
    return dataclasses.replace(
        data,
        train_images=data.train_images[:cut],
        train_labels=data.train_labels[:cut],
        test_images=data.train_images[cut:],
        test_labels=data.train_labels[cut:],
        source=f"{data.source} [train: first {cut} training images; "
        f"test: validation split = last {validation_size} training images]",
    )


def _check_validation_size(validation_size: int, num_train: int) -> None:
    if not isinstance(validation_size, (int, np.integer)) or not 0 <= validation_size < num_train:
        raise ValueError(
            f"validation_size: got {validation_size!r}, allowed integers 0 <= k < {num_train} "
            "(0 = official test set, 5000 = the papers' 45k/5k split)"
        )


def _load(
    layout: Layout,
    source: str,
    data_dir: str | os.PathLike[str] | None,
    validation_size: int,
    label_mode: str,
    verify_checksums: bool,
    test_only: bool = False,
) -> CifarData:
    """The one way in: the source that `source`, data_dir and the environment designate."""
    if source not in SOURCES:
        raise ValueError(f"source: got {source!r}, allowed {', '.join(map(repr, SOURCES))}")
    if label_mode not in layout.label_modes:
        raise ValueError(
            f"label_mode: got {label_mode!r}, allowed {', '.join(map(repr, layout.label_modes))}"
        )
    _check_validation_size(validation_size, layout.num_train)
    data = _locate_and_load(layout, source, data_dir, label_mode, verify_checksums, test_only)
    return data if test_only else hold_out_validation(data, validation_size)  # test_only: size 0


def _locate_and_load(
    layout: Layout,
    source: str,
    data_dir: str | os.PathLike[str] | None,
    label_mode: str,
    verify_checksums: bool,
    test_only: bool = False,
) -> CifarData:
    if source == "tfds":
        return _load_tfds(layout, data_dir, label_mode)
    given = data_dir if data_dir is not None else os.environ.get(layout.env_var)
    if given:
        origin = "data_dir" if data_dir is not None else f"${layout.env_var}"
        if not Path(given).exists():
            raise DataError(f"{origin}={given}: no such file or directory. {layout.how_to_get()}")
        found = _find_binary(layout, Path(given))
        if found is not None:
            return _load_binary(layout, found, label_mode, verify_checksums, test_only)
        # A data_dir that holds no binary files may be a tfds data dir.
        if source == "auto" and data_dir is not None and _tfds_prepared(data_dir, layout.name):
            return _load_tfds(layout, data_dir, label_mode)
        files = f"{layout.train_files[0]}..{layout.test_file}"
        if source == "auto":
            what = (
                f"found neither the {layout.title} binary files ({files}), a {layout.directory}/ directory, "
                f"{layout.archive.name}, nor a prepared tfds {layout.name}"
            )
        else:
            what = f"holds none of {files}, {layout.directory}/ or {layout.archive.name}"
        raise DataError(f"{origin}={given}: {what}. {layout.how_to_get()}")
    # Nothing named: the download cache, else (auto) a prepared tfds dataset, else the
    # official archive, downloaded once into the cache.
    if source == "auto" and download.cached(layout.archive) is None and _tfds_prepared(None, layout.name):
        return _load_tfds(layout, None, label_mode)
    return _load_binary(
        layout, download.ensure_extracted(layout.archive), label_mode, verify_checksums, test_only
    )


# ---------------------------------------------------------------- binary


def _find_binary(layout: Layout, path: Path) -> Path | None:
    """The batches directory or archive that `path` designates, if any."""
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    if any((path / name).exists() for name in layout.files):
        return path
    if (path / layout.directory).is_dir():
        return path / layout.directory
    if (path / layout.archive.name).is_file():
        return path / layout.archive.name
    return None


def _load_binary(
    layout: Layout, location: Path, label_mode: str, verify_checksums: bool, test_only: bool = False
) -> CifarData:
    names_file = layout.names_files[label_mode]
    files = (layout.test_file,) if test_only else layout.files
    if location.is_file():
        contents = _read_archive(layout, location, (*files, names_file))
        where = {name: f"{location}:{layout.directory}/{name}" for name in (*files, names_file)}
        for name in files:
            if name not in contents:
                raise DataError(
                    f"{location}: member {layout.directory}/{name} missing; the archive is not the "
                    f"official {layout.title} binary version. {layout.how_to_get()}"
                )
    else:
        contents, where = {}, {}
        for name in (*files, names_file):
            path = location / name
            where[name] = str(path)
            if path.is_file():
                contents[name] = path.read_bytes()
            elif name != names_file:
                raise DataError(
                    f"{path}: missing ({layout.title} needs {', '.join(files)}). {layout.how_to_get()}"
                )
    if verify_checksums:
        for name in files:
            if name in layout.file_sha256:
                _verify_sha256(layout, where[name], contents[name], layout.file_sha256[name])
    parsed = {
        name: _parse_records(layout, contents[name], where[name], layout.records[name], label_mode)
        for name in files
    }
    test_images, test_labels = parsed[layout.test_file]
    train_files = () if test_only else layout.train_files
    source = f"binary:{location}" + (f" ({label_mode} labels)" if len(layout.label_modes) > 1 else "")
    return CifarData(
        train_images=_stack_contiguous([parsed[name][0] for name in train_files]),
        train_labels=np.concatenate([parsed[name][1] for name in train_files] or [np.zeros(0, np.int32)]),
        test_images=_stack_contiguous([test_images]),
        test_labels=test_labels,
        class_names=_class_names(layout, label_mode, contents.get(names_file), where[names_file]),
        source=source,
    )


def _stack_contiguous(parts: list[np.ndarray]) -> np.ndarray:
    # np.concatenate keeps the transposed (CHW) memory order of its inputs;
    # copying into a fresh NHWC buffer makes later per-pixel work cache-friendly.
    out = np.empty((sum(len(part) for part in parts), *IMAGE_SHAPE), dtype=np.uint8)
    if parts:  # none: a test-only load's empty training set
        np.concatenate(parts, out=out)
    return out


def _read_archive(layout: Layout, archive: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    wanted = {f"{layout.directory}/{name}": name for name in names}
    contents: dict[str, bytes] = {}
    try:
        # Streaming mode reads the gzip once front to back; random member access
        # would restart decompression for each file.
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                if member.isfile() and member.name in wanted:
                    contents[wanted[member.name]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"{archive}: not a readable {layout.archive.name} ({type(err).__name__}: {err}); "
            f"the download may be truncated. {layout.how_to_get()}"
        ) from err
    return contents


def _verify_sha256(layout: Layout, label: str, raw: bytes, expected: str) -> None:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected:
        raise DataError(
            f"{label}: sha256 {digest} differs from the official {expected}; "
            f"the file is corrupt or not {layout.title}. {layout.how_to_get()}"
        )


def _parse_records(
    layout: Layout, raw: bytes, label: str, expected: int, label_mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Splits one record file into NHWC uint8 images (a view) and int32 labels."""
    size = layout.record_bytes
    if len(raw) % size:
        modes = " + ".join(sorted(layout.label_columns, key=layout.label_columns.get))
        what = "1 label byte" if layout.label_bytes == 1 else f"{modes} label bytes"
        raise DataError(
            f"{label}: {len(raw)} bytes is not a multiple of the {size}-byte record ({what} + "
            f"{PIXEL_BYTES} pixel bytes): the file is truncated or not {layout.title}. {layout.how_to_get()}"
        )
    count = len(raw) // size
    if count != expected:
        raise DataError(f"{label}: {count} records, expected {expected}. {layout.how_to_get()}")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(count, size)
    for mode, column in sorted(layout.label_columns.items(), key=lambda item: item[1]):
        limit = layout.num_classes[mode]
        bad = np.flatnonzero(records[:, column] >= limit)
        if bad.size:
            first = int(bad[0])
            which = "label byte" if layout.label_bytes == 1 else f"{mode} label byte"
            raise DataError(
                f"{label}: record {first} (0-based, byte offset {first * size}) has {which} "
                f"{records[first, column]}, allowed 0..{limit - 1} ({bad.size} such records). "
                f"{layout.how_to_get()}"
            )
    labels = records[:, layout.label_columns[label_mode]].astype(np.int32)
    images = records[:, layout.label_bytes :].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _class_names(layout: Layout, label_mode: str, raw: bytes | None, label: str) -> tuple[str, ...]:
    num_classes = layout.num_classes[label_mode]
    if raw is None:
        return layout.default_names.get(label_mode, tuple(f"class_{i}" for i in range(num_classes)))
    names = tuple(line.strip() for line in raw.decode("utf-8").splitlines() if line.strip())
    if len(names) != num_classes:
        raise DataError(f"{label}: {len(names)} class names, expected {num_classes} (one per line)")
    return names


# ---------------------------------------------------------------- tfds


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds  # TensorFlow stays optional
    except ImportError as err:
        raise DataError(
            f"source='tfds' needs tensorflow and tensorflow-datasets ({err}). Install them "
            "(pip install 'deep-residual-jax[tf]') or use source='binary' with the official archive."
        ) from err
    return tfds


def _tfds_prepared(data_dir: str | os.PathLike[str] | None, builder_name: str = "cifar10") -> bool:
    try:
        tfds = _import_tfds()
    except DataError:
        return False
    # A probe: tfds warns about each dataset folder it finds empty ("Variant folder ... has no
    # dataset_info.json"), which on a fresh machine came before the project's own error line.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return tfds.builder(builder_name, data_dir=_tfds_dir(data_dir)).is_prepared()
    finally:
        absl_logger.setLevel(level)


def _tfds_dir(data_dir: str | os.PathLike[str] | None) -> str | None:
    return None if data_dir is None else os.fspath(data_dir)


def _load_tfds(layout: Layout, data_dir: str | os.PathLike[str] | None, label_mode: str) -> CifarData:
    tfds = _import_tfds()
    builder = tfds.builder(layout.name, data_dir=_tfds_dir(data_dir))
    if not builder.is_prepared():
        # Never fall through to download_and_prepare: it would try the network.
        raise DataError(f"tfds {layout.name} is not prepared in {builder.data_dir}. {layout.how_to_get()}")
    key = layout.tfds_label_keys[label_mode]
    num_classes = layout.num_classes[label_mode]
    train_images, train_labels = _tfds_split(tfds, builder, "train", key, num_classes)
    test_images, test_labels = _tfds_split(tfds, builder, "test", key, num_classes)
    return CifarData(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=tuple(builder.info.features[key].names),
        source=f"tfds:{builder.data_dir}"
        + (f" ({label_mode} labels)" if len(layout.label_modes) > 1 else ""),
    )


def prepare_tfds(
    data_dir: str | os.PathLike[str] | None,
    archive: str | os.PathLike[str] | None = None,
    *,
    name: str = "cifar10",
) -> None:
    """Prepares tfds `name` (cifar10, cifar100) in `data_dir` from the official archive, never the network.

    `archive` is the official `cifar-10-binary.tar.gz` / `cifar-100-binary.tar.gz` (default:
    tfds's manual dir `<data_dir>/downloads/manual/`). The `tfds build` command does the
    same but, in tfds 4.9.10, fails to start without apache_beam; and a missing archive
    would send it to the network.
    """
    if name not in DATASETS:
        raise ValueError(f"name: got {name!r}, allowed {', '.join(map(repr, DATASETS))}")
    spec = (CIFAR10 if name == CIFAR10.name else CIFAR100).archive
    tfds = _import_tfds()
    from tensorflow_datasets.core.download.download_manager import (
        NonMatchingChecksumError,
    )

    builder = tfds.builder(name, data_dir=_tfds_dir(data_dir))
    root = Path(builder.data_dir_root)
    path = Path(archive) if archive is not None else root / "downloads" / "manual" / spec.name
    if path.name != spec.name or not path.is_file():
        raise DataError(
            f"archive: {path} is not an existing file named {spec.name} (the name tfds looks "
            f"for). Download it from {spec.url}."
        )
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(path.parent), try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as err:
        raise DataError(
            f"{path}: tfds rejected the archive's checksum; it is not the official {spec.name}. "
            f"Download it again from {spec.url}, or use source='binary' with this archive."
        ) from err


def _tfds_split(
    tfds: Any, builder: Any, split: str, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    if label_key != "label":
        arrays = {**arrays, "label": arrays[label_key]}
    return _official_order(arrays, f"tfds {builder.name} {split} in {builder.data_dir}", num_classes)


def _official_order(
    arrays: Mapping[str, np.ndarray], label: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Restores the binary files' record order from tfds ids ('train_00042').

    tfds writes records in a hashed order; the stock builder numbers them by
    their position in the official files, so sorting the ids undoes the shuffle.
    """
    missing = [key for key in ("id", "image", "label") if key not in arrays]
    if missing:
        raise DataError(f"{label}: features {missing} missing; expected the stock builder's id/image/label")
    order = np.argsort(np.asarray(arrays["id"]), kind="stable")
    images = np.ascontiguousarray(np.asarray(arrays["image"], dtype=np.uint8)[order])
    labels = np.asarray(arrays["label"])[order]
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{label}: record {int(bad[0])} has label {labels[bad[0]]}, allowed 0..{num_classes - 1}"
        )
    return images, labels.astype(np.int32)
