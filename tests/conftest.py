"""Shared pytest fixtures: where the project's read-only test data lives."""

from pathlib import Path

import pytest

# The shared datasets sit beside the checkout (<repo>/../shared), on every
# developer machine and in CI; derived from this file so no machine path is baked in.
CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10" / "cifar-10-batches-bin"


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
