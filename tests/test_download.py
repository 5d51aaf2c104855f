"""Downloading CIFAR into the cache, against a real HTTP server on 127.0.0.1; the CIFAR-100 reader.

No test here touches the internet: the server is Python's http.server in a thread on the
loopback address, serving archives built from ../shared/datasets/cifar10, and conftest.py
points $RESNET_JAX_DATA_URL at a closed loopback port for every other test. No real
CIFAR-100 is at hand, so its reader is tested on small files written in the official
binary layout (a coarse and a fine label byte, then the R, G, B planes, per record).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from resnet_jax.data import DataError, cifar, download


class _Server:
    """Serves `files` by name; `plan` says, request by request, how to misbehave."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plan: list[str] = []  # 'ok' | 'truncate' | 'corrupt' | '404'; empty: 'ok'
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = self.path.lstrip("/")
                server.requests.append(name)
                mode = server.plan.pop(0) if server.plan else "ok"
                body = server.files.get(name)
                if body is None or mode == "404":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "truncate":  # promise the whole body, send 40% of it, hang up
                    self.wfile.write(body[: len(body) * 2 // 5])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if mode == "corrupt":  # same length, one byte different
                    body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # keep pytest's output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    running = _Server()
    yield running
    running.close()


def _tar_gz(directory: str, files: dict[str, bytes], level: int = 1) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=level) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{directory}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _spec_for(spec: download.ArchiveSpec, body: bytes) -> download.ArchiveSpec:
    """`spec` with the size and digests of our own archive (the official ones fit only the official bytes)."""
    return dataclasses.replace(
        spec, size=len(body), md5=hashlib.md5(body).hexdigest(), sha256=hashlib.sha256(body).hexdigest()
    )


@pytest.fixture
def serve(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Registers an archive on the server; the cache is a fresh tmp folder."""
    monkeypatch.setenv(download.URL_ENV, server.url + "/mirror")
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    server.plan.clear()
    server.requests.clear()

    def register(spec: download.ArchiveSpec, body: bytes) -> download.ArchiveSpec:
        server.files[f"mirror/{spec.name}"] = body
        return _spec_for(spec, body)

    return register


@pytest.fixture(scope="module")
def small_cifar10(cifar_dir: Path) -> bytes:
    """A cifar-10-binary.tar.gz holding the real test batch and class names only (fast to build)."""
    return _tar_gz(
        cifar.BATCHES_DIR,
        {name: (cifar_dir / name).read_bytes() for name in (cifar.TEST_FILE, cifar.META_FILE)},
    )


SMALL10 = dataclasses.replace(cifar.CIFAR10_ARCHIVE, files=(cifar.TEST_FILE,))


def test_official_constants() -> None:
    # The digests the home page (MD5) and tensorflow-datasets (size, SHA256) publish.
    assert cifar.CIFAR10_ARCHIVE.url == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert cifar.CIFAR10_ARCHIVE.md5 == "c32a1d4ab5d03f1284b67883e8d87530"
    assert cifar.CIFAR100_ARCHIVE.url == "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
    assert cifar.CIFAR100_ARCHIVE.md5 == "03b5dce01913d631647c71ecec9e9cb8"
    assert (cifar.CIFAR10_ARCHIVE.size, cifar.CIFAR100_ARCHIVE.size) == (170_052_171, 168_513_733)


def tfds_registered_checksums(dataset: str) -> dict[str, tuple[int, str]]:
    """url -> (size, sha256) as the installed tensorflow-datasets registers them
    (`url_checksums/<dataset>.txt`: url, size, sha256, file name; tab-separated)."""
    import importlib.resources

    text = (importlib.resources.files("tensorflow_datasets") / "url_checksums" / f"{dataset}.txt").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return {row[0]: (int(row[1]), row[2]) for row in rows}


@pytest.mark.parametrize(
    "dataset,spec", [("cifar10", cifar.CIFAR10_ARCHIVE), ("cifar100", cifar.CIFAR100_ARCHIVE)]
)
def test_sizes_and_sha256_equal_what_tensorflow_datasets_registers(dataset: str, spec) -> None:
    """Read from the installed tfds package, not copied: an archive tfds accepts, we accept."""
    registered = tfds_registered_checksums(dataset)
    assert spec.url in registered, sorted(registered)
    assert (spec.size, spec.sha256) == registered[spec.url]


def test_cache_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(download.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert download.cache_dir() == tmp_path / ".cache" / "resnet_jax"
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert download.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(download.URL_ENV, raising=False)
    assert download.archive_url(cifar.CIFAR10_ARCHIVE) == cifar.CIFAR10.archive.url


def test_download_unpacks_verifies_and_reuses(
    serve,
    server: _Server,
    small_cifar10: bytes,
    cifar_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = serve(SMALL10, small_cifar10)
    got = download.ensure_extracted(spec)
    assert got == tmp_path / "cache" / cifar.BATCHES_DIR
    assert (got / cifar.TEST_FILE).read_bytes() == (cifar_dir / cifar.TEST_FILE).read_bytes()
    assert server.requests == [f"mirror/{cifar.ARCHIVE_NAME}"]
    assert "cifar-10-binary.tar.gz" in capsys.readouterr().err  # the progress bar names the file
    # Nothing but the unpacked folder and the lock remain: no archive, no staging folder.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f".{spec.name}.lock", cifar.BATCHES_DIR]
    assert download.ensure_extracted(spec) == got
    assert len(server.requests) == 1  # the second call read the cache only


def test_whole_cifar10_download_through_load_cifar(
    serve, cifar_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's path: no data_dir, no $CIFAR10_DIR -> download, unpack, read the same arrays."""
    body = _tar_gz(
        cifar.BATCHES_DIR,
        {name: (cifar_dir / name).read_bytes() for name in (*cifar.CIFAR10.files, cifar.META_FILE)},
        level=0,
    )  # stored, not compressed: the same gzip container, seconds faster
    served = serve(cifar.CIFAR10_ARCHIVE, body)
    monkeypatch.setattr(cifar, "CIFAR10", dataclasses.replace(cifar.CIFAR10, archive=served))
    monkeypatch.delenv(cifar.ENV_VAR, raising=False)
    loaded = cifar.load_cifar("cifar10", "binary", verify_checksums=True)
    reference = cifar.load_cifar10("binary", cifar_dir)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(reference, field), err_msg=field)
    assert loaded.num_classes == 10 and loaded.class_names == reference.class_names


def test_truncated_download_is_retried_once(
    serve, server: _Server, small_cifar10: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = serve(SMALL10, small_cifar10)
    server.plan[:] = ["truncate"]
    got = download.ensure_extracted(spec, progress=False)
    assert (got / cifar.TEST_FILE).stat().st_size == cifar.RECORD_BYTES * cifar.CIFAR10.records[
        cifar.TEST_FILE
    ]
    assert len(server.requests) == 2
    assert "deleted it, downloading once more" in capsys.readouterr().err


def test_truncated_twice_is_one_error_and_leaves_nothing(
    serve, server: _Server, small_cifar10: bytes, tmp_path: Path
) -> None:
    spec = serve(SMALL10, small_cifar10)
    server.plan[:] = ["truncate", "truncate"]
    with pytest.raises(
        DataError,
        match=r"/mirror/cifar-10-binary\.tar\.gz: the download stopped after [\d,]+ of [\d,]+ bytes.*"
        r"twice; download https://www\.cs\.toronto\.edu/.* unpack it into",
    ) as err:
        download.ensure_extracted(spec, progress=False)
    assert "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{spec.name}.lock"]
    assert download.cached(spec) is None


def test_checksum_mismatch_is_retried_then_an_error(
    serve, server: _Server, small_cifar10: bytes, tmp_path: Path
) -> None:
    spec = serve(SMALL10, small_cifar10)
    server.plan[:] = ["corrupt", "corrupt"]
    with pytest.raises(DataError, match=r"md5 [0-9a-f]{32} / sha256 [0-9a-f]{64} differ from the published"):
        download.ensure_extracted(spec, progress=False)
    assert len(server.requests) == 2
    assert download.cached(spec) is None
    server.plan[:] = ["corrupt"]  # one bad copy, then a good one: success
    assert download.ensure_extracted(spec, progress=False) == tmp_path / "cache" / cifar.BATCHES_DIR


def test_server_down_and_http_error(
    serve, server: _Server, small_cifar10: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = serve(SMALL10, small_cifar10)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    monkeypatch.setenv(download.URL_ENV, f"http://127.0.0.1:{dead}")
    with pytest.raises(
        DataError,
        match=rf"cannot download http://127\.0\.0\.1:{dead}/cifar-10-binary\.tar\.gz "
        r"\(.*refused.*\): offline\? download .* unpack it into ",
    ):
        download.ensure_extracted(spec, progress=False)
    monkeypatch.setenv(download.URL_ENV, server.url + "/nothing-here")
    with pytest.raises(DataError, match=r"answered HTTP 404"):
        download.ensure_extracted(spec, progress=False)
    assert download.cached(spec) is None


def test_offline_trainer_error_through_load_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest.py points the download at a closed loopback port: the offline case.
    monkeypatch.delenv(cifar.ENV_VAR, raising=False)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(
        DataError,
        match=r"cannot download .*offline\? download "
        r"https://www\.cs\.toronto\.edu/~kriz/cifar-10-binary\.tar\.gz",
    ):
        cifar.load_cifar10("auto")


# ---------------------------------------------------------------- CIFAR-100 reader


def _cifar100_files(rng: np.random.Generator, count: int) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    coarse = rng.integers(0, 20, count, dtype=np.uint8)
    fine = rng.integers(0, 100, count, dtype=np.uint8)
    planes = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([coarse[:, None], fine[:, None], planes.reshape(count, -1)], axis=1)
    return records.tobytes(), coarse, fine, planes


@pytest.fixture
def tiny_cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    small = dataclasses.replace(cifar.CIFAR100, records={cifar.CIFAR100_TRAIN: 20, cifar.CIFAR100_TEST: 10})
    monkeypatch.setattr(cifar, "CIFAR100", small)
    rng = np.random.default_rng(0)
    train = _cifar100_files(rng, 20)
    test = _cifar100_files(rng, 10)
    files = {
        cifar.CIFAR100_TRAIN: train[0],
        cifar.CIFAR100_TEST: test[0],
        "fine_label_names.txt": "".join(f"fine{i}\n" for i in range(100)).encode(),
        "coarse_label_names.txt": "".join(f"coarse{i}\n" for i in range(20)).encode(),
    }
    directory = tmp_path / "c100" / cifar.CIFAR100_DIR
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory, files, train, test


def test_cifar100_binary_layout_fine_and_coarse(tiny_cifar100) -> None:
    directory, _, (_, coarse, fine, planes), (_, test_coarse, test_fine, _) = tiny_cifar100
    data = cifar.load_cifar("cifar100", "binary", directory)
    assert data.num_classes == 100 and data.class_names[7] == "fine7"
    np.testing.assert_array_equal(data.train_labels, fine.astype(np.int32))
    np.testing.assert_array_equal(data.test_labels, test_fine.astype(np.int32))
    # NHWC: pixel (row 5, col 9) channel c is byte 2 + c*1024 + 5*32 + 9 of the record.
    np.testing.assert_array_equal(data.train_images[3, 5, 9], planes[3, :, 5, 9])
    assert data.train_images.shape == (20, 32, 32, 3) and data.train_images.flags["C_CONTIGUOUS"]
    coarse_data = cifar.load_cifar("cifar100", "binary", directory.parent, label_mode="coarse")
    assert coarse_data.num_classes == 20 and coarse_data.class_names[0] == "coarse0"
    np.testing.assert_array_equal(coarse_data.train_labels, coarse.astype(np.int32))
    np.testing.assert_array_equal(coarse_data.test_labels, test_coarse.astype(np.int32))
    np.testing.assert_array_equal(coarse_data.train_images, data.train_images)
    split = cifar.load_cifar("cifar100", "binary", directory, validation_size=5)
    np.testing.assert_array_equal(split.test_labels, fine[-5:].astype(np.int32))


def test_cifar100_archive_and_download(
    tiny_cifar100, serve, server: _Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    directory, files, (_, _, fine, _), _ = tiny_cifar100
    body = _tar_gz(cifar.CIFAR100_DIR, files)
    archive = tmp_path / cifar.CIFAR100_ARCHIVE_NAME
    archive.write_bytes(body)
    from_archive = cifar.load_cifar100("binary", archive)
    np.testing.assert_array_equal(from_archive.train_labels, fine.astype(np.int32))
    served = serve(cifar.CIFAR100_ARCHIVE, body)
    monkeypatch.setattr(cifar, "CIFAR100", dataclasses.replace(cifar.CIFAR100, archive=served))
    monkeypatch.delenv(cifar.CIFAR100_ENV_VAR, raising=False)
    downloaded = cifar.load_cifar("cifar100", "binary")
    assert downloaded.source.startswith(f"binary:{tmp_path / 'cache' / cifar.CIFAR100_DIR}")
    np.testing.assert_array_equal(downloaded.train_images, from_archive.train_images)
    assert server.requests == [f"mirror/{cifar.CIFAR100_ARCHIVE_NAME}"]


def test_cifar100_download_with_wrong_digest_is_refused(
    tiny_cifar100, serve, server: _Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The CIFAR-100 archive's MD5 and SHA256 are checked as CIFAR-10's are: a bad copy is fetched
    once more, then refused, and nothing is left in the cache for the reader to find."""
    _, files, _, _ = tiny_cifar100
    body = _tar_gz(cifar.CIFAR100_DIR, files)
    served = serve(cifar.CIFAR100_ARCHIVE, body)
    monkeypatch.setattr(cifar, "CIFAR100", dataclasses.replace(cifar.CIFAR100, archive=served))
    monkeypatch.delenv(cifar.CIFAR100_ENV_VAR, raising=False)
    server.plan[:] = ["corrupt", "corrupt"]  # same length, one byte different
    with pytest.raises(
        DataError,
        match=r"cifar-100-binary\.tar\.gz: md5 [0-9a-f]{32} / sha256 [0-9a-f]{64} "
        r"differ from the published .*twice",
    ):
        cifar.load_cifar("cifar100", "binary")
    assert server.requests == [f"mirror/{cifar.CIFAR100_ARCHIVE_NAME}"] * 2
    assert download.cached(served) is None and not (tmp_path / "cache" / cifar.CIFAR100_DIR).exists()
    # Our small archive against the official digests (its own size, so only the digests differ).
    official = dataclasses.replace(cifar.CIFAR100_ARCHIVE, size=len(body))
    monkeypatch.setattr(cifar, "CIFAR100", dataclasses.replace(cifar.CIFAR100, archive=official))
    with pytest.raises(
        DataError,
        match=r"differ from the published 03b5dce01913d631647c71ecec9e9cb8 / "
        r"58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
    ):
        cifar.load_cifar100("binary")
    assert download.cached(official) is None


def test_cifar100_bad_files(tiny_cifar100) -> None:
    directory, files, _, _ = tiny_cifar100
    raw = bytearray(files[cifar.CIFAR100_TRAIN])
    raw[3 * cifar.CIFAR100.record_bytes + 1] = 100  # record 3's fine label out of range
    (directory / cifar.CIFAR100_TRAIN).write_bytes(bytes(raw))
    with pytest.raises(
        DataError,
        match=r"train\.bin: record 3 \(0-based, byte offset 9222\) has fine label byte 100, "
        r"allowed 0\.\.99 \(1 such records\)",
    ):
        cifar.load_cifar100("binary", directory)
    (directory / cifar.CIFAR100_TRAIN).write_bytes(bytes(raw[:-7]))
    with pytest.raises(DataError, match=r"not a multiple of the 3074-byte record"):
        cifar.load_cifar100("binary", directory)
    with pytest.raises(ValueError, match=r"label_mode: got 'coarse', allowed for cifar10: 'fine'"):
        cifar.load_cifar("cifar10", label_mode="coarse")
    with pytest.raises(ValueError, match=r"dataset name: got 'mnist'"):
        cifar.load_cifar("mnist")


def test_cifar100_config() -> None:
    from _configs import load_config  # pylint: disable=import-outside-toplevel

    from resnet_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel

    config = load_config("resnet56", "cifar100.py")
    reference = load_config("resnet56")
    assert (config.dataset.name, config.dataset.label_mode) == ("cifar100", "fine")
    # The CIFAR-10 recipe, unchanged apart from the data.
    config.dataset.name, config.dataset.label_mode = "cifar10", "fine"
    assert config.to_dict() == reference.to_dict()
    config.dataset.name, config.dataset.label_mode = "cifar100", "coarse"
    assert config_lib.validate(config).total_steps == 64_000
