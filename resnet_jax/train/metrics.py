"""Where training numbers go: metrics.jsonl, TensorBoard event files, the progress bar.

`metrics.jsonl` holds one JSON object per line, `{"step", "split", ...values, "time"}`.
Each line reaches the file with a single `write` and an `fsync`, so a kill leaves at
most one partial trailing line, and a failed write (full disk) is cut back off; on
resume `truncate_after(step)` drops that line and everything the killed run logged
after its last checkpoint, so no step is ever logged twice. Non-finite floats are
written as the strings "NaN", "Infinity", "-Infinity" (strict JSON has no literal for
them; null would hide whether a loss diverged or overflowed) and `read_metrics` turns
them back into floats.

TensorBoard files (`<workdir>/tensorboard/<split>/`) are written when TensorFlow can be
imported, through `tf.summary.write` with the scalars plugin tag, which needs neither
the `tensorboard` package nor any TensorFlow at import time of this module. On resume
the event files are cut back to the checkpoint's step as well (each file rewritten
without the later events, then renamed over the old one), so TensorBoard, like
metrics.jsonl, holds every step once; TensorBoard's own purge-on-restart covers only
some of its loaders and none of the other readers of event files.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from resnet_jax.files import STR_TO_NON_FINITE, atomic_write_bytes, to_json_compatible

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "split", "time")


def _decode_non_finite(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: STR_TO_NON_FINITE.get(v, v) if k != "split" and isinstance(v, str) else v
        for k, v in record.items()
    }


def _parse_record(line: bytes) -> dict[str, Any]:
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not a JSON object with an integer 'step'")
    return record


def _records(data: bytes, source: str, *, strict: bool) -> list[tuple[bytes, dict[str, Any]]]:
    """(line, record) pairs of a metrics file.

    A partial last line (a kill mid-write) is dropped. A damaged line elsewhere is an
    error when `strict`, else dropped with a warning.
    """
    lines = data.split(b"\n")
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            pairs.append((line, _parse_record(line)))
        except ValueError as e:
            if number == len(lines):  # no newline after it: the write never finished
                log.info("%s: ignoring a partial last line", source)
            elif strict:
                raise ValueError(
                    f"{source} line {number} is not a metrics record ({e}): {line[:200]!r}"
                ) from e
            else:
                log.warning("%s line %d is not a metrics record (%s); dropping it", source, number, e)
    return pairs


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl file, in file order."""
    path = Path(path)
    return [_decode_non_finite(r) for _, r in _records(path.read_bytes(), str(path), strict=True)]


@functools.cache
def _import_tensorflow() -> Any:
    """TensorFlow with its GPUs hidden, or None (said once) when it cannot be imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except Exception as e:  # absent, or broken by a protobuf mismatch: TensorBoard is optional
        log.info(
            "TensorBoard output is off: TensorFlow is not importable (%s); metrics go to %s only",
            e,
            METRICS_FILE,
        )
        return None
    try:
        # TensorFlow would otherwise reserve the accelerators JAX is about to use.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialised by the input pipeline, which hid them
        pass
    return tf


class _TensorBoard:
    """Scalar event files, one folder per split so TensorBoard overlays train and eval."""

    def __init__(self, logdir: Path, tf: Any):
        from tensorflow.core.framework import summary_pb2  # pylint: disable=import-outside-toplevel

        self._tf = tf
        self._logdir = logdir
        self._writers: dict[str, Any] = {}
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )

    @classmethod
    def create(cls, logdir: Path) -> _TensorBoard | None:
        tf = _import_tensorflow()
        return None if tf is None else cls(logdir, tf)

    def scalars(self, split: str, step: int, values: Mapping[str, Any]) -> None:
        writer = self._writers.get(split)
        if writer is None:
            writer = self._writers[split] = self._tf.summary.create_file_writer(str(self._logdir / split))
        with writer.as_default():
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tf.summary.write(
                        name,
                        self._tf.constant(float(value), self._tf.float32),
                        step=step,
                        metadata=self._metadata,
                    )
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def truncate_after(self, step: int) -> int:
        """Drops summaries of steps after `step` from every event file; returns how many."""
        self.close()
        if not self._logdir.is_dir():
            return 0
        dropped = 0
        for path in sorted(self._logdir.glob("*/events.out.tfevents.*")):
            dropped += _truncate_event_file(self._tf, path, step)
        return dropped


def _truncate_event_file(tf: Any, path: Path, step: int) -> int:
    """Rewrites one event file without the summaries of steps > `step` (and a torn last record).

    Event files are TFRecord files: per record an 8-byte little-endian length, a 4-byte
    CRC of it, the serialized Event, a 4-byte CRC of that. Records are copied byte for
    byte (CRCs included), so only the framing needs reading here; going through
    tf.data instead would print a C++ DATA_LOSS warning for a torn last record.
    """
    del tf  # the Event proto ships with TensorFlow; importing it below needs TensorFlow present
    from google.protobuf.message import DecodeError  # pylint: disable=import-outside-toplevel
    from tensorflow.core.util import event_pb2  # pylint: disable=import-outside-toplevel

    data = path.read_bytes()
    kept: list[bytes] = []
    dropped = 0
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            dropped += 1  # a header the killed run did not finish
            break
        (length,) = struct.unpack_from("<Q", data, offset)
        end = offset + 12 + length + 4
        if end > len(data):
            dropped += 1  # a record the killed run did not finish
            break
        try:
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        except DecodeError:
            dropped += 1
            break
        if event.HasField("summary") and event.step > step:
            dropped += 1
        else:  # file_version and session records carry no training step: keep them
            kept.append(data[offset:end])
        offset = end
    if dropped:
        atomic_write_bytes(path, b"".join(kept))
        log.info("%s: dropped %d summaries after step %d (resumed run)", path, dropped, step)
    return dropped


class MetricsWriter:
    """Appends metric records to `<workdir>/metrics.jsonl` (and TensorBoard).

    Build it with `enabled=False` on processes other than 0: every method is then a
    no-op, so callers need no `if` of their own.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self._fd: int | None = None
        self._tb = _TensorBoard.create(Path(workdir) / TENSORBOARD_DIR) if enabled and tensorboard else None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            self._drop_partial_tail(self._fd)
        return self._fd

    def _drop_partial_tail(self, fd: int) -> None:
        """Cuts an unfinished last line so the next record does not glue onto it."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        keep = self.path.read_bytes().rfind(b"\n") + 1
        log.warning("%s ends with a partial line (%d bytes); removing it", self.path, size - keep)
        os.ftruncate(fd, keep)

    def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        """Appends one record; `values` may hold jax/numpy scalars (fetched here)."""
        if not self.enabled:
            return
        clash = [k for k in values if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in {METRICS_FILE}; rename them")
        converted = to_json_compatible(values)
        record = {"step": int(step), "split": split, **converted, "time": time.time()}
        self._append((json.dumps(record, allow_nan=False) + "\n").encode("utf-8"))
        if self._tb is not None:
            numeric = {
                k: STR_TO_NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in converted.items()
            }
            self._tb.scalars(split, int(step), numeric)

    def _append(self, line: bytes) -> None:
        fd = self._open()
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes (disk full?)")
            os.fsync(fd)
        except OSError as e:
            # Leave no partial record behind: the file keeps only whole lines.
            os.ftruncate(fd, start)
            if e.errno is not None and e.filename is None:  # os.write's ENOSPC names no file: say which
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            raise

    def truncate_after(self, step: int) -> int:
        """Keeps only complete records with `step <= step`; returns how many were dropped.

        Called on resume from a checkpoint at `step`: the killed run's later records
        will be logged again by this run. The file is replaced atomically; TensorBoard's
        event files are cut back the same way (their count is not in the return value).
        """
        if not self.enabled:
            return 0
        if self._tb is not None:
            self._tb.truncate_after(step)
        if not self.path.exists():
            return 0
        self._close_fd()  # the rewrite makes a new inode; the old descriptor would append to nothing
        data = self.path.read_bytes()
        kept = [line for line, r in _records(data, str(self.path), strict=False) if r["step"] <= step]
        atomic_write_bytes(self.path, b"".join(line + b"\n" for line in kept))
        dropped = sum(1 for line in data.split(b"\n") if line.strip()) - len(kept)
        if dropped:
            log.info("%s: dropped %d records after step %d (resumed run)", self.path, dropped, step)
        return dropped

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close_fd()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class Progress:
    """Progress of the training run on process 0: a tqdm bar, or log lines when not a TTY.

    In a terminal it shows a live bar with tqdm's ETA and the latest metrics. When
    stderr is a file (batch jobs, `nohup`), carriage-return updates would pile up into
    one giant line, so it prints one plain line every `log_every_s` seconds instead.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        log_every_s: float = 30.0,
    ):
        self.enabled = enabled
        self.total = total
        self._stream = stream or sys.stderr
        self._interactive = enabled and self._stream.isatty()
        self._log_every_s = log_every_s
        self._bar = (
            tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self._stream)
            if self._interactive
            else None
        )
        self._start: tuple[float, int] | None = None
        self._last_line = -math.inf

    def update(self, step: int, metrics: Mapping[str, Any], images_per_sec: float | None = None) -> None:
        """Moves to `step` and shows `metrics` (e.g. {'loss': .., 'err': ..}) and img/s."""
        if not self.enabled:
            return
        shown = {k: _format_value(v) for k, v in to_json_compatible(metrics).items()}
        if images_per_sec is not None:
            shown["img/s"] = f"{images_per_sec:,.0f}"
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        now = time.monotonic()
        if self._start is None:
            # The first update follows compilation: rates are measured from here.
            self._start = (now, step)
        if now - self._last_line >= self._log_every_s or step >= self.total:
            self._last_line = now
            self.log(self._line(step, shown, now))

    def _line(self, step: int, shown: Mapping[str, str], now: float) -> str:
        t0, s0 = self._start
        rate = (step - s0) / (now - t0) if now > t0 and step > s0 else 0.0
        eta = tqdm.format_interval((self.total - step) / rate) if rate > 0 else "?"
        values = " ".join(f"{k} {v}" for k, v in shown.items())
        return f"step {step}/{self.total} ({100 * step / self.total:.1f}%) {values} eta {eta}"

    def log(self, message: str) -> None:
        """Prints `message` above the bar without breaking it."""
        if self.enabled:
            tqdm.write(message, file=self._stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
