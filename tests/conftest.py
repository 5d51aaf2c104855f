"""Shared pytest fixtures: where the project's read-only test data lives."""

from pathlib import Path

import pytest

# torch and torchvision before anything imports TensorFlow: imported the other way round
# in one process, torchvision's import (triton) crashes the interpreter (torch 2.14.1,
# torchvision 0.29.1, tensorflow-cpu 2.21, checked on 2026-11-29). The suite needs both.
import torch  # noqa: E402,F401  isort: skip
import torchvision  # noqa: E402,F401  isort: skip

# The shared datasets sit beside the checkout (<repo>/../shared), on every
# developer machine and in CI; derived from this file so no machine path is baked in.
CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10" / "cifar-10-batches-bin"


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
