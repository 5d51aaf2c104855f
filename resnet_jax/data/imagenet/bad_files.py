"""Bad files: naming the file that failed, or filling its row so the batch keeps its shape.

An undecodable file stops the iterator with a DataError naming it (the failing step's
files are re-decoded one by one to find it: `_find_bad_file`). With `skip_bad_files=True`
the pipelines drop failed decodes and `_assemble` fills their rows in place, so batch
shapes, row positions and every other example stay exactly as without the bad file: in
training, a bad row takes a copy (image and label) of the next good row of the same
step's batch on this process (cyclically, `_substitute`), so no blank image or wrong label
reaches the step or the BN statistics, and the substitute is a pure function of (seed,
step) and the set of bad files, so resuming stays exact; in evaluation, a bad row is masked
out (`mask=False`). Each skip is logged with the file name and kept in the iterator's
`bad_files` list; a training batch whose rows all fail stops with a DataError.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from resnet_jax.data import DataError
from resnet_jax.errors import first_line


class BatchIterator:
    """An iterator of batches with the files it skipped (`bad_files`, in order met)."""

    def __init__(self, generator_fn: Callable[[BatchIterator], Iterator[dict]]):
        self.bad_files: list[str] = []
        self._it = generator_fn(self)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def _skipped(self, name: str) -> None:
        self.bad_files.append(name)
        logging.warning("skipping unreadable image %s (%d skipped so far)", name, len(self.bad_files))


def _find_bad_file(files: Sequence[str], err: Exception, where: str) -> DataError:
    """Re-decodes `files` one by one (eagerly) to name the one that failed."""
    import tensorflow as tf

    from resnet_jax.data import image_transforms as T

    for path in files:
        if not path:
            continue
        try:
            T.decode(tf.io.read_file(path))
        except Exception as one:  # noqa: BLE001 - any failure names this file
            return DataError(
                f"{path}: cannot be decoded as an image ({first_line(one)}); fix or remove it, "
                "or pass skip_bad_files=True to skip and count such files"
            )
    return DataError(f"reading {where} failed: {first_line(err)} (files: {', '.join(files[:4])}...)")


def _assemble(elements, plan, make_row, on_bad):
    """Skip mode: builds batches in Python from the surviving elements of `plan`.

    `elements` yields dicts with 'pos' in increasing order (failed ones dropped);
    `plan` yields per batch (positions [n], names [n]); rows without an element are
    filled by `on_bad(name)` -> row dict, or, where it returns None, by `_substitute`.
    """
    pending = next(elements, None)
    for positions, names in plan:
        rows = []
        for pos, name in zip(positions, names):
            if pending is not None and pending["pos"] == pos:
                rows.append(make_row(pending))
                pending = next(elements, None)
            else:
                rows.append(on_bad(name))
        rows = _substitute(rows, names)
        yield {key: _stack([row[key] for row in rows]) for key in rows[0]}


def _substitute(rows: list, names: Sequence[str]) -> list:
    """Each None row becomes the next good row of the batch, cyclically (a training row
    whose file failed: a real example in its place, never a blank one)."""
    good = [i for i, row in enumerate(rows) if row is not None]
    if len(good) == len(rows):
        return rows
    if not good:
        raise DataError(
            f"every file of a training batch failed to decode (first: {names[0]}); "
            "skip_bad_files=True can only replace a bad row by a good one of the same batch"
        )
    n = len(rows)
    return [
        row if row is not None else rows[min(good, key=lambda g: (g - i) % n)] for i, row in enumerate(rows)
    ]


def _stack(values):
    if isinstance(values[0], tuple):
        return tuple(np.stack(group) for group in zip(*values))
    return np.stack(values)
