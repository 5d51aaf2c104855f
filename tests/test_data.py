"""Tests for resnet_jax.data: CIFAR-10 sources, augmentation and batch plans.

Real CIFAR-10 from ../shared/datasets (read-only: every corrupted variant is
built in tmp_path, with symlinks to the untouched files).
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.data import DataError, augment, batching, cifar
from resnet_jax.data.cifar import CifarData, load_cifar10

ALL_FILES = (*cifar.CIFAR10.files, cifar.META_FILE)
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


@pytest.fixture(scope="module")
def data(cifar_dir: Path) -> CifarData:
    return load_cifar10("binary", cifar_dir)


@pytest.fixture(scope="module")
def archive(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cifar-10-binary.tar.gz laid out like the official one, built from the shared files."""
    path = tmp_path_factory.mktemp("archive") / cifar.ARCHIVE_NAME
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name in ALL_FILES:
            tar.add(cifar_dir / name, arcname=f"{cifar.BATCHES_DIR}/{name}")
    return path


def linked_copy(cifar_dir: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    """A batches dir in `target` whose files link to the shared ones, except `skip`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ALL_FILES:
        if name not in skip:
            (target / name).symlink_to(cifar_dir / name)
    return target


def assert_same_arrays(a: CifarData, b: CifarData) -> None:
    for field in ARRAYS:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.class_names == b.class_names


# ---------------------------------------------------------------- binary source


def test_known_statistics(data: CifarData) -> None:
    mean, std = augment.normalization_stats(data.train_images, "channel_std")
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=5e-5)
    np.testing.assert_allclose(std, [0.2470, 0.2435, 0.2616], atol=5e-5)


def test_known_records(data: CifarData, cifar_dir: Path) -> None:
    assert data.train_labels[0] == 6 and data.class_names[6] == "frog"
    assert tuple(data.train_images[0, 0, 0]) == (59, 62, 63)
    assert data.test_labels[0] == 3 and data.class_names[3] == "cat"
    assert tuple(data.test_images[0, 0, 0]) == (158, 112, 49)
    # Layout check against the raw bytes: record 1 of batch 2 is train image 10001,
    # its planes are R, G, B, each row-major.
    raw = np.frombuffer((cifar_dir / "data_batch_2.bin").read_bytes(), np.uint8)
    record = raw[cifar.RECORD_BYTES : 2 * cifar.RECORD_BYTES]
    assert data.train_labels[10_001] == record[0]
    planes = record[1:].reshape(3, 32, 32)
    for channel in range(3):
        np.testing.assert_array_equal(data.train_images[10_001, ..., channel], planes[channel])


def test_shapes_labels_and_class_names(data: CifarData) -> None:
    assert data.train_images.shape == (50_000, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (10_000, 32, 32, 3) and data.test_images.dtype == np.uint8
    assert data.train_labels.dtype == np.int32 and data.test_labels.dtype == np.int32
    assert data.train_images.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(np.bincount(data.train_labels, minlength=11), [5000] * 10 + [0])
    np.testing.assert_array_equal(np.bincount(data.test_labels, minlength=11), [1000] * 10 + [0])
    assert data.class_names == cifar.CIFAR10.default_names["fine"]
    assert data.source.startswith("binary:") and data.source.endswith(cifar.BATCHES_DIR)


def test_archive_loads_identical_arrays(archive: Path, data: CifarData) -> None:
    from_archive = load_cifar10("binary", archive)
    assert_same_arrays(from_archive, data)
    assert from_archive.source == f"binary:{archive}"
    # The directory holding the archive designates it too.
    assert load_cifar10("binary", archive.parent).source == f"binary:{archive}"


def test_directory_holding_batches_dir(cifar_dir: Path, tmp_path: Path, data: CifarData) -> None:
    (tmp_path / cifar.BATCHES_DIR).symlink_to(cifar_dir)
    loaded = load_cifar10("binary", tmp_path)
    assert loaded.source == f"binary:{tmp_path / cifar.BATCHES_DIR}"
    np.testing.assert_array_equal(loaded.test_images, data.test_images)


def test_env_var_locates_data(cifar_dir: Path, data: CifarData, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cifar.ENV_VAR, str(cifar_dir))
    for source in ("auto", "binary"):
        loaded = load_cifar10(source)
        assert loaded.source == f"binary:{cifar_dir}"
        np.testing.assert_array_equal(loaded.train_labels, data.train_labels)


def test_checksums(cifar_dir: Path, tmp_path: Path) -> None:
    load_cifar10("binary", cifar_dir, verify_checksums=True)
    bad = linked_copy(cifar_dir, tmp_path, skip=("data_batch_4.bin",))
    raw = bytearray((cifar_dir / "data_batch_4.bin").read_bytes())
    raw[5000] ^= 1  # one pixel off by one: still parses, only the digest notices
    (bad / "data_batch_4.bin").write_bytes(bytes(raw))
    load_cifar10("binary", bad)
    with pytest.raises(DataError, match=r"data_batch_4\.bin: sha256 .* differs from the official"):
        load_cifar10("binary", bad, verify_checksums=True)


# ---------------------------------------------------------------- errors


def test_missing_file(cifar_dir: Path, tmp_path: Path) -> None:
    bad = linked_copy(cifar_dir, tmp_path, skip=("data_batch_3.bin",))
    with pytest.raises(DataError, match=r"data_batch_3\.bin: missing.*cifar-10-binary\.tar\.gz"):
        load_cifar10("binary", bad)


def test_truncated_file(cifar_dir: Path, tmp_path: Path) -> None:
    bad = linked_copy(cifar_dir, tmp_path, skip=("data_batch_2.bin",))
    raw = (cifar_dir / "data_batch_2.bin").read_bytes()
    (bad / "data_batch_2.bin").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"data_batch_2\.bin: 30729900 bytes is not a multiple of the 3073"):
        load_cifar10("binary", bad)
    (bad / "data_batch_2.bin").write_bytes(raw[: -cifar.RECORD_BYTES])
    with pytest.raises(DataError, match=r"data_batch_2\.bin: 9999 records, expected 10000"):
        load_cifar10("binary", bad)


def test_bad_label_names_file_and_record(cifar_dir: Path, tmp_path: Path) -> None:
    bad = linked_copy(cifar_dir, tmp_path, skip=(cifar.TEST_FILE,))
    raw = bytearray((cifar_dir / cifar.TEST_FILE).read_bytes())
    raw[17 * cifar.RECORD_BYTES] = 10
    raw[40 * cifar.RECORD_BYTES] = 255
    (bad / cifar.TEST_FILE).write_bytes(bytes(raw))
    with pytest.raises(
        DataError, match=r"test_batch\.bin: record 17 .* label byte 10, allowed 0\.\.9 \(2 such"
    ):
        load_cifar10("binary", bad)


def test_bad_class_names_file(cifar_dir: Path, tmp_path: Path) -> None:
    bad = linked_copy(cifar_dir, tmp_path, skip=(cifar.META_FILE,))
    (bad / cifar.META_FILE).write_text("cat\ndog\n")
    with pytest.raises(DataError, match=r"batches\.meta\.txt: 2 class names, expected 10"):
        load_cifar10("binary", bad)


def test_bad_archives(archive: Path, cifar_dir: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated" / cifar.ARCHIVE_NAME
    truncated.parent.mkdir()
    with archive.open("rb") as src:
        truncated.write_bytes(src.read(1 << 20))
    with pytest.raises(DataError, match=rf"{truncated}: not a readable .*truncated"):
        load_cifar10("binary", truncated)
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(cifar_dir / cifar.META_FILE, arcname=f"{cifar.BATCHES_DIR}/{cifar.META_FILE}")
    with pytest.raises(
        DataError, match=r"partial\.tar\.gz: member cifar-10-batches-bin/data_batch_1\.bin missing"
    ):
        load_cifar10("binary", partial)


def test_bad_arguments_and_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"source: got 'hdf5', allowed 'auto', 'binary', 'tfds'"):
        load_cifar10("hdf5", tmp_path)
    monkeypatch.delenv(cifar.ENV_VAR, raising=False)
    monkeypatch.setenv("RESNET_JAX_DATA", str(tmp_path / "cache"))
    # Nothing given: the download, which conftest.py sends to a closed loopback port.
    with pytest.raises(DataError, match=r"cannot download .*offline\? download https://.*cifar-10-binary"):
        load_cifar10("binary")
    with pytest.raises(DataError, match=r"no such file or directory"):
        load_cifar10("binary", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"holds none of data_batch_1\.bin"):
        load_cifar10("binary", tmp_path)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"cannot download .*offline\?"):
        load_cifar10("auto")
    with pytest.raises(DataError, match=rf"data_dir={tmp_path}: found neither"):
        load_cifar10("auto", tmp_path)


# ---------------------------------------------------------------- validation split


def test_validation_split(cifar_dir: Path, data: CifarData) -> None:
    split = load_cifar10("binary", cifar_dir, validation_size=5000)
    assert split.train_images.shape == (45_000, 32, 32, 3) and split.train_labels.shape == (45_000,)
    assert split.test_images.shape == (5_000, 32, 32, 3) and split.test_labels.shape == (5_000,)
    # Positions, not pixel comparison, prove disjointness: train keeps [0, 45000),
    # validation is [45000, 50000), and the official test set is gone.
    np.testing.assert_array_equal(split.train_images, data.train_images[:45_000])
    np.testing.assert_array_equal(split.test_images, data.train_images[45_000:])
    np.testing.assert_array_equal(split.test_labels, data.train_labels[45_000:])
    assert "validation split = last 5000 training images" in split.source


@pytest.mark.parametrize("size", [-1, 50_000, 2.5, "5000"])
def test_validation_size_rejected(size: object, cifar_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"validation_size: got .*, allowed integers 0 <= k < 50000"):
        load_cifar10("binary", cifar_dir, validation_size=size)


# ---------------------------------------------------------------- tfds source


@pytest.mark.slow
def test_tfds_source_equals_binary(
    archive: Path, data: CifarData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prepares the stock tfds builder offline from our archive (~25 s) and compares."""
    pytest.importorskip("tensorflow")
    from tensorflow_datasets.core.download import checksums
    from tensorflow_datasets.image_classification.cifar import Cifar10

    unprepared = tmp_path / "empty"
    with pytest.raises(DataError, match=r"tfds cifar10 is not prepared in .*prepare_tfds"):
        load_cifar10("tfds", unprepared)
    with pytest.raises(
        DataError, match=r"archive: .* is not an existing file named cifar-10-binary\.tar\.gz"
    ):
        cifar.prepare_tfds(unprepared)
    # Our archive's bytes differ from the official download's (gzip headers,
    # tar metadata): tfds rejects it by its registered checksum.
    with pytest.raises(DataError, match=r"tfds rejected the archive's checksum"):
        cifar.prepare_tfds(tmp_path / "rejected", archive)
    # Register our archive's digest in place of the official one for this test only.
    monkeypatch.setattr(
        Cifar10, "url_infos", {cifar.CIFAR10.archive.url: checksums.compute_url_info(archive)}
    )
    tfds_dir = tmp_path / "tfds"
    cifar.prepare_tfds(tfds_dir, archive)
    loaded = load_cifar10("tfds", tfds_dir)
    assert loaded.source.startswith(f"tfds:{tfds_dir}")
    assert_same_arrays(loaded, data)  # same records in the same (official) order
    assert load_cifar10("auto", tfds_dir).source == loaded.source


def test_tfds_missing_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataError, match=r"needs tensorflow and tensorflow-datasets"):
        load_cifar10("tfds", tmp_path)


# ---------------------------------------------------------------- normalisation


def test_channel_std_standardises(data: CifarData) -> None:
    subset = data.train_images[:5000]
    mean, std = augment.normalization_stats(subset, "channel_std")
    assert mean.shape == (3,) and std.shape == (3,) and mean.dtype == np.float32
    x = np.asarray(augment.normalize(jnp.asarray(subset), mean, std), np.float64)
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_pixel_mean_subtracts_mean_image(data: CifarData) -> None:
    subset = data.train_images[:5000]
    mean, std = augment.normalization_stats(subset, "pixel_mean")
    assert mean.shape == (32, 32, 3)
    np.testing.assert_array_equal(std, np.ones(3, np.float32))
    np.testing.assert_allclose(mean, subset.astype(np.float64).mean(axis=0) / 255, atol=1e-7)
    x = np.asarray(augment.normalize(jnp.asarray(subset), mean, std), np.float64)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    assert x.max() <= 1.0 and x.min() >= -1.0  # still the [0, 1] pixel scale


def test_normalize_dtype_and_rejections(data: CifarData) -> None:
    images = jnp.asarray(data.test_images[:4])
    mean, std = np.float32([0.5, 0.5, 0.5]), np.float32([0.25, 0.25, 0.25])
    out = augment.normalize(images, mean, std, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    expected = (data.test_images[:4] / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.02)
    with pytest.raises(ValueError, match=r"images: got dtype float32, want uint8"):
        augment.normalize(images.astype(jnp.float32), mean, std)
    with pytest.raises(ValueError, match=r"mode: got 'zca', allowed 'pixel_mean', 'channel_std'"):
        augment.normalization_stats(data.test_images[:4], "zca")


# ---------------------------------------------------------------- crop + flip

BATCH = 4096
PAD = 4


def coded_images(batch: int, seed: int = 0) -> np.ndarray:
    """Channel 0 = row + 1, channel 1 = column + 1, channel 2 = a per-example tag:
    every output pixel says where it came from, and 0 means padding."""
    rows, cols = np.meshgrid(np.arange(1, 33), np.arange(1, 33), indexing="ij")
    tags = np.random.default_rng(seed).permutation(batch) + 1
    images = np.empty((batch, 32, 32, 3), np.float32)
    images[..., 0], images[..., 1] = rows, cols
    images[..., 2] = tags[:, None, None]
    return images


def decode_windows(
    images: np.ndarray, out: np.ndarray, pad: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recovers (dy, dx, flipped) per example from the centre pixel, which no
    shift of at most 4 can push into the padding, and checks that each output is
    exactly that window of the zero-padded input."""
    src_row = out[:, 16, 16, 0].astype(int) - 1
    src_col = out[:, 16, 16, 1].astype(int) - 1
    flipped = out[:, 16, 17, 1] < out[:, 16, 16, 1]
    dy = src_row - 16 + pad
    dx = np.where(flipped, src_col - 15, src_col - 16) + pad
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for b in range(len(images)):
        window = padded[b, dy[b] : dy[b] + 32, dx[b] : dx[b] + 32]
        np.testing.assert_array_equal(
            out[b], window[:, ::-1] if flipped[b] else window, err_msg=f"example {b}"
        )
    return dy, dx, flipped


@pytest.fixture(scope="module")
def crop_fn():
    return jax.jit(augment.random_crop_flip, static_argnames=("pad", "flip"))


def test_crops_are_windows_and_flips_half(crop_fn) -> None:
    images = coded_images(BATCH)
    out = np.asarray(crop_fn(jax.random.key(0), jnp.asarray(images), pad=PAD, flip=True))
    dy, dx, flipped = decode_windows(images, out, PAD)
    for offsets in (dy, dx):
        counts = np.bincount(offsets, minlength=2 * PAD + 1)
        assert len(counts) == 2 * PAD + 1  # nothing outside [0, 2*pad]
        # Uniform over 9 values: 455 expected each, binomial sd ~20; 6 sd bounds.
        assert np.all(np.abs(counts - BATCH / 9) < 6 * np.sqrt(BATCH / 9 * 8 / 9)), counts
    assert abs(flipped.sum() - BATCH / 2) < 6 * np.sqrt(BATCH / 4), flipped.sum()


def test_draws_depend_only_on_key_and_shape(crop_fn) -> None:
    a, b = coded_images(256, seed=1), coded_images(256, seed=2)
    key = jax.random.key(7)
    out_a = np.asarray(crop_fn(key, jnp.asarray(a), pad=PAD, flip=True))
    again = np.asarray(crop_fn(key, jnp.asarray(a), pad=PAD, flip=True))
    np.testing.assert_array_equal(out_a, again)
    draws_a = decode_windows(a, out_a, PAD)
    draws_b = decode_windows(b, np.asarray(crop_fn(key, jnp.asarray(b), pad=PAD, flip=True)), PAD)
    for x, y in zip(draws_a, draws_b):
        np.testing.assert_array_equal(x, y)
    other = decode_windows(a, np.asarray(crop_fn(jax.random.key(8), jnp.asarray(a), pad=PAD, flip=True)), PAD)
    assert np.mean(other[0] != draws_a[0]) > 0.5 and np.mean(other[2] != draws_a[2]) > 0.25


def test_no_flip_and_identity(crop_fn) -> None:
    images = coded_images(512)
    key = jax.random.key(3)
    out = np.asarray(crop_fn(key, jnp.asarray(images), pad=PAD, flip=False))
    _, _, flipped = decode_windows(images, out, PAD)
    assert not flipped.any()
    np.testing.assert_array_equal(np.asarray(crop_fn(key, jnp.asarray(images), pad=0, flip=False)), images)
    mirrored = np.asarray(crop_fn(key, jnp.asarray(images), pad=0, flip=True))
    is_flipped = np.all(mirrored == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(is_flipped | np.all(mirrored == images, axis=(1, 2, 3))) and 0 < is_flipped.sum() < 512
    with pytest.raises(ValueError, match=r"pad: got -1, want an integer >= 0"):
        augment.random_crop_flip(key, jnp.asarray(images), pad=-1)


def test_train_and_eval_paths(data: CifarData) -> None:
    images = jnp.asarray(data.test_images[:64])
    mean, std = augment.normalization_stats(data.train_images[:1000], "channel_std")
    key = jax.random.key(0)
    evaluated = augment.eval_batch(images, mean, std, jnp.float32)
    np.testing.assert_array_equal(evaluated, augment.normalize(images, mean, std))
    train = jax.jit(augment.augment_batch, static_argnames=("pad", "flip", "dtype"))
    # jit fuses the arithmetic differently from eager mode: equal up to float rounding.
    plain = train(key, images, mean, std, pad=0, flip=False, dtype=jnp.float32)
    np.testing.assert_allclose(plain, evaluated, rtol=1e-6, atol=1e-6)
    augmented = train(key, images, mean, std, pad=PAD, flip=True, dtype=jnp.bfloat16)
    assert augmented.dtype == jnp.bfloat16 and augmented.shape == images.shape
    augmented = np.asarray(augmented, np.float32)
    expected = np.asarray(augment.random_crop_flip(key, evaluated, pad=PAD, flip=True))
    np.testing.assert_allclose(augmented, expected, rtol=1e-2, atol=1e-2)  # bf16 keeps 8 bits
    assert np.abs(augmented - np.asarray(evaluated)).max() > 1.0  # and it did move pixels


# ---------------------------------------------------------------- batching


def test_epoch_permutation() -> None:
    first = batching.epoch_permutation(0, 0, 1000)
    assert first.dtype == np.int32
    np.testing.assert_array_equal(np.sort(first), np.arange(1000))
    np.testing.assert_array_equal(first, batching.epoch_permutation(0, 0, 1000))
    assert not np.array_equal(first, batching.epoch_permutation(0, 1, 1000))
    assert not np.array_equal(first, batching.epoch_permutation(1, 0, 1000))
    # The stream is fixed by (seed, epoch) through PCG64, independent of this process.
    np.testing.assert_array_equal(first, np.random.Generator(np.random.PCG64([0, 0])).permutation(1000))
    with pytest.raises(ValueError):
        first[0] = 1  # shared cached array is read-only
    with pytest.raises(ValueError, match=r"epoch: got -1, want an integer >= 0"):
        batching.epoch_permutation(0, -1, 10)


def test_train_indices() -> None:
    n, batch = 100, 32  # 3 steps per epoch, 4 examples dropped each epoch
    plan = batching.train_indices(5, 0, 9, batch, n)
    assert plan.shape == (9, batch) and plan.dtype == np.int32
    for epoch in range(3):
        rows = plan[3 * epoch : 3 * epoch + 3].ravel()
        assert len(np.unique(rows)) == 96 and rows.min() >= 0 and rows.max() < n
        np.testing.assert_array_equal(rows, batching.epoch_permutation(5, epoch, n)[:96])
    # Any window equals the same steps taken one at a time (resume from any step).
    window = batching.train_indices(5, 2, 5, batch, n)
    np.testing.assert_array_equal(
        window, np.concatenate([batching.train_indices(5, s, 1, batch, n) for s in range(2, 7)])
    )
    np.testing.assert_array_equal(window, plan[2:7])
    big = batching.train_indices(0, 0, 2000, 128, 50_000)  # ~5 epochs of CIFAR
    assert big.shape == (2000, 128)
    with pytest.raises(ValueError, match=r"batch_size: got 101, larger than the 100 examples"):
        batching.train_indices(0, 0, 1, 101, n)


def test_eval_batches() -> None:
    batches = batching.eval_batches(10, 4)
    assert len(batches) == 3
    assert all(ix.shape == (4,) and ix.dtype == np.int32 and m.dtype == bool for ix, m in batches)
    np.testing.assert_array_equal(np.concatenate([ix[m] for ix, m in batches]), np.arange(10))
    np.testing.assert_array_equal(batches[-1][1], [True, True, False, False])
    np.testing.assert_array_equal(batches[-1][0], [8, 9, 0, 0])
    assert len(batching.eval_batches(8, 4)) == 2 and all(m.all() for _, m in batching.eval_batches(8, 4))
