"""Files that survive a crash, and the JSON they hold: atomic writes, directory fsync, values
made JSON-compatible (NaN and infinities as strings), flattening of nested dicts.

The lowest layer of the package: training (workdir, checkpoints, metrics) and interop (weight
directories) both write through it, and it imports nothing of resnet_jax.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Non-finite floats are not valid JSON; they are written as these strings (the
# spellings JavaScript and Python's own `json` use) so a diverged run's NaN loss
# stays visible and every file stays readable by strict JSON parsers.
STR_TO_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def to_json_compatible(obj: Any) -> Any:
    """Returns `obj` with numpy/jax scalars and arrays as Python values, NaN/inf as strings.

    Anything exposing `__array__` (numpy and jax arrays and scalars) is pulled to the
    host once, so callers may pass device values straight from a jitted step.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_json_compatible(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_compatible(v) for v in obj]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if hasattr(obj, "__array__"):  # numpy and jax arrays and scalars
        return to_json_compatible(np.asarray(obj).tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, (int, float)):
        return obj
    raise ValueError(
        f"value {obj!r} of type {type(obj).__name__} cannot be written as JSON; "
        "allowed: numbers, strings, bools, None, lists, dicts and numpy/jax arrays"
    )


def fsync_dir(path: Path) -> None:
    """Makes a rename or a new entry in directory `path` survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller to write the whole file to.

    On a normal exit the file is flushed to disk and renamed over `path`, and the rename is made
    durable, so a reader sees either the old file or the new one, whole, even after a crash or a
    power loss; on an error the temporary is deleted and `path` is untouched. The temporary's
    name carries host and pid, so several processes writing the same file never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces `path` with `data` so a reader sees either the old or the new file, whole
    (see `atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` atomically (see `atomic_write_bytes`)."""
    text = json.dumps(to_json_compatible(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def flatten_dict(tree: Mapping[str, Any], sep: str = ".", keep_empty: bool = True) -> dict[str, Any]:
    """`{'a': {'b': 1}}` -> `{'a.b': 1}` (`sep` between the keys); empty sub-dicts are leaves
    with `keep_empty`, else dropped."""
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and (value or not keep_empty):
                walk(value, name + sep)
            else:
                flat[name] = value

    walk(tree, "")
    return flat


def unflatten_dict(flat: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """The inverse of `flatten_dict` (without empty sub-dicts)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# Room for metrics.jsonl, TensorBoard files and orbax's small metadata files.
DISK_MARGIN_BYTES = 64 << 20


def _bytes_under(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # deleted meanwhile
                pass
    return total


def disk_space_needed(workdir: str, step_bytes: int, keep: int) -> int:
    """Free bytes a run needs: `keep` checkpoints plus the one being written before the
    oldest is deleted, less what earlier checkpoints of a resumed run already occupy."""
    path = Path(os.path.abspath(os.path.expanduser(workdir))) / "checkpoints"
    existing = _bytes_under(path) if path.is_dir() else 0
    return max(0, (keep + 1) * step_bytes - existing) + DISK_MARGIN_BYTES
