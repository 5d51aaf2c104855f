"""CIFAR-10 and CIFAR-100 sources: the official binary version (directory, tar.gz, or
downloaded once into a cache) and tfds.

Owns reading CIFAR into host numpy arrays (`CifarData`), validating the files
on the way in, and carving the paper's held-out validation split out of the
training set. `load_cifar(name, ...)` is the entry point; `load_cifar10` is its
CIFAR-10 shorthand. Downloading lives in `download.py`. Augmentation lives in `augment.py`, batch index plans in
`batching.py`. TensorFlow is imported only inside the tfds source, so this module
works on machines without it.
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

BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
BATCHES_DIR = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
ENV_VAR = "CIFAR10_DIR"
SOURCES = ("auto", "binary", "tfds")

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (32, 32, 3)
RECORD_BYTES = 1 + 32 * 32 * 3  # label byte, then R, G, B planes (row-major 32x32)
RECORDS_PER_FILE = 10_000
NUM_TRAIN = len(TRAIN_FILES) * RECORDS_PER_FILE

# Digests of the files inside the official archive. Kept here rather than read
# from a SHA256SUMS shipped beside the data, because a sums file travelling with
# a bad copy cannot vouch for it, and the official archive carries none.
OFFICIAL_SHA256 = {
    "data_batch_1.bin": "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
    "data_batch_2.bin": "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
    "data_batch_3.bin": "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
    "data_batch_4.bin": "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
    "data_batch_5.bin": "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
    "test_batch.bin": "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
}

# The official archives: MD5 as the CIFAR home page publishes it, size and SHA256 as
# tensorflow-datasets registers them (its url_checksums/cifar10.txt, cifar100.txt).
CIFAR10_ARCHIVE = download.ArchiveSpec(
    name=ARCHIVE_NAME, url=BINARY_URL, size=170_052_171,
    md5="c32a1d4ab5d03f1284b67883e8d87530",
    sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    directory=BATCHES_DIR, files=(*TRAIN_FILES, TEST_FILE))

# CIFAR-100, binary version: one file per split; each record is a coarse label byte
# (20 superclasses), a fine label byte (100 classes), then the same 3072 pixel bytes.
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
CIFAR100_ARCHIVE_NAME = "cifar-100-binary.tar.gz"
CIFAR100_DIR = "cifar-100-binary"
CIFAR100_TRAIN, CIFAR100_TEST = "train.bin", "test.bin"
CIFAR100_ENV_VAR = "CIFAR100_DIR"
CIFAR100_RECORD_BYTES = 2 + 32 * 32 * 3
# Records per file; a module constant so tests can read small files in the same layout.
CIFAR100_COUNTS = {CIFAR100_TRAIN: 50_000, CIFAR100_TEST: 10_000}
CIFAR100_NUM_CLASSES = {"fine": 100, "coarse": 20}
LABEL_MODES = tuple(CIFAR100_NUM_CLASSES)
CIFAR100_ARCHIVE = download.ArchiveSpec(
    name=CIFAR100_ARCHIVE_NAME, url=CIFAR100_URL, size=168_513_733,
    md5="03b5dce01913d631647c71ecec9e9cb8",
    sha256="58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
    directory=CIFAR100_DIR, files=(CIFAR100_TRAIN, CIFAR100_TEST))
DATASETS = ("cifar10", "cifar100")

_GET_BINARY = (
    f"download the binary version from {BINARY_URL} and pass the archive, or the "
    f"{BATCHES_DIR}/ directory it unpacks to, as data_dir (or set {ENV_VAR})"
)
_GET_TFDS = (
    f"or prepare the tfds dataset offline from that archive with "
    f"resnet_jax.data.cifar.prepare_tfds(data_dir, archive) (what `tfds build cifar10` does, "
    "without the network; tfds accepts only the official archive, by its registered checksum)"
)
HOW_TO_GET = f"To get CIFAR-10: {_GET_BINARY}; {_GET_TFDS}."


@dataclasses.dataclass(frozen=True, eq=False)
class CifarData:
    """CIFAR-10 or CIFAR-100 in host memory, NHWC uint8 images and int32 labels.

    Labels are 0 <= label < num_classes = len(class_names). `test_*` is the official test set, or the held-out tail of the training set
    when loaded with `validation_size > 0` (then `source` says so).
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
                raise ValueError(f"{split}_labels: values outside 0..{len(self.class_names) - 1} "
                                 f"({len(self.class_names)} class_names)")

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
) -> CifarData:
    """Loads CIFAR-10 (`name='cifar10'`) or CIFAR-100 (`'cifar100'`).

    With neither data_dir nor $CIFAR10_DIR / $CIFAR100_DIR, the official binary
    archive is taken from the download cache (`download.cache_dir()`), downloaded
    there the first time (source 'auto' first looks for a prepared tfds dataset).
    `label_mode` picks CIFAR-100's 100 'fine' classes or its 20 'coarse' superclasses
    (CIFAR-10 has only 'fine'). Other arguments: see `load_cifar10`.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name: got {name!r}, allowed {', '.join(map(repr, DATASETS))}")
    if label_mode not in LABEL_MODES or (name == "cifar10" and label_mode != "fine"):
        allowed = "'fine'" if name == "cifar10" else ", ".join(map(repr, LABEL_MODES))
        raise ValueError(f"label_mode: got {label_mode!r}, allowed for {name}: {allowed}")
    if name == "cifar10":
        return load_cifar10(source, data_dir, validation_size, verify_checksums=verify_checksums)
    return load_cifar100(source, data_dir, validation_size, label_mode=label_mode)


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
    if source not in SOURCES:
        raise ValueError(f"source: got {source!r}, allowed {', '.join(map(repr, SOURCES))}")
    _check_validation_size(validation_size, NUM_TRAIN)
    if source == "binary":
        if data_dir is None and not os.environ.get(ENV_VAR):
            data = _load_binary(download.ensure_extracted(CIFAR10_ARCHIVE), verify_checksums)
        else:
            data = _load_binary(_resolve_binary(_binary_root(data_dir)), verify_checksums)
    elif source == "tfds":
        data = _load_tfds(data_dir)
    else:
        data = _load_auto(data_dir, verify_checksums)
    return hold_out_validation(data, validation_size)


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


# ---------------------------------------------------------------- auto


def _load_auto(data_dir: str | os.PathLike[str] | None, verify_checksums: bool) -> CifarData:
    given = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if given:
        origin = "data_dir" if data_dir is not None else f"${ENV_VAR}"
        if not Path(given).exists():
            raise DataError(f"{origin}={given}: no such file or directory. {HOW_TO_GET}")
        found = _find_binary(Path(given))
        if found is not None:
            return _load_binary(found, verify_checksums)
        # A data_dir that holds no binary files may be a tfds data dir.
        if data_dir is not None and _tfds_prepared(data_dir):
            return _load_tfds(data_dir)
        raise DataError(
            f"{origin}={given}: found neither the CIFAR-10 binary files ({TRAIN_FILES[0]}, ..., "
            f"{TEST_FILE}), a {BATCHES_DIR}/ directory, {ARCHIVE_NAME}, nor a prepared tfds "
            f"cifar10. {HOW_TO_GET}"
        )
    found = download.cached(CIFAR10_ARCHIVE)
    if found is not None:
        return _load_binary(found, verify_checksums)
    if _tfds_prepared(None):
        return _load_tfds(None)
    # Nothing local: the official archive, downloaded once into the cache.
    return _load_binary(download.ensure_extracted(CIFAR10_ARCHIVE), verify_checksums)


# ---------------------------------------------------------------- binary


def _binary_root(data_dir: str | os.PathLike[str] | None) -> Path:
    given = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if not given:
        raise DataError(
            f"source='binary' needs data_dir or ${ENV_VAR} (both unset). To get the files: {_GET_BINARY}."
        )
    return Path(given)


def _find_binary(path: Path) -> Path | None:
    """The batches directory or archive that `path` designates, if any."""
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    if any((path / name).exists() for name in (*TRAIN_FILES, TEST_FILE)):
        return path
    if (path / BATCHES_DIR).is_dir():
        return path / BATCHES_DIR
    if (path / ARCHIVE_NAME).is_file():
        return path / ARCHIVE_NAME
    return None


def _resolve_binary(path: Path) -> Path:
    found = _find_binary(path)
    if found is not None:
        return found
    if not path.exists():
        raise DataError(f"{path}: no such file or directory. To get CIFAR-10: {_GET_BINARY}.")
    raise DataError(
        f"{path}: holds none of {TRAIN_FILES[0]}..{TEST_FILE}, {BATCHES_DIR}/ or {ARCHIVE_NAME}. "
        f"To get CIFAR-10: {_GET_BINARY}."
    )


def _load_binary(location: Path, verify_checksums: bool) -> CifarData:
    if location.is_file():
        blobs, meta = _read_archive(location)
    else:
        blobs, meta = _read_directory(location)
    if verify_checksums:
        for label, (name, raw) in blobs.items():
            _verify_sha256(label, name, raw)
    parsed = {name: _parse_records(raw, label) for label, (name, raw) in blobs.items()}
    train = [parsed[name] for name in TRAIN_FILES]
    test_images, test_labels = parsed[TEST_FILE]
    return CifarData(
        train_images=_stack_contiguous([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=_stack_contiguous([test_images]),
        test_labels=test_labels,
        class_names=_class_names(meta),
        source=f"binary:{location}",
    )


def _stack_contiguous(parts: list[np.ndarray]) -> np.ndarray:
    # np.concatenate keeps the transposed (CHW) memory order of its inputs;
    # copying into a fresh NHWC buffer makes later per-pixel work cache-friendly.
    out = np.empty((sum(len(part) for part in parts), *IMAGE_SHAPE), dtype=np.uint8)
    np.concatenate(parts, out=out)
    return out


Blobs = dict[str, tuple[str, bytes]]  # error label -> (file name, contents)


def _read_directory(directory: Path) -> tuple[Blobs, tuple[str, str] | None]:
    blobs: Blobs = {}
    for name in (*TRAIN_FILES, TEST_FILE):
        path = directory / name
        if not path.is_file():
            raise DataError(f"{path}: missing (CIFAR-10 needs {', '.join(TRAIN_FILES)}, {TEST_FILE}). {HOW_TO_GET}")
        blobs[str(path)] = (name, path.read_bytes())
    meta_path = directory / META_FILE
    meta = (str(meta_path), meta_path.read_text()) if meta_path.is_file() else None
    return blobs, meta


def _read_archive(archive: Path) -> tuple[Blobs, tuple[str, str] | None]:
    wanted = {f"{BATCHES_DIR}/{name}": name for name in (*TRAIN_FILES, TEST_FILE, META_FILE)}
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
            f"{archive}: not a readable {ARCHIVE_NAME} ({type(err).__name__}: {err}); "
            f"the download may be truncated. {HOW_TO_GET}"
        ) from err
    blobs: Blobs = {}
    for name in (*TRAIN_FILES, TEST_FILE):
        if name not in contents:
            raise DataError(
                f"{archive}: member {BATCHES_DIR}/{name} missing; the archive is not the official "
                f"CIFAR-10 binary version. {HOW_TO_GET}"
            )
        blobs[f"{archive}:{BATCHES_DIR}/{name}"] = (name, contents[name])
    meta = None
    if META_FILE in contents:
        meta = (f"{archive}:{BATCHES_DIR}/{META_FILE}", contents[META_FILE].decode("utf-8"))
    return blobs, meta


def _verify_sha256(label: str, name: str, raw: bytes) -> None:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != OFFICIAL_SHA256[name]:
        raise DataError(
            f"{label}: sha256 {digest} differs from the official {OFFICIAL_SHA256[name]}; "
            f"the file is corrupt or not CIFAR-10. {HOW_TO_GET}"
        )


def _parse_records(raw: bytes, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Splits one batch file into NHWC uint8 images (a view) and int32 labels."""
    if len(raw) % RECORD_BYTES:
        raise DataError(
            f"{label}: {len(raw)} bytes is not a multiple of the {RECORD_BYTES}-byte record "
            f"(1 label byte + 3072 pixel bytes): the file is truncated or not CIFAR-10. {HOW_TO_GET}"
        )
    count = len(raw) // RECORD_BYTES
    if count != RECORDS_PER_FILE:
        raise DataError(
            f"{label}: {count} records, expected {RECORDS_PER_FILE} per file. {HOW_TO_GET}"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(count, RECORD_BYTES)
    labels = records[:, 0]
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        first = int(bad[0])
        raise DataError(
            f"{label}: record {first} (0-based, byte offset {first * RECORD_BYTES}) has label "
            f"byte {labels[first]}, allowed 0..{NUM_CLASSES - 1} ({bad.size} such records). {HOW_TO_GET}"
        )
    images = records[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int32)


def _class_names(meta: tuple[str, str] | None) -> tuple[str, ...]:
    if meta is None:
        return CLASS_NAMES
    label, text = meta
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != NUM_CLASSES:
        raise DataError(f"{label}: {len(names)} class names, expected {NUM_CLASSES} (one per line)")
    return names


# ---------------------------------------------------------------- tfds


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415  (TensorFlow stays optional)
    except ImportError as err:
        raise DataError(
            f"source='tfds' needs tensorflow and tensorflow-datasets ({err}). "
            f"Install them (pip install 'deep-residual-jax[tf]') or {_GET_BINARY}."
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


def _load_tfds(data_dir: str | os.PathLike[str] | None) -> CifarData:
    tfds = _import_tfds()
    builder = tfds.builder("cifar10", data_dir=_tfds_dir(data_dir))
    if not builder.is_prepared():
        # Never fall through to download_and_prepare: it would try the network.
        raise DataError(
            f"tfds cifar10 is not prepared in {builder.data_dir}. Offline: get the official "
            f"{ARCHIVE_NAME} ({BINARY_URL}) and run resnet_jax.data.cifar.prepare_tfds(data_dir, "
            f"archive); or use source='binary': {_GET_BINARY}."
        )
    train_images, train_labels = _tfds_split(tfds, builder, "train")
    test_images, test_labels = _tfds_split(tfds, builder, "test")
    return CifarData(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=tuple(builder.info.features["label"].names),
        source=f"tfds:{builder.data_dir}",
    )


def prepare_tfds(
    data_dir: str | os.PathLike[str] | None, archive: str | os.PathLike[str] | None = None
) -> None:
    """Prepares tfds cifar10 in `data_dir` from the official archive, never the network.

    `archive` is the official `cifar-10-binary.tar.gz` (default: tfds's manual dir
    `<data_dir>/downloads/manual/`). The `tfds build` command does the same but,
    in tfds 4.9.10, fails to start without apache_beam; and a missing archive would
    send it to the network.
    """
    tfds = _import_tfds()
    from tensorflow_datasets.core.download.download_manager import (  # noqa: PLC0415
        NonMatchingChecksumError,
    )

    builder = tfds.builder("cifar10", data_dir=_tfds_dir(data_dir))
    root = Path(builder.data_dir_root)
    path = Path(archive) if archive is not None else root / "downloads" / "manual" / ARCHIVE_NAME
    if path.name != ARCHIVE_NAME or not path.is_file():
        raise DataError(
            f"archive: {path} is not an existing file named {ARCHIVE_NAME} (the name tfds looks "
            f"for). Download it from {BINARY_URL}."
        )
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(path.parent), try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as err:
        raise DataError(
            f"{path}: tfds rejected the archive's checksum; it is not the official {ARCHIVE_NAME}. "
            f"Download it again from {BINARY_URL}, or use source='binary' with this archive."
        ) from err


def _tfds_split(tfds: Any, builder: Any, split: str, label_key: str = "label",
                num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    if label_key != "label":
        arrays = {**arrays, "label": arrays[label_key]}
    return _official_order(arrays, f"tfds {builder.name} {split} in {builder.data_dir}", num_classes)


def _official_order(arrays: Mapping[str, np.ndarray], label: str,
                    num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Restores the binary files' record order from tfds ids ('train_00042').

    tfds writes records in a hashed order; the stock builder numbers them by
    their position in the official files, so sorting the ids undoes the shuffle.
    """
    missing = [key for key in ("id", "image", "label") if key not in arrays]
    if missing:
        raise DataError(f"{label}: features {missing} missing; expected the stock cifar10 builder's id/image/label")
    order = np.argsort(np.asarray(arrays["id"]), kind="stable")
    images = np.ascontiguousarray(np.asarray(arrays["image"], dtype=np.uint8)[order])
    labels = np.asarray(arrays["label"])[order]
    _check_labels(labels, label, num_classes)
    return images, labels.astype(np.int32)


def _check_labels(labels: np.ndarray, label: str, num_classes: int = NUM_CLASSES) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{label}: record {int(bad[0])} has label {labels[bad[0]]}, allowed 0..{num_classes - 1}"
        )


# ---------------------------------------------------------------- CIFAR-100

_GET_CIFAR100 = (
    f"To get CIFAR-100: leave data_dir and ${CIFAR100_ENV_VAR} unset to download it into the cache "
    f"({download.CACHE_ENV}, default ~/.cache/resnet_jax), or download {CIFAR100_URL} yourself and "
    f"pass the archive, or the {CIFAR100_DIR}/ directory it unpacks to, as data_dir (or set ${CIFAR100_ENV_VAR})"
)


def load_cifar100(
    source: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    validation_size: int = 0,
    *,
    label_mode: str = "fine",
) -> CifarData:
    """Loads CIFAR-100 with its 100 fine labels, or its 20 coarse ones (`label_mode='coarse'`).

    Sources as for `load_cifar10`: 'binary' reads `train.bin` + `test.bin` from
    data_dir, $CIFAR100_DIR, or the download cache; 'tfds' a prepared tfds `cifar100`;
    'auto' the first of these that is there, downloading as the last resort.
    """
    if source not in SOURCES:
        raise ValueError(f"source: got {source!r}, allowed {', '.join(map(repr, SOURCES))}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode: got {label_mode!r}, allowed {', '.join(map(repr, LABEL_MODES))}")
    _check_validation_size(validation_size, CIFAR100_COUNTS[CIFAR100_TRAIN])
    given = data_dir if data_dir is not None else os.environ.get(CIFAR100_ENV_VAR)
    origin = "data_dir" if data_dir is not None else f"${CIFAR100_ENV_VAR}"
    if source == "tfds":
        data = _load_tfds100(data_dir, label_mode)
    elif given:
        found = _find_binary100(Path(given))
        if found is not None:
            data = _load_binary100(found, label_mode)
        elif source == "auto" and data_dir is not None and _tfds_prepared(data_dir, "cifar100"):
            data = _load_tfds100(data_dir, label_mode)
        else:
            what = "no such file or directory" if not Path(given).exists() else (
                f"holds neither {CIFAR100_TRAIN} + {CIFAR100_TEST}, a {CIFAR100_DIR}/ directory, nor "
                f"{CIFAR100_ARCHIVE_NAME}")
            raise DataError(f"{origin}={given}: {what}. {_GET_CIFAR100}.")
    elif source == "auto" and download.cached(CIFAR100_ARCHIVE) is None and _tfds_prepared(None, "cifar100"):
        data = _load_tfds100(None, label_mode)
    else:
        data = _load_binary100(download.ensure_extracted(CIFAR100_ARCHIVE), label_mode)
    return hold_out_validation(data, validation_size)


def _find_binary100(path: Path) -> Path | None:
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    for candidate in (path, path / CIFAR100_DIR):
        if (candidate / CIFAR100_TRAIN).exists() or (candidate / CIFAR100_TEST).exists():
            return candidate
    if (path / CIFAR100_ARCHIVE_NAME).is_file():
        return path / CIFAR100_ARCHIVE_NAME
    return None


_CIFAR100_NAME_FILES = {"fine": "fine_label_names.txt", "coarse": "coarse_label_names.txt"}


def _load_binary100(location: Path, label_mode: str) -> CifarData:
    names_file = _CIFAR100_NAME_FILES[label_mode]
    wanted = (CIFAR100_TRAIN, CIFAR100_TEST, names_file)
    if location.is_file():
        contents = _read_archive_members(location, CIFAR100_DIR, wanted, CIFAR100_ARCHIVE_NAME)
        where = {name: f"{location}:{CIFAR100_DIR}/{name}" for name in wanted}
    else:
        contents = {name: (location / name).read_bytes() for name in wanted if (location / name).is_file()}
        where = {name: str(location / name) for name in wanted}
    for name in (CIFAR100_TRAIN, CIFAR100_TEST):
        if name not in contents:
            raise DataError(f"{where[name]}: missing (CIFAR-100 needs {CIFAR100_TRAIN}, {CIFAR100_TEST}). "
                            f"{_GET_CIFAR100}.")
    num_classes = CIFAR100_NUM_CLASSES[label_mode]
    train_images, train_labels = _parse_records100(contents[CIFAR100_TRAIN], where[CIFAR100_TRAIN],
                                                   CIFAR100_COUNTS[CIFAR100_TRAIN], label_mode)
    test_images, test_labels = _parse_records100(contents[CIFAR100_TEST], where[CIFAR100_TEST],
                                                 CIFAR100_COUNTS[CIFAR100_TEST], label_mode)
    if names_file in contents:
        class_names = tuple(line.strip() for line in contents[names_file].decode("utf-8").splitlines()
                            if line.strip())
        if len(class_names) != num_classes:
            raise DataError(f"{where[names_file]}: {len(class_names)} class names, expected {num_classes} "
                            "(one per line)")
    else:  # the names are a convenience; the labels alone define the task
        class_names = tuple(f"class_{i}" for i in range(num_classes))
    return CifarData(
        train_images=_stack_contiguous([train_images]), train_labels=train_labels,
        test_images=_stack_contiguous([test_images]), test_labels=test_labels,
        class_names=class_names, source=f"binary:{location} ({label_mode} labels)",
    )


def _read_archive_members(archive: Path, directory: str, names: tuple[str, ...],
                          archive_name: str) -> dict[str, bytes]:
    wanted = {f"{directory}/{name}": name for name in names}
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                if member.isfile() and member.name in wanted:
                    contents[wanted[member.name]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataError(f"{archive}: not a readable {archive_name} ({type(err).__name__}: {err}); "
                        "the download may be truncated") from err
    return contents


def _parse_records100(raw: bytes, label: str, expected: int, label_mode: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-100 file: [coarse byte, fine byte, R plane, G plane, B plane] per record."""
    if len(raw) % CIFAR100_RECORD_BYTES:
        raise DataError(
            f"{label}: {len(raw)} bytes is not a multiple of the {CIFAR100_RECORD_BYTES}-byte record "
            f"(coarse + fine label bytes + 3072 pixel bytes): truncated or not CIFAR-100. {_GET_CIFAR100}.")
    count = len(raw) // CIFAR100_RECORD_BYTES
    if count != expected:
        raise DataError(f"{label}: {count} records, expected {expected}. {_GET_CIFAR100}.")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(count, CIFAR100_RECORD_BYTES)
    for column, mode in ((0, "coarse"), (1, "fine")):
        limit = CIFAR100_NUM_CLASSES[mode]
        bad = np.flatnonzero(records[:, column] >= limit)
        if bad.size:
            first = int(bad[0])
            raise DataError(f"{label}: record {first} (0-based) has {mode} label byte {records[first, column]}, "
                            f"allowed 0..{limit - 1} ({bad.size} such records). {_GET_CIFAR100}.")
    labels = records[:, 0 if label_mode == "coarse" else 1].astype(np.int32)
    images = records[:, 2:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _load_tfds100(data_dir: str | os.PathLike[str] | None, label_mode: str) -> CifarData:
    tfds = _import_tfds()
    builder = tfds.builder("cifar100", data_dir=_tfds_dir(data_dir))
    if not builder.is_prepared():
        raise DataError(f"tfds cifar100 is not prepared in {builder.data_dir}. {_GET_CIFAR100}.")
    key = "label" if label_mode == "fine" else "coarse_label"
    num_classes = CIFAR100_NUM_CLASSES[label_mode]
    train_images, train_labels = _tfds_split(tfds, builder, "train", key, num_classes)
    test_images, test_labels = _tfds_split(tfds, builder, "test", key, num_classes)
    return CifarData(train_images=train_images, train_labels=train_labels, test_images=test_images,
                     test_labels=test_labels, class_names=tuple(builder.info.features[key].names),
                     source=f"tfds:{builder.data_dir} ({label_mode} labels)")
