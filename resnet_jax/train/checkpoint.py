"""Checkpoints that survive kills, full disks and damaged files.

`Checkpointer` wraps an orbax `CheckpointManager` rooted at `<workdir>/checkpoints`
and adds what orbax leaves to its users:

* Integrity manifests. Once a step is finalised (orbax has renamed its temporary
  folder into place), process 0 fsyncs every file of the step and writes
  `manifests/<step>.json` (size and sha256 of each file, paths relative to the step
  folder) atomically. Orbax lists only integer-named entries of its root, so the
  `manifests/`, `quarantine/` and `deleting-<step>` entries are invisible to it.
* Verified restore. `restore_latest` walks steps newest first, checks each against
  its manifest, restores the first good one and warns about every step it skipped.
  A step without a readable manifest is *unverified*: with async saves that is the
  normal state of the newest step after a kill (its manifest is written at the next
  save, `wait()` or `close()`), and orbax's atomic rename makes such a step complete
  unless the machine lost power, so it is restored with a warning and skipped only
  if orbax fails to read it (orbax has no checksums of its own: flipped bytes in an
  unverified step can restore without error). Steps newer than the one restored that failed are moved
  to `quarantine/` (never deleted: they may be evidence) so that the resumed run can
  save those step numbers again.
* Retention that never deletes the last good checkpoint. Orbax's own garbage
  collection (`max_to_keep`) counts steps, good or not, so it could delete the only
  good step when newer ones are damaged. It is switched off; after each manifest is
  written a step is deleted only if at least `max_to_keep` *verified* steps are
  newer than it. Damaged or unverified steps therefore never count, and linger until
  enough good steps exist above them. This re-hashes up to `max_to_keep - 1` older
  steps per save: a few hundred MB for an ImageNet ResNet-50, about a second.

Errors while saving (a full disk surfaces from tensorstore as a `ValueError`, from
Python as `OSError`) become `CheckpointError` naming the directory and the cause;
earlier steps are untouched because orbax writes into `<step>.orbax-checkpoint-tmp`
and renames only on success. Leftover temporary folders from a kill or a failed save
are removed by orbax when the next `Checkpointer` is created (`cleanup_tmp_directories`).

Multi-process runs: every process calls `save`, `restore_latest`, `wait` and `close`
(orbax coordinates the array writes and reads); manifests, verification, retention
and quarantine run on process 0, whose verdicts are broadcast so that all processes
try the same steps. The state must then hold global arrays (a host-local scalar
cannot be saved from several processes: orbax refuses it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from resnet_jax.errors import UserError, first_line
from resnet_jax.files import atomic_write_json, fsync_dir, to_json_compatible

log = logging.getLogger(__name__)

MANIFEST_DIR = "manifests"
QUARANTINE_DIR = "quarantine"
_DELETING_PREFIX = "deleting-"
_MANIFEST_FORMAT = 1
_CHUNK = 1 << 20

# Verdicts of `_check`, in the order used to broadcast them between processes.
_OK, _UNVERIFIED, _CORRUPT = "ok", "unverified", "corrupt"
_VERDICTS = (_OK, _UNVERIFIED, _CORRUPT)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written, or none of the existing ones can be restored."""


class RestoredCheckpoint(NamedTuple):
    state: Any
    step: int
    metadata: dict[str, Any]


def _hash_file(path: Path, *, fsync: bool) -> tuple[int, str]:
    """(size, sha256) of `path`; with `fsync`, also forces its bytes to disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def build_manifest(step_dir: Path, step: int) -> dict[str, Any]:
    """Sizes and hashes of every file under `step_dir`, after making them durable.

    Fsyncing here means a manifest never vouches for bytes still in the page cache:
    orbax renames the step into place but does not fsync it.
    """
    files = {}
    for root, dirs, names in os.walk(step_dir):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            size, sha = _hash_file(path, fsync=True)
            files[path.relative_to(step_dir).as_posix()] = {"size": size, "sha256": sha}
        fsync_dir(Path(root))
    return {"format": _MANIFEST_FORMAT, "step": step, "files": files}


def verify_files(step_dir: Path, files: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per file of the manifest that is missing, resized or altered."""
    problems = []
    for rel, expected in sorted(files.items()):
        path = step_dir / rel
        if not path.is_file():
            problems.append(f"file {path} is missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            problems.append(
                f"file {path} has {size} bytes, the manifest says {expected['size']} "
                "(truncated or overwritten)"
            )
            continue
        _, sha = _hash_file(path, fsync=False)
        if sha != expected["sha256"]:
            problems.append(
                f"file {path} has different contents than when saved "
                f"(sha256 {sha[:12]}... != {expected['sha256'][:12]}...)"
            )
    return problems


def _abstract_leaf(leaf: Any) -> Any:
    # Orbax treats numpy scalars as unsupported Python values; as 0-d arrays they restore.
    if isinstance(leaf, np.generic):
        leaf = np.asarray(leaf)
    return ocp.utils.to_shape_dtype_struct(leaf)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _rmtree_via_rename(path: Path, graveyard: Path) -> None:
    """Deletes `path` so that a kill midway never leaves a half-deleted step behind.

    The rename is atomic: orbax stops listing the step at once, and a leftover
    `deleting-*` folder is swept by the next `Checkpointer`.
    """
    if graveyard.exists():
        shutil.rmtree(graveyard)
    os.replace(path, graveyard)
    fsync_dir(path.parent)
    shutil.rmtree(graveyard)


class Checkpointer:
    """Saves and restores the train state of one run under `directory`.

    Args:
      directory: orbax root, normally `<workdir>/checkpoints` (made absolute here:
        orbax refuses relative paths).
      max_to_keep: how many verified steps to keep (>= 1); see the module docstring.
      async_save: write arrays in a background thread; the step becomes verified
        (manifest written, retention applied) at the next `save`, `wait` or `close`.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int, async_save: bool = True):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep!r}; allowed: an integer >= 1")
        self.directory = Path(os.path.abspath(os.path.expanduser(os.fspath(directory))))
        self.max_to_keep = max_to_keep
        self.last_restore_warnings: list[str] = []
        self._primary = jax.process_index() == 0
        self._pending: int | None = None
        self._async = async_save
        try:
            self._manager = self._new_manager()
            if self._primary:
                (self.directory / MANIFEST_DIR).mkdir(exist_ok=True)
                for leftover in self.directory.glob(f"{_DELETING_PREFIX}*"):
                    shutil.rmtree(leftover)
        except OSError as e:
            raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e}") from e

    def _new_manager(self, cleanup_tmp: bool = True) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: see the module docstring
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
            enable_async_checkpointing=self._async,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def _save_failed(self, step: int, error: Exception) -> CheckpointError:
        """Replaces the manager after a failed save and describes the failure.

        Orbax can keep a second error of the same save in its background machinery
        and raise it at the next, healthy save; a fresh manager starts clean. It must
        leave the failed save's temporary folder alone: orbax's writers for it may
        still be running, and deleting under them fails the next save. The folder is
        removed when the next run starts.
        """
        try:
            self._manager.close()
        except Exception as late:  # the same failure, reported again
            log.info("checkpoint step %d: orbax also reported: %s", step, first_line(late, 800))
        self._manager = self._new_manager(cleanup_tmp=False)
        return CheckpointError(
            f"saving checkpoint step {step} to {self.directory} failed: {first_line(error, 800)}; "
            "earlier checkpoints are intact"
        )

    # ----------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Every step on disk, oldest first, good or not."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step on disk (not necessarily a good one), or None."""
        return self._manager.latest_step()

    def _manifest_path(self, step: int) -> Path:
        return self.directory / MANIFEST_DIR / f"{step}.json"

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        state: Any,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving `state` (a pytree) and `metadata` (small JSON) as `step`.

        Returns False without saving when `step` already exists, or when it is not
        newer than the latest step and `force` is False. Raises `CheckpointError` if
        this save, or the previous asynchronous one, failed.
        """
        try:
            meta = to_json_compatible(dict(metadata or {}))
        except ValueError as e:
            raise ValueError(f"checkpoint metadata for step {step}: {e}") from e
        self._finalize_pending()
        if step in self._manager.all_steps():
            log.info("checkpoint for step %d already exists in %s; not saving", step, self.directory)
            return False
        if self._primary:
            # A manifest left by a quarantined step of the same number must not vouch
            # for the new one between orbax's commit and the new manifest.
            self._manifest_path(step).unlink(missing_ok=True)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(meta))
        try:
            saved = self._manager.save(step, args=args, force=force)
        except Exception as e:  # tensorstore reports ENOSPC as ValueError
            raise self._save_failed(step, e) from e
        if saved:
            self._pending = step
            if not self._async:
                self._finalize_pending()
        return bool(saved)

    def _finalize_pending(self) -> None:
        """Waits for the pending save, then writes its manifest and applies retention."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(step, e) from e
        error: OSError | None = None
        if self._primary:
            try:
                manifest = self._manifest_path(step)
                manifest.parent.mkdir(exist_ok=True)
                atomic_write_json(manifest, build_manifest(self._step_dir(step), step))
                fsync_dir(self.directory)
                self._apply_retention(newest=step)
            except OSError as e:
                error = e
        # Other processes must not list or restore steps while process 0 deletes some.
        _sync(f"resnet_jax_checkpoint_finalize_{step}")
        self._manager.reload()
        if error is not None:
            raise CheckpointError(
                f"checkpoint step {step} was saved in {self.directory} but writing its "
                f"manifest or pruning old steps failed: {error}; the step will be "
                "restored unverified"
            ) from error

    def _apply_retention(self, newest: int) -> None:
        verified_newer = 0
        for step in sorted(self._manager.all_steps(), reverse=True):
            if verified_newer >= self.max_to_keep:
                log.info("deleting old checkpoint step %d (%d newer verified)", step, verified_newer)
                self._manifest_path(step).unlink(missing_ok=True)
                _rmtree_via_rename(self._step_dir(step), self.directory / f"{_DELETING_PREFIX}{step}")
            elif step == newest or self._check(step)[0] == _OK:
                verified_newer += 1

    def wait(self) -> None:
        """Blocks until the last save is on disk, verified and pruned."""
        self._finalize_pending()

    def close(self) -> None:
        try:
            self._finalize_pending()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --------------------------------------------------------------- restoring

    def _check(self, step: int) -> tuple[str, str]:
        """(verdict, why) for `step` against its manifest; run on process 0."""
        path = self._manifest_path(step)
        if not path.exists():
            return _UNVERIFIED, (
                f"its manifest {path} is missing (the run probably stopped between "
                "the save and the manifest write)"
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            files = manifest["files"]
            if manifest["step"] != step or not isinstance(files, dict):
                raise ValueError(f"it describes step {manifest['step']!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return _UNVERIFIED, f"its manifest {path} is unreadable ({e})"
        try:
            problems = verify_files(self._step_dir(step), files)
        except (OSError, KeyError, TypeError) as e:
            problems = [f"verification failed: {e}"]
        return (_CORRUPT, "; ".join(problems)) if problems else (_OK, "")

    def _agreed_check(self, step: int) -> tuple[str, str]:
        if jax.process_count() == 1:
            return self._check(step)
        verdict, why = self._check(step) if self._primary else (_OK, "")
        code = multihost_utils.broadcast_one_to_all(np.int32(_VERDICTS.index(verdict)))
        verdict = _VERDICTS[int(code)]
        return verdict, why if self._primary else "see the log of process 0"

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.last_restore_warnings.append(message)

    def _restore_step(self, step: int, abstract: Any) -> tuple[Any, dict[str, Any]]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], dict(restored["metadata"] or {})

    def restore_latest(self, abstract_state: Any) -> RestoredCheckpoint | None:
        """Restores the newest good step onto the shapes, dtypes and shardings given.

        `abstract_state` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with the
        target shardings, so a checkpoint written on N devices restores onto M).
        Returns None when there is no checkpoint at all; raises `CheckpointError`
        listing every step and its fault when checkpoints exist but none is usable
        (starting from scratch over them silently would lose the run). Warnings about
        skipped steps are logged and kept in `last_restore_warnings`.
        """
        self._finalize_pending()
        self._manager.reload()
        self.last_restore_warnings = []
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree.map(_abstract_leaf, abstract_state)
        failures: dict[int, str] = {}
        for step in steps:
            verdict, why = self._agreed_check(step)
            if verdict == _CORRUPT:
                self._warn(
                    f"checkpoint step {step} in {self.directory} is damaged: {why}; trying an older step"
                )
                failures[step] = why
                continue
            if verdict == _UNVERIFIED:
                self._warn(
                    f"checkpoint step {step} in {self.directory} cannot be verified: {why}; "
                    "restoring it anyway"
                )
            try:
                state, metadata = self._restore_step(step, abstract)
            except Exception as e:  # any reader error means: try the previous step
                why = f"orbax could not restore it: {type(e).__name__}: {first_line(e, 800)}"
                self._warn(f"checkpoint step {step} in {self.directory}: {why}; trying an older step")
                failures[step] = why
                continue
            self._quarantine(failures)
            return RestoredCheckpoint(state, step, metadata)
        listing = "\n".join(f"  step {s}: {why}" for s, why in failures.items())
        raise CheckpointError(
            f"none of the checkpoints in {self.directory} can be restored:\n{listing}\n"
            "Move or delete the damaged steps (or choose another --workdir) to start afresh."
        )

    def _quarantine(self, failures: Mapping[int, str]) -> None:
        """Moves the damaged steps newer than the one restored out of orbax's sight."""
        if not failures:
            return
        if self._primary:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target_dir = self.directory / QUARANTINE_DIR
            target_dir.mkdir(exist_ok=True)
            for step, why in failures.items():
                target = target_dir / f"{step}-{stamp}"
                os.replace(self._step_dir(step), target)
                manifest = self._manifest_path(step)
                if manifest.exists():
                    os.replace(manifest, target_dir / f"{step}-{stamp}.manifest.json")
                (target_dir / f"{step}-{stamp}.reason.txt").write_text(why + "\n", encoding="utf-8")
                self._warn(
                    f"moved damaged checkpoint step {step} to {target}; delete it when no longer needed"
                )
            fsync_dir(self.directory)
        _sync("resnet_jax_checkpoint_quarantine")
        self._manager.reload()


def read_newest(directory: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(the saved state's items as numpy arrays, step) of the newest step under `directory`,
    read-only: for readers outside a training run (weight conversion, evaluation of someone
    else's run). Nothing under `directory` is created, moved, cleaned or locked. The step is
    checked against its manifest when it has one; a damaged or unreadable newest step is a
    `CheckpointError` naming it (a reader must not silently fall back to older weights)."""
    root = Path(os.path.abspath(os.fspath(directory)))
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)
    if not steps:
        raise CheckpointError(f"{root} holds no checkpoint step")
    step = steps[0]
    manifest = root / MANIFEST_DIR / f"{step}.json"
    if manifest.is_file():
        problems = verify_files(root / str(step), json.loads(manifest.read_text())["files"])
        if problems:
            raise CheckpointError(f"checkpoint step {step} under {root} is damaged: {problems[0]}")
    # create=False and no cleanup: reading must not touch someone else's directory.
    options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
    manager = ocp.CheckpointManager(
        root, options=options, item_handlers={"state": ocp.StandardCheckpointHandler()}
    )
    try:
        # Every array onto this process's first CPU device, whatever mesh wrote it: without a
        # target, orbax restores the saved shardings and refuses a run saved on another device
        # count ("Topology mismatch"), so an 8-GPU run could not be evaluated on a laptop.
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), saved)
        items = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
            "state"
        ]
    except Exception as e:  # orbax/tensorstore error types vary
        raise CheckpointError(
            f"cannot restore checkpoint step {step} under {root}: {type(e).__name__}: {first_line(e, 800)}"
        ) from None
    finally:
        manager.close()
    return jax.tree.map(np.asarray, items), step


def saved_item_names(directory: str | os.PathLike, step: int) -> set[str] | None:
    """The top-level names of the state items saved at `step` ('params', 'ema', ...), read from
    orbax's tree metadata without restoring anything; None when that cannot be read (a damaged
    step, another orbax layout), so that callers fall back to restoring and its own errors."""
    import ast

    try:
        meta = json.loads((Path(directory) / str(step) / "state" / "_METADATA").read_text(encoding="utf-8"))
        return {ast.literal_eval(key)[0] for key in meta["tree_metadata"]}
    except (OSError, ValueError, KeyError, TypeError, SyntaxError, IndexError):
        return None
