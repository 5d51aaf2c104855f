"""Test helpers: the shared real ImageNet JPEGs arranged as an image folder, or written as a
tfds imagenet2012 train split of real tfrecords, in a temp dir."""

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


def make_tfds_imagenet(tmp_path: Path, n_train: int, bad: dict[int, bytes] | None = None) -> Path:
    """A prepared tfds imagenet2012 'train' split of the first n_train samples: real
    tfrecords (one shard) with dataset_info.json, read by the stock builder, no mocking.

    `bad` maps a record index to the bytes stored in place of its JPEG (e.g. a truncated
    file), as a damaged record would hold them. Returns the tfds data_dir.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    data_dir = Path(tmp_path) / "tfds"
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    version_dir = Path(builder.data_dir)
    version_dir.mkdir(parents=True)
    bad = bad or {}
    with tf.io.TFRecordWriter(str(version_dir / "imagenet2012-train.tfrecord-00000-of-00001")) as writer:
        for i, row in enumerate(samples()[:n_train]):
            image = bad.get(i, (SAMPLES_DIR / row["filename"]).read_bytes())
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row["label_index"])])),
                "file_name": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[row["filename"].encode()])
                ),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    split = tfds.core.SplitInfo(name="train", shard_lengths=[n_train], num_bytes=0, filename_template=None)
    builder.info.set_splits(tfds.core.SplitDict([split]))
    builder.info.write_to_directory(builder.data_dir)
    return data_dir
