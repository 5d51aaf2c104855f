"""Test helper: the shared real ImageNet JPEGs arranged as an image folder in a temp dir."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

SAMPLES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "imagenet-samples"


def samples() -> list[dict]:
    """Rows of the samples' manifest.csv (filename, synset, label_index, width, height, mode ...)."""
    manifest = SAMPLES_DIR / "manifest.csv"
    if not manifest.is_file():
        pytest.fail(
            f"ImageNet samples missing: expected {manifest} (../shared/datasets/imagenet-samples "
            "beside the checkout); see ../shared/datasets/README.md",
            pytrace=False,
        )
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def make_image_folder(tmp_path: Path, n_val: int = 20, n_train: int | None = None) -> Path:
    """root/train/<wnid>/<file> for the first n_train samples (all by default) and
    root/val/<wnid>/<file> for the last n_val, as symlinks to the read-only originals.

    Returns root. Labels are the samples' ILSVRC-2012 indices (manifest label_index).
    """
    rows = samples()
    root = Path(tmp_path) / "imagenet"
    chosen = {
        "train": rows if n_train is None else rows[:n_train],
        "val": rows[len(rows) - n_val :] if n_val else [],
    }
    for split, split_rows in chosen.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for row in split_rows:
            target = root / split / row["synset"] / row["filename"]
            target.parent.mkdir(exist_ok=True)
            os.symlink(SAMPLES_DIR / row["filename"], target)
    return root
