"""The run's working directory: creation, sanity checks, config.json, atomic JSON files.

A workdir holds everything a run needs to resume and to be judged (config.json,
metrics.jsonl, checkpoints/, results.json). This module owns the checks made before
any compile (writable? enough free space? in use by another run? same config as the
run being resumed?) and the crash-safe way of writing small files into it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resnet_jax.errors import UserError
from resnet_jax.files import atomic_write_json, flatten_dict, to_json_compatible

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"


class WorkdirError(UserError, ValueError):
    """The workdir cannot be used as asked (unwritable, full, or a different config)."""


_MISSING = "<absent>"


def config_differences(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    ignore_keys: set[str],
    added_defaults: Mapping[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every leaf that differs and is not ignored.

    An ignored key also covers everything below it ('data' ignores 'data.dir'). A key the
    old config lacks is no difference when the new one holds `added_defaults[key]`: a field
    added to the code after the run started, at the default that keeps the old behaviour.
    """
    added_defaults = flatten_dict(added_defaults or {})
    old_flat, new_flat = flatten_dict(old), flatten_dict(new)

    def ignored(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in ignore_keys)

    diffs = {}
    for key in sorted(old_flat.keys() | new_flat.keys()):
        before, after = old_flat.get(key, _MISSING), new_flat.get(key, _MISSING)
        if before == _MISSING and key in added_defaults and after == added_defaults[key]:
            continue
        if before != after and not ignored(key):
            diffs[key] = (before, after)
    return diffs


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f"workdir {str(path)!r} cannot be created ({e}); choose another --workdir "
            "or fix the permissions of its parent"
        ) from e
    if not path.is_dir():
        raise WorkdirError(f"workdir {str(path)!r} exists but is not a directory; choose another --workdir")


def _check_writable(path: Path) -> None:
    # os.access lies on network filesystems and for root; only a real write tells.
    probe = path / f".write_probe-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise WorkdirError(
            f"workdir {str(path)!r} is not writable ({e}); choose another --workdir or fix its permissions"
        ) from e


def _check_free_space(path: Path, min_free_bytes: int) -> None:
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise WorkdirError(
            f"workdir {str(path)!r} has {free / 2**30:.2f} GiB free but the run needs at "
            f"least {min_free_bytes / 2**30:.2f} GiB (checkpoints and metrics); free some "
            "space or choose another --workdir"
        )


# Workdirs this process holds: absolute path -> the open lock file (its flock is the lock).
_HELD_LOCKS: dict[Path, Any] = {}


def _lock(path: Path) -> None:
    """Takes the workdir's lock for this process, or raises WorkdirError naming its holder.

    An flock on `.lock`: the kernel releases it when the holder dies, however it dies
    (kill -9 included), so a crashed run never blocks its rerun, and no pid has to be
    guessed alive. The file keeps the holder's host and pid for the message only.
    Reentrant within a process (a notebook that runs twice in one workdir).
    """
    if path in _HELD_LOCKS:
        return
    lock_path = path / LOCK_FILE
    # Held open past this function (the open file is the lock); "a+" never truncates the holder's line.
    f = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WorkdirError(
                f"workdir {str(path)!r} cannot be locked ({e}); choose another --workdir"
            ) from e
        raise WorkdirError(
            f"workdir {str(path)!r} is in use by {holder}; wait for that run to end (or stop it), "
            "or choose another --workdir"
        ) from None
    except BaseException:
        f.close()
        raise
    f.seek(0)
    f.truncate()
    f.write(
        f"the run of pid {os.getpid()} on host {socket.gethostname()} (started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n"
    )
    f.flush()
    _HELD_LOCKS[path] = f


def release_workdir(workdir: str | os.PathLike) -> None:
    """Releases the lock `prepare_workdir(..., lock=True)` took; nothing if none is held."""
    f = _HELD_LOCKS.pop(Path(os.path.abspath(os.path.expanduser(os.fspath(workdir)))), None)
    if f is not None:
        f.close()  # closing the file drops the flock


def _read_config(path: Path) -> dict[str, Any] | None:
    """The stored config, or None when the file is unreadable (named in a warning)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); treating it as a different config", path, e)
        return None
    return stored if isinstance(stored, dict) else None


def _backup_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"config.{stamp}.json")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"config.{stamp}-{n}.json")
        n += 1
    return candidate


def _format_diffs(diffs: Mapping[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"  {k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in diffs.items())


def _reconcile_config(
    path: Path,
    config: dict[str, Any],
    *,
    allow_config_change: bool,
    ignore_keys: set[str],
    override_hint: str,
    added_defaults: Mapping[str, Any] | None = None,
) -> None:
    """Writes config.json, or refuses a resume whose config changed what matters."""
    if not path.exists():
        atomic_write_json(path, config)
        return
    stored = _read_config(path)
    if stored is None:
        diffs = {"<whole file>": ("<unreadable>", "<new config>")}
    else:
        diffs = config_differences(stored, config, ignore_keys, added_defaults)
    if diffs and not allow_config_change:
        raise WorkdirError(
            f"{path} was written by a run with a different config; resuming would mix "
            f"two experiments. Differing keys (old -> new):\n{_format_diffs(diffs)}\n"
            f"Use another --workdir, or pass {override_hint} to resume with the new "
            "config (the old config.json is kept as config.<timestamp>.json)."
        )
    if diffs:
        backup = _backup_name(path)
        shutil.copy2(path, backup)
        log.warning(
            "config changed on resume (allowed by %s); old config kept as %s. "
            "Differing keys (old -> new):\n%s",
            override_hint,
            backup,
            _format_diffs(diffs),
        )
    if stored != config:
        # Ignorable keys (cadences, logging) may differ: config.json tracks the live run.
        atomic_write_json(path, config)


def prepare_workdir(
    workdir: str | os.PathLike,
    config_json: Mapping[str, Any],
    *,
    allow_config_change: bool,
    ignore_keys: set[str],
    added_defaults: Mapping[str, Any] | None = None,
    override_hint: str = "--config.allow_config_change=True",
    min_free_bytes: int = 0,
    is_primary: bool | None = None,
    lock: bool = False,
) -> Path:
    """Creates and checks `workdir`; returns its absolute path.

    Every process of a multi-process run must call it (after `jax.distributed.initialize`):
    when any process fails a check, all of them raise the same error before any other
    collective, instead of the others waiting for one that has stopped.

    Checks, in order: the directory can be created, a file can really be written in
    it, it has `min_free_bytes` free. Then, on the primary process only (others would
    race on config.json; `is_primary` defaults to `jax.process_index() == 0`): writes
    config.json on a first run, or
    compares it with `config_json` on a resume and raises `WorkdirError` listing the
    differing keys (dotted paths; `ignore_keys` and everything below them are exempt)
    unless `allow_config_change`, in which case the old file is kept as
    config.<timestamp>.json and a warning lists the changes. `override_hint` is the
    caller's spelling of that switch, quoted in the error. `added_defaults` (the config's
    defaults) lets a run written before a field existed resume with that field at its default.

    With `lock`, the primary process also takes the workdir's lock (before config.json
    is read, so two runs never race on it) and keeps it until `release_workdir`; a
    workdir that a live run holds is refused with its host and pid. A failed check
    releases it again.
    """
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(workdir))))
    if is_primary is None:
        is_primary = jax.process_index() == 0
    failure: Exception | None = None
    try:
        _make_dir(path)
        _check_writable(path)
        _check_free_space(path, min_free_bytes)
        if is_primary and lock:
            _lock(path)
        if is_primary:
            try:
                config = to_json_compatible(config_json)
            except ValueError as e:
                raise ValueError(f"config_json cannot be stored as {CONFIG_FILE}: {e}") from e
            _reconcile_config(
                path / CONFIG_FILE,
                config,
                allow_config_change=allow_config_change,
                ignore_keys=ignore_keys,
                added_defaults=added_defaults,
                override_hint=override_hint,
            )
    except (ValueError, OSError) as e:  # WorkdirError is a ValueError
        failure = e
    try:
        _raise_agreed(failure)
    except BaseException:
        if lock:
            release_workdir(path)
        raise
    return path


# Error classes a process's verdict can carry to the others, by code (0: no error).
_VERDICT_CLASSES: tuple[type[Exception], ...] = (WorkdirError, ValueError, OSError)


def _raise_agreed(failure: Exception | None) -> None:
    """Raises the same error on every process when any process failed its checks.

    The checks are local (this process's disk) or made by process 0 alone (config.json),
    but a process that stopped alone would leave the others waiting in their next
    collective until JAX's coordination timeout. So every process, failed or not, takes
    part in one exchange of verdicts (two all-gathers: lengths, then the messages), and
    all raise the error of the lowest-numbered failed process, with the same class and
    text; a process raises its own exception object when it is that process.
    """
    if jax.process_count() == 1:
        if failure is not None:
            raise failure
        return
    from jax.experimental import multihost_utils  # only multi-process runs need it

    code = (
        0
        if failure is None
        else next(i + 1 for i, cls in enumerate(_VERDICT_CLASSES) if isinstance(failure, cls))
    )
    message = b"" if failure is None else str(failure).encode("utf-8")
    lengths = np.asarray(multihost_utils.process_allgather(np.array([code, len(message)], np.int32)))
    failed = np.flatnonzero(lengths[:, 0])
    if not failed.size:
        return
    width = max(1, int(lengths[:, 1].max()))  # no zero-size collective
    padded = np.zeros(width, np.uint8)
    padded[: len(message)] = np.frombuffer(message, np.uint8)
    messages = np.asarray(multihost_utils.process_allgather(padded))
    first = int(failed[0])
    if first == jax.process_index():
        raise failure
    text = bytes(messages[first, : lengths[first, 1]]).decode("utf-8")
    raise _VERDICT_CLASSES[lengths[first, 0] - 1](text)
