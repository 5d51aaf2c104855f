"""Pretrained weights by name: torchvision's published ResNet files, fetched, checked and cached.

``resolve('resnet50', 'IMAGENET1K_V2')`` (or ``'resnet50:IMAGENET1K_V2'``) gives a path that
:func:`resnet_jax.interop.weights.load_variables` reads. For a torchvision name it goes:

1. the converted cache, ``$RESNET_JAX_WEIGHTS`` (default ``~/.cache/resnet_jax/weights``),
   ``torchvision/<file stem>/``: a converted checkpoint directory (see ``weights``), renamed
   into place whole, so it is there complete or not at all;
2. else the published ``.pth`` in torch's hub cache, ``$TORCH_HOME/hub/checkpoints`` (torch's
   default ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch``), where ``torchvision`` itself
   keeps it, so a file torch already fetched is not fetched again;
3. else a download from ``https://download.pytorch.org/models/`` (``$RESNET_JAX_WEIGHTS_URL``
   replaces that base, for a mirror or a test server) into a temporary file beside its place,
   with a progress bar; its sha256 must start with the hex digits in its published name
   (``resnet50-11ad3fa6.pth``: torch hub's ``check_hash`` convention) before it is renamed
   into the hub cache. A short or mismatching download is deleted, so the cache only ever
   holds whole, checked files;

then the ``.pth`` is read without torch, tensors only (``interop.pth``), converted and written
to the converted cache. timm's hub files carry no hash in their names, so nothing could
check a download: timm weights by name (``timm:resnet50.a1_in1k``) come only from a file
already on disk, in the converted cache's ``timm/`` folder or in the Hugging Face hub cache.
Every failure is one line naming the file to fetch and where to put it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from resnet_jax.data.download import StreamError, stream_url
from resnet_jax.errors import EXIT_TRANSIENT
from resnet_jax.files import atomic_file
from resnet_jax.interop import layout
from resnet_jax.interop.layout import ConversionError

log = logging.getLogger(__name__)

URL_ENV = "RESNET_JAX_WEIGHTS_URL"
CACHE_ENV = "RESNET_JAX_WEIGHTS"
DEFAULT_URL = "https://download.pytorch.org/models"
DEFAULT_CACHE = Path("~") / ".cache" / "resnet_jax" / "weights"
HF_URL = "https://huggingface.co"
DEFAULT_TAG = "DEFAULT"
_CHUNK = 1 << 20

# torchvision's published ResNet weights (torchvision/models/resnet.py, ResNet*_Weights; the
# same files since torchvision 0.13): name -> tag -> file on download.pytorch.org/models/.
# The hex digits after the dash are the first digits of the file's sha256.
TORCHVISION: dict[str, dict[str, str]] = {
    "resnet18": {"IMAGENET1K_V1": "resnet18-f37072fd.pth"},
    "resnet34": {"IMAGENET1K_V1": "resnet34-b627a593.pth"},
    "resnet50": {"IMAGENET1K_V1": "resnet50-0676ba61.pth", "IMAGENET1K_V2": "resnet50-11ad3fa6.pth"},
    "resnet101": {"IMAGENET1K_V1": "resnet101-63fe2227.pth", "IMAGENET1K_V2": "resnet101-cd907fc2.pth"},
    "resnet152": {"IMAGENET1K_V1": "resnet152-394f9c45.pth", "IMAGENET1K_V2": "resnet152-f82ba261.pth"},
}
# torchvision's ``weights="DEFAULT"`` (ResNet*_Weights.DEFAULT): the newest recipe each depth has.
DEFAULTS = {
    "resnet18": "IMAGENET1K_V1",
    "resnet34": "IMAGENET1K_V1",
    "resnet50": "IMAGENET1K_V2",
    "resnet101": "IMAGENET1K_V2",
    "resnet152": "IMAGENET1K_V2",
}
# torch.hub's HASH_REGEX: the hash prefix is the hex run between the last dash and a dot.
_HASH = re.compile(r"-([a-f0-9]*)\.")
# What counts as a name rather than a path: [torchvision:]resnetN[:TAG] or timm:resnetN[.tag].
_TORCHVISION_NAME = re.compile(r"(?:torchvision:)?(resnet\d+)(?::(\w+))?")
_TIMM_NAME = re.compile(r"timm:(resnet\w*)(?:\.(\w+))?")


class DownloadError(ConversionError):
    """The weights could not be fetched (offline, server down, a short or damaged download):
    nothing is wrong with the request, so a later rerun may succeed (exit status 75)."""

    exit_status = EXIT_TRANSIENT


def is_model_name(spec: object) -> bool:
    """True for a string that names published weights and is not an existing path."""
    if not isinstance(spec, str) or os.path.exists(spec):
        return False
    return bool(_TORCHVISION_NAME.fullmatch(spec) or _TIMM_NAME.fullmatch(spec))


def hub_checkpoints_dir() -> Path:
    """torch.hub's cache for model files: $TORCH_HOME/hub/checkpoints, as torch.hub.get_dir() finds it."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch"
    )
    return Path(home).expanduser() / "hub" / "checkpoints"


def weights_cache_dir() -> Path:
    """Where converted weights live: $RESNET_JAX_WEIGHTS, else ~/.cache/resnet_jax/weights."""
    given = os.environ.get(CACHE_ENV)
    return Path(given).expanduser() if given else DEFAULT_CACHE.expanduser()


def hf_hub_dir() -> Path:
    """The Hugging Face hub cache (where timm keeps its files), found as huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def torchvision_file(spec: str, weights: object = None) -> tuple[str, str, str]:
    """(arch, tag, published file name) for 'resnet50' + 'IMAGENET1K_V2', 'resnet50:IMAGENET1K_V2', ...

    ``weights`` may also be torchvision's enum member (``ResNet50_Weights.IMAGENET1K_V2``) or
    its string; None or 'DEFAULT' is torchvision's default for that depth.
    """
    match = _TORCHVISION_NAME.fullmatch(spec)
    if match is None:
        raise ConversionError(f"{spec!r} is not a torchvision model name (resnet18/34/50/101/152[:TAG])")
    arch, tag = match.group(1), match.group(2)
    if weights is not None:
        given = str(weights).rsplit(".", 1)[-1]  # 'ResNet50_Weights.IMAGENET1K_V2' -> the tag
        if tag is not None and tag != given:
            raise ConversionError(f"{spec!r} names weights {tag}, but weights={weights!r}; give one of them")
        tag = given
    if arch not in TORCHVISION:
        raise ConversionError(
            f"{arch!r} has no published torchvision weights; names with weights: {', '.join(TORCHVISION)}"
        )
    tag = DEFAULTS[arch] if tag in (None, DEFAULT_TAG) else tag
    files = TORCHVISION[arch]
    if tag not in files:
        raise ConversionError(
            f"torchvision publishes no {arch} weights {tag!r}; it has: {', '.join([*files, DEFAULT_TAG])}"
        )
    return arch, tag, files[tag]


def file_url(filename: str) -> str:
    base = os.environ.get(URL_ENV) or DEFAULT_URL
    return base.rstrip("/") + "/" + filename


def hash_prefix(filename: str) -> str:
    match = _HASH.search(filename)
    if match is None or not match.group(1):
        raise ConversionError(f"{filename} has no hash prefix in its name (NAME-<hex>.pth)")
    return match.group(1)


def fetch(spec: str, weights: object = None, *, progress: bool = True) -> tuple[Path, str]:
    """(the published weight file on disk, arch) for a model name: from a cache or downloaded."""
    if spec.startswith("timm:"):
        if weights is not None:
            raise ConversionError(f"weights= is for torchvision names; {spec!r} names its tag after a dot")
        return _timm_file(spec), spec.split(".", 1)[0]
    arch, _, filename = torchvision_file(spec, weights)
    path = hub_checkpoints_dir() / filename
    if path.is_file():
        _check_cached(path, hash_prefix(filename))
        log.info("%s: using %s from the torch hub cache", spec, path)
        return path, arch
    _download(file_url(filename), path, hash_prefix(filename), progress)
    return path, arch


def resolve(spec: str, weights: object = None, *, progress: bool = True) -> tuple[Path, str | None]:
    """(path for load_variables, arch or None): the converted cache of a torchvision name
    (converting it the first time), or the weight file itself (timm names; or a converted
    cache that cannot be written, which is then logged and the file converted on the fly)."""
    if spec.startswith("timm:"):
        return fetch(spec, weights, progress=progress)
    arch, _, filename = torchvision_file(spec, weights)
    converted = weights_cache_dir() / "torchvision" / Path(filename).stem
    from resnet_jax.interop import weights as weight_files

    if (converted / weight_files.META_FILE).is_file():
        return converted, None
    path, arch = fetch(spec, weights, progress=progress)
    try:
        return _convert_into(path, arch, converted), None
    except OSError as err:
        log.warning(
            "cannot cache the converted weights in %s (%s); converting %s on the fly", converted, err, path
        )
        return path, arch


def _convert_into(path: Path, arch: str, converted: Path) -> Path:
    """Converts ``path`` into a fresh folder beside ``converted``, then renames it into place."""
    from resnet_jax.interop import weights as weight_files

    converted.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{converted.name}.", dir=converted.parent))
    try:
        _, variables, record = weight_files.convert_file(path, arch)
        weight_files.save_converted(staging, variables, record)
        try:
            os.rename(staging, converted)
        except OSError:
            if not (converted / weight_files.META_FILE).is_file():
                raise
            # Another process converted the same file meanwhile: its copy is as good as ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s into %s", path, converted)
    return converted


def _check_cached(path: Path, prefix: str) -> None:
    """A cached file must carry the hash its name promises (torch renames only checked files,
    but anything may have written there)."""
    digest = _sha256(path)
    if not digest.startswith(prefix):
        raise ConversionError(
            f"{path}: its sha256 {digest[:16]}... does not start with {prefix}, the hash in its name "
            "(damaged or another file); delete it to download it again"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, prefix: str, progress: bool) -> None:
    """Downloads ``url`` to ``dest`` through a temporary file that is renamed only once checked."""
    by_hand = f"fetch {url} and put it at {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(dest, err) from None
    with atomic_file(dest) as tmp:
        try:
            digest, received, expected = _stream(url, tmp, dest.name, progress, by_hand)
        except OSError as err:
            raise _unwritable(dest, err) from None
        if expected is not None and received != expected:
            raise DownloadError(
                f"the download of {url} stopped after {received:,} of {expected:,} bytes "
                f"(deleted it); run again, or {by_hand}"
            )
        if not digest.startswith(prefix):
            raise DownloadError(
                f"{url}: the download's sha256 {digest[:16]}... does not start with {prefix}, the hash in "
                f"its name (damaged on the way, or another file; deleted it); run again, or {by_hand}"
            )


def _unwritable(dest: Path, err: OSError) -> ConversionError:
    return ConversionError(
        f"cannot write into the torch hub cache {dest.parent} ({err}); set $TORCH_HOME to a writable folder"
    )


def _stream(url: str, path: Path, name: str, progress: bool, by_hand: str) -> tuple[str, int, int | None]:
    """(sha256 hex, bytes received, Content-Length or None) of ``url`` written to ``path``; the
    network's failures as this module's errors."""
    try:
        digests, received, expected = stream_url(url, path, name=name, progress=progress)
    except StreamError as err:
        if err.kind == "http":
            raise ConversionError(f"{url}: the server answered HTTP {err.detail}; {by_hand}") from None
        if err.kind == "unreachable":
            raise DownloadError(f"cannot download {url} ({err.detail}): offline? {by_hand}") from None
        total = f"{err.expected:,}" if err.expected is not None else "?"
        raise DownloadError(
            f"the download of {url} stopped after {err.received:,} of {total} bytes ({err.detail}; "
            f"deleted it); run again, or {by_hand}"
        ) from None
    return digests["sha256"], received, expected


def _timm_file(spec: str) -> Path:
    """A timm model's weight file from the converted cache's timm/ folder or the HF hub cache."""
    match = _TIMM_NAME.fullmatch(spec)
    if match is None or match.group(2) is None:
        raise ConversionError(
            f"{spec!r}: a timm name by weights needs its pretrained tag, e.g. timm:resnet50.a1_in1k"
        )
    layout.parse_arch(spec)  # refuses unsupported timm variants by name
    model = spec.split(":", 1)[1]
    local = weights_cache_dir() / "timm"
    candidates = [local / f"{model}{suffix}" for suffix in (".safetensors", ".pth", ".bin")]
    snapshots = hf_hub_dir() / f"models--timm--{model}" / "snapshots"
    if snapshots.is_dir():
        for snapshot in sorted(snapshots.iterdir()):
            candidates += [snapshot / "model.safetensors", snapshot / "pytorch_model.bin"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConversionError(
        f"timm weights are not downloaded by name (their hub files carry no hash to check them against): "
        f"fetch {HF_URL}/timm/{model}/resolve/main/model.safetensors and put it at "
        f"{local / (model + '.safetensors')}, or pass the file's path"
    )
