"""Shared pytest fixtures: where the project's read-only test data lives; one compilation cache."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One persistent compilation cache for the whole session, in-process and in every subprocess
# (they inherit the environment): many tests compile the same train step (a command-line run
# and its in-process twin, a crash and its resume), and a cache hit costs a fraction of a
# compile on 2 cores. Set before anything imports JAX, which reads these at import. A test
# that sets its own cache directory keeps it; removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="resnet_jax_test_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# torch and torchvision before anything imports TensorFlow: imported the other way round
# in one process, torchvision's import (triton) crashes the interpreter (torch 2.14.1,
# torchvision 0.29.1, tensorflow-cpu 2.21, checked on 2026-11-29). The suite needs both.
import torch  # noqa: E402,F401  isort: skip
import torchvision  # noqa: E402,F401  isort: skip

# The shared datasets sit beside the checkout (<repo>/../shared), on every
# developer machine and in CI; derived from this file so no machine path is baked in.
CIFAR_DIR = (
    Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10" / "cifar-10-batches-bin"
)


@pytest.fixture(scope="session", autouse=True)
def _no_internet_downloads(tmp_path_factory: pytest.TempPathFactory):
    """Dataset downloads go to a closed loopback port and a temporary cache, in every test.

    A test that forgets its data would otherwise fetch 170 MB from the internet into the
    user's ~/.cache; this way it fails fast with the offline message. Subprocesses inherit it.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESNET_JAX_DATA_URL", "http://127.0.0.1:9")  # discard port: refused
        patch.setenv("RESNET_JAX_DATA", str(tmp_path_factory.mktemp("download_cache")))
        yield


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The official CIFAR-10 binary batches (read-only: copy before modifying)."""
    if not (CIFAR_DIR / "data_batch_1.bin").is_file():
        pytest.fail(
            f"CIFAR-10 test data missing: expected the binary batches in {CIFAR_DIR} "
            "(../shared/datasets/cifar10/cifar-10-batches-bin beside the checkout); "
            "see ../shared/datasets/README.md",
            pytrace=False,
        )
    return CIFAR_DIR
