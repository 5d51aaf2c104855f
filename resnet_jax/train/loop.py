"""train_and_evaluate(config, workdir): the one way through a training run.

validate the config (before anything is read or compiled) -> start jax.distributed if
asked -> mesh -> workdir (config.json checked against an earlier run) -> data on the
devices -> model and state -> restore the newest good checkpoint -> compiled chunks of
K train steps -> evaluation, metrics, checkpoints -> results.json.

Crash safety lives here where it needs the loop: SIGTERM (the preemption notice of spot
VMs, TPU pods, Slurm and Kubernetes) is turned into "finish this chunk, save, stop with
PreemptedError"; a non-finite loss or norm stops the run before that state can be saved;
whatever ends the loop early, the pending asynchronous save is completed and verified
first, so the last good checkpoint is on disk when the process exits.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import models, parallel
from resnet_jax.data import batching, cifar
from resnet_jax.train import config as config_lib
from resnet_jax.train import feeding, optim, steps
from resnet_jax.train.checkpoint import Checkpointer
from resnet_jax.train.metrics import MetricsWriter, Progress, read_metrics
from resnet_jax.train.state import TrainState, abstract_items, create_train_state
from resnet_jax.train.workdir import atomic_write_json, prepare_workdir

log = logging.getLogger(__name__)


# Room for metrics.jsonl, TensorBoard files and orbax's small metadata files.
_DISK_MARGIN_BYTES = 64 << 20


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops, checkpoints are kept."""


class PreemptedError(RuntimeError):
    """SIGTERM arrived: a checkpoint of the current step was saved; rerunning resumes."""


class _PreemptionNotice:
    """Remembers a SIGTERM during training instead of dying mid-step.

    Only the main thread may install signal handlers; elsewhere (a notebook's worker
    thread) SIGTERM keeps its default meaning, said in a warning.
    """

    def __init__(self) -> None:
        self.received = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> "_PreemptionNotice":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        else:
            log.warning("not in the main thread: SIGTERM will kill the run without a final checkpoint")
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.received = True
        log.warning("SIGTERM received: finishing the current steps, saving a checkpoint, then stopping")

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            # None: the old handler was not set from Python; the default is the best guess.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

    def agreed(self) -> bool:
        """Whether any process got the notice: all must stop at the same step, or the
        ones still training would wait forever in their next collective."""
        if jax.process_count() == 1:
            return self.received
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.received))))


def build_optimizer(config: ml_collections.ConfigDict, derived: config_lib.Derived):
    schedule = optim.step_schedule(
        derived.learning_rate, derived.boundaries, config.schedule.decay_factor,
        derived.warmup_steps, derived.warmup_learning_rate, config.schedule.warmup)
    tx = optim.sgd(schedule, config.optimizer.momentum, config.optimizer.nesterov,
                   config.optimizer.weight_decay,
                   lambda params: optim.weight_decay_mask(params, config.optimizer.weight_decay_on))
    return tx, schedule


def _hardware() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind, "devices": jax.device_count(),
            "processes": jax.process_count(), "host": platform.node(), "jax": jax.__version__}


def _first_nonfinite(metrics: dict[str, np.ndarray]) -> int | None:
    """Index of the first step whose loss or norms are not finite.

    The loss alone is not enough: an update can overflow the parameters while the loss
    it was computed from is still finite, and that state must not be checkpointed.
    """
    ok = np.ones_like(metrics["loss"], dtype=bool)
    for name in ("loss", "grad_norm", "param_norm"):
        ok &= np.isfinite(metrics[name])
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else None


def _nonfinite_message(metrics: dict[str, np.ndarray], index: int, step: int, last_good: int | None,
                       directory: Path) -> str:
    values = ", ".join(f"{k} {metrics[k][index]}" for k in ("loss", "grad_norm", "param_norm"))
    return f"training diverged at step {step} ({values}); " + _nonfinite_where(last_good, directory)


def _nonfinite_where(last_good: int | None, directory: Path) -> str:
    if last_good is None:
        return "stopped without saving it; no checkpoint had been written yet"
    return (f"stopped without saving it: the last good checkpoint (step {last_good}) is kept in {directory}; "
            "lower optimizer.learning_rate (or add schedule.warmup_steps) and rerun with "
            "--config.allow_config_change=True to resume from it, or check the data")


@jax.jit
def _all_finite(items: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(items) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def checkpoint_bytes(state: TrainState) -> int:
    """Bytes one checkpoint of `state` holds (arrays only; works on abstract states)."""
    leaves = jax.tree.leaves(state.checkpoint_items())
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


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
    return max(0, (keep + 1) * step_bytes - existing) + _DISK_MARGIN_BYTES


def _finish_saves_quietly(checkpointer: Checkpointer, error: BaseException) -> None:
    """On the way out of a failed run: completes and verifies the pending save, so the
    last good checkpoint is durable, without hiding the error that ended the run.

    Finishing a save is collective across processes; an error seen by one process only
    (an interrupt, a local disk) would leave it waiting for the others forever, so with
    several processes only errors that all of them see (divergence) finish the save.
    """
    if jax.process_count() > 1 and not isinstance(error, NonFiniteLossError):
        return
    try:
        checkpointer.close()
    except Exception as e:  # the original error matters more; this one is logged
        log.error("while stopping, finishing the last checkpoint failed too: %s", e)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates as `config` says, in `workdir`; returns what results.json holds.

    Raises ConfigError, WorkdirError, DataError, CheckpointError for what a user can fix;
    NonFiniteLossError when training diverges; PreemptedError after SIGTERM and a save.
    """
    config_lib.validate(config)  # every field, before jax.distributed or any device work
    parallel.initialize(config.distributed)
    mesh = parallel.make_mesh()
    derived = config_lib.validate(config, num_devices=mesh.devices.size)
    main = parallel.is_main_process()
    wall_start = time.time()

    model = models.build_model(config.model.name, **config_lib.model_overrides(config.model))
    tx, schedule = build_optimizer(config, derived)
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    def init_state() -> TrainState:
        return create_train_state(model, tx, init_key, cifar.IMAGE_SHAPE, mesh)

    shapes = jax.eval_shape(init_state)  # sizes the disk check before anything is read

    workdir_path = prepare_workdir(
        workdir, config.to_dict(), allow_config_change=config.allow_config_change,
        ignore_keys=set(config_lib.RESUMABLE_CHANGES),
        override_hint="--config.allow_config_change=True",
        min_free_bytes=disk_space_needed(workdir, checkpoint_bytes(shapes), config.keep_checkpoints))

    data = cifar.load_cifar10(config.dataset.source, config.dataset.data_dir,
                              validation_size=config.dataset.validation_size)
    device_data = feeding.put_on_devices(data, mesh, config.dataset.normalization,
                                         config.dataset.train_subset, config.dataset.eval_subset)
    eval_split = "validation" if config.dataset.validation_size else "test"

    state = init_state()
    num_params = models.count_params(state.params)

    checkpointer = Checkpointer(workdir_path / "checkpoints", max_to_keep=config.keep_checkpoints)
    restored = checkpointer.restore_latest(abstract_items(state))
    start_step = 0
    if restored is not None:
        items, start_step, _ = restored
        state = state.replace_items(items)
    writer = MetricsWriter(workdir_path, enabled=main, tensorboard=config.tensorboard)
    writer.truncate_after(start_step)

    total = derived.total_steps
    batch = config.batch_size
    k = config.steps_per_dispatch
    if main:
        log.info("%s: %s parameters; %d steps of batch %d (%d per epoch of %d images), lr %.4g at batch %d; "
                 "%d devices, %d processes; %s", config.model.name, f"{num_params:,}", total, batch,
                 derived.steps_per_epoch, derived.num_train, derived.learning_rate, batch,
                 mesh.devices.size, jax.process_count(),
                 f"resuming at step {start_step}" if start_step else "starting from scratch")

    train_chunk = feeding.TrainChunk(steps.train_step, mesh, seed=config.seed,
                                     pad=config.dataset.pad, flip=config.dataset.flip)
    evaluate = feeding.make_evaluate(steps.eval_step, mesh)
    eval_idx, eval_mask = feeding.eval_arrays(device_data.test.size, config.eval_batch_size, mesh)
    idx_sharding = parallel.batch_sharded(mesh, axis=1)

    def indices(step: int, n: int) -> jax.Array:
        host = batching.train_indices(config.seed, step, n, batch, device_data.train.size)
        return parallel.host_to_global(host, idx_sharding)

    def run_eval(step: int, write: bool = True) -> dict[str, float]:
        out = jax.device_get(evaluate(state, device_data, eval_idx, eval_mask))
        count = float(out["count"])
        record = {"loss": float(out["loss_sum"]) / count, "error": float(out["wrong"]) / count,
                  "count": int(count)}
        if write:
            writer.write(step, eval_split, record)
        return record

    compile_s = train_chunk.compile(state, device_data, indices(start_step, k)) if start_step < total else 0.0

    progress = Progress(total=total, initial=start_step, enabled=main)
    # Evaluations of the run so far (before a resume), so that best_error covers them too.
    evals: list[tuple[int, float]] = [
        (r["step"], r["error"]) for r in (read_metrics(writer.path) if main and writer.path.exists() else [])
        if r["split"] == eval_split]
    sums = {"loss": 0.0, "error": 0.0, "n": 0}
    train_time = 0.0
    step = start_step
    last_good = start_step if restored is not None else None
    preempted = False
    try:
        with _PreemptionNotice() as notice:
            while step < total and not preempted:
                n = min(k, total - step)
                t0 = time.perf_counter()
                state, metrics = train_chunk(state, device_data, indices(step, n))
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - t0
                train_time += elapsed
                bad = _first_nonfinite(metrics)
                if bad is not None:
                    raise NonFiniteLossError(_nonfinite_message(metrics, bad, step + bad + 1, last_good,
                                                                checkpointer.directory))
                step += n
                sums["loss"] += float(np.sum(metrics["loss"]))
                sums["error"] += float(np.sum(metrics["error"]))
                sums["n"] += n
                progress.update(step, {"loss": float(np.mean(metrics["loss"])),
                                       "err": float(np.mean(metrics["error"]))}, n * batch / elapsed)
                if step % config.log_every_steps == 0 or step == total:
                    writer.write(step, "train", {
                        "loss": sums["loss"] / sums["n"], "error": sums["error"] / sums["n"],
                        "learning_rate": float(schedule(step - 1)),
                        "grad_norm": float(metrics["grad_norm"][-1]),
                        "param_norm": float(metrics["param_norm"][-1]),
                        "images_per_sec": n * batch / elapsed})
                    sums = {"loss": 0.0, "error": 0.0, "n": 0}
                if step % config.eval_every_steps == 0 or step == total:
                    record = run_eval(step)
                    evals.append((step, record["error"]))
                    progress.log(f"step {step}: {eval_split} error {100 * record['error']:.2f}% "
                                 f"loss {record['loss']:.4f} over {record['count']} images")
                preempted = notice.agreed() and step < total  # done anyway: finish normally
                if step % config.checkpoint_every_steps == 0 or step == total or preempted:
                    items = state.checkpoint_items()
                    # Finite loss and norms can still hide overflowed BatchNorm statistics.
                    if not bool(_all_finite(items)):
                        raise NonFiniteLossError(
                            f"training diverged at step {step} (loss and norms finite, but the state holds NaN "
                            "or infinite values: overflowed BatchNorm statistics?); "
                            + _nonfinite_where(last_good, checkpointer.directory))
                    checkpointer.save(step, items, {"config_name": config.model.name})
                    last_good = step
        checkpointer.wait()
    except BaseException as error:
        progress.close()
        writer.close()
        _finish_saves_quietly(checkpointer, error)
        raise
    progress.close()
    if preempted:
        writer.close()
        checkpointer.close()
        raise PreemptedError(
            f"preempted (SIGTERM) at step {step} of {total}; checkpoint step {step} is saved in "
            f"{checkpointer.directory}: rerun the same command to resume from it")

    if not evals or evals[-1][0] != step:
        # Resumed a finished run whose metrics.jsonl is gone (or not on this process):
        # evaluate again, without writing a second record for this step.
        evals.append((step, run_eval(step, write=False)["error"]))
    best_step, best_error = min(evals, key=lambda e: e[1])
    steps_run = step - start_step
    results = {
        "model": config.model.name,
        "params": num_params,
        "eval_split": eval_split,
        "final_error": evals[-1][1],
        "best_error": best_error,
        "best_step": best_step,
        "steps": step,
        "steps_this_run": steps_run,
        "resumed_from": start_step,
        "wall_clock_s": time.time() - wall_start,
        "compile_s": compile_s,
        "train_images_per_sec": steps_run * batch / train_time if train_time else None,
        "hardware": _hardware(),
    }
    if main:
        atomic_write_json(workdir_path / "results.json", results)
        log.info("done: %s error %.2f%% (best %.2f%% at step %d), %.0f s", eval_split,
                 100 * results["final_error"], 100 * best_error, best_step, results["wall_clock_s"])
    writer.close()
    checkpointer.close()
    return results
