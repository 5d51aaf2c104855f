"""Fetches a dataset archive once into a local cache, verified and unpacked atomically.

`ensure_extracted(spec)` returns the directory the archive unpacks to, under the cache
(`$RESNET_JAX_DATA`, else `~/.cache/resnet_jax`). The first call downloads the archive
(with a progress bar), checks its byte count, MD5 (the digest the dataset's home page
publishes) and SHA256 (the one tensorflow-datasets registers), unpacks it into a
temporary folder beside the target and renames that into place, so the target
either exists complete or not at all; later calls find it and read nothing from the
network. A download that comes back short or with the wrong digest is deleted and
fetched once more; a second failure, or a machine that cannot reach the server, is
one `DataError` line saying where to put the files by hand.

The server can be replaced with `$RESNET_JAX_DATA_URL` (a base URL; the archive's file
name is appended), for a mirror, or a test server on the loopback address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

from resnet_jax.data import DataError

CACHE_ENV = "RESNET_JAX_DATA"
URL_ENV = "RESNET_JAX_DATA_URL"
DEFAULT_CACHE = Path("~") / ".cache" / "resnet_jax"
_CHUNK = 1 << 20
_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
    """One downloadable archive and what it must unpack to."""

    name: str  # the archive's file name, e.g. cifar-10-binary.tar.gz
    url: str  # where its publisher serves it
    size: int  # bytes
    md5: str  # published on the dataset's home page
    sha256: str  # registered by tensorflow-datasets (url_checksums/)
    directory: str  # the top-level folder inside the archive
    files: tuple[str, ...]  # members of `directory` that must be there after unpacking


def cache_dir() -> Path:
    """Where downloaded datasets live: $RESNET_JAX_DATA, else ~/.cache/resnet_jax."""
    given = os.environ.get(CACHE_ENV)
    return Path(given).expanduser() if given else DEFAULT_CACHE.expanduser()


def archive_url(spec: ArchiveSpec) -> str:
    base = os.environ.get(URL_ENV)
    return base.rstrip("/") + "/" + spec.name if base else spec.url


def cached(spec: ArchiveSpec, cache: Path | None = None) -> Path | None:
    """The unpacked directory if an earlier call left it complete, else None."""
    target = (cache or cache_dir()) / spec.directory
    if all((target / name).is_file() for name in spec.files):
        return target
    return None


def manual_hint(spec: ArchiveSpec, cache: Path) -> str:
    return (
        f"download {spec.url} on a machine with internet access and unpack it into {cache} "
        f"(giving {cache / spec.directory}/), or point data_dir at the archive or its unpacked folder"
    )


def ensure_extracted(spec: ArchiveSpec, cache: Path | None = None, *, progress: bool = True) -> Path:
    """The unpacked archive in the cache, downloading and unpacking it the first time."""
    cache = cache or cache_dir()
    found = cached(spec, cache)
    if found is not None:
        return found
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cache {cache} (${CACHE_ENV}): cannot create it ({err}); set ${CACHE_ENV} to a writable folder"
        ) from err
    with _locked(cache / f".{spec.name}.lock"):
        # Another process (a second host process on this machine) may have finished it meanwhile.
        found = cached(spec, cache)
        if found is not None:
            return found
        url = archive_url(spec)
        archive = cache / (spec.name + ".part")
        for attempt in (1, 2):
            try:
                _download(url, archive, spec, progress)
                break
            except _BadDownload as err:
                archive.unlink(missing_ok=True)
                if attempt == 2:
                    raise DataError(f"{url}: {err}, twice; {manual_hint(spec, cache)}") from None
                print(f"{spec.name}: {err}; deleted it, downloading once more", file=sys.stderr)
        try:
            return _extract(archive, spec, cache)
        finally:
            archive.unlink(missing_ok=True)


class _BadDownload(Exception):
    """A download that arrived but is not the archive: truncated or with other bytes."""


class StreamError(Exception):
    """A URL whose body could not be fetched whole.

    ``kind`` says what happened: ``"http"`` (the server answered an error status; ``detail`` is
    its code and reason), ``"unreachable"`` (no answer: offline, refused, timed out; ``detail``
    is the reason) or ``"cut"`` (the body stopped part-way; ``detail`` names the exception).
    ``received`` counts the bytes written before it stopped, ``expected`` is the
    Content-Length the server announced (None without one).
    """

    def __init__(self, kind: str, detail: str, received: int = 0, expected: int | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.received, self.expected = kind, detail, received, expected


def stream_url(
    url: str,
    path: str | os.PathLike,
    *,
    name: str,
    total: int | None = None,
    algorithms: tuple[str, ...] = ("sha256",),
    progress: bool = True,
) -> tuple[dict[str, str], int, int | None]:
    """Writes the body of ``url`` to the file ``path`` -> ({algorithm: hex digest}, bytes
    received, the announced Content-Length or None).

    The file is created only once the server has answered. With ``progress``, a byte-count bar
    named ``name`` runs on stderr, sized ``total`` (or the Content-Length). Network failures
    are a `StreamError`; an OSError from writing ``path`` before the first byte propagates.
    Checking the size and digests is the caller's: the dataset cache and the weight hub each
    know what the bytes must be.
    """
    try:
        response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)  # noqa: S310 (http(s) by construction)
    except urllib.error.HTTPError as err:
        raise StreamError("http", f"{err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise StreamError("unreachable", str(getattr(err, "reason", err)).replace("\n", " ")) from None
    digests = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    length = response.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    received = 0
    with response, open(path, "wb") as out, _bar(name, total or expected, progress) as bar:
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                for digest in digests.values():
                    digest.update(chunk)
                received += len(chunk)
                bar(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            # A body cut short mid-way: IncompleteRead, a reset or a timed-out socket.
            raise StreamError("cut", type(err).__name__, received, expected) from None
    return {algorithm: digest.hexdigest() for algorithm, digest in digests.items()}, received, expected


def _download(url: str, path: Path, spec: ArchiveSpec, progress: bool) -> None:
    try:
        digests, received, _ = stream_url(
            url, path, name=spec.name, total=spec.size, algorithms=("md5", "sha256"), progress=progress
        )
    except StreamError as err:
        if err.kind == "http":
            raise DataError(
                f"{url}: the server answered HTTP {err.detail}; {manual_hint(spec, path.parent)}"
            ) from None
        if err.kind == "unreachable":
            raise DataError(
                f"cannot download {url} ({err.detail}): offline? {manual_hint(spec, path.parent)}"
            ) from None
        raise _BadDownload(
            f"the download stopped after {err.received:,} of {spec.size:,} bytes ({err.detail})"
        ) from None
    if received != spec.size:
        raise _BadDownload(f"the download stopped after {received:,} of {spec.size:,} bytes")
    if digests["md5"] != spec.md5 or digests["sha256"] != spec.sha256:
        raise _BadDownload(
            f"md5 {digests['md5']} / sha256 {digests['sha256']} differ from the published "
            f"{spec.md5} / {spec.sha256}"
        )


@contextlib.contextmanager
def _bar(name: str, total: int | None, enabled: bool) -> Iterator:
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    ) as bar:
        yield bar.update


def _extract(archive: Path, spec: ArchiveSpec, cache: Path) -> Path:
    """Unpacks into a temporary folder in `cache`, then renames the one wanted folder into place."""
    target = cache / spec.directory
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.directory}.", dir=cache))
    try:
        wanted = {f"{spec.directory}/{name}" for name in spec.files}
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                members = [
                    m
                    for m in tar.getmembers()
                    if m.isfile()
                    and m.name.startswith(spec.directory + "/")
                    and "/" not in m.name[len(spec.directory) + 1 :]
                ]
                missing = wanted - {m.name for m in members}
                if missing:
                    raise DataError(
                        f"{spec.name}: members {sorted(missing)} missing although its digest "
                        "matched; report this"
                    )
                # Flat regular files only, so no member can write outside `staging`; the
                # 'data' filter (Python >= 3.10.12) says the same to tarfile itself.
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **extra)
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise DataError(f"{archive}: cannot unpack ({err}); {manual_hint(spec, cache)}") from err
        if target.exists():  # an incomplete leftover (cached() said so): replace it
            shutil.rmtree(target)
        os.rename(staging / spec.directory, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, where the platform has fcntl."""
    try:
        import fcntl  # pylint: disable=import-outside-toplevel
    except ImportError:  # Windows: no lock; the atomic rename still keeps the cache consistent
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
