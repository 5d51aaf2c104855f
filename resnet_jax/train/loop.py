"""train_and_evaluate(config, workdir): the one way through a training run.

Set-up: check the config (before anything is read or compiled) -> start jax.distributed if
asked -> mesh -> what the data holds (sizes, classes) -> the config against it -> model,
optimizer -> workdir (config.json checked against an earlier run) -> the data source ->
state (He init, or `init_from`) -> restore the newest good checkpoint.
The loop: chunks of K train steps from the source; log, evaluate and checkpoint at their
cadences. The end: results.json (after recomputing BN statistics if `bn_recalibration` asks).

The data source (`sources.py`) is the only part that knows which dataset this is.

Crash safety lives here where it needs the loop: SIGTERM (the preemption notice of spot
VMs, TPU pods, Slurm and Kubernetes) and a first Ctrl-C are turned into "finish this
chunk, save, stop with PreemptedError" (a second Ctrl-C stops at once); a non-finite
loss or norm stops the run before that state can be saved; whatever ends the loop early,
the pending asynchronous save is completed and verified first, so the last good
checkpoint is on disk when the process exits. The workdir is locked for the run's
duration (`prepare_workdir(lock=True)`): a second run in it is refused.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import files, models, parallel
from resnet_jax.data import normalization
from resnet_jax.errors import ResNetJaxError, UserError
from resnet_jax.files import atomic_write_json
from resnet_jax.train import config as config_lib
from resnet_jax.train import ema as ema_lib
from resnet_jax.train import recalibrate, sources, steps
from resnet_jax.train.checkpoint import Checkpointer, saved_item_names
from resnet_jax.train.metrics import MetricsWriter, Progress, read_metrics
from resnet_jax.train.optim import build_optimizer
from resnet_jax.train.plan import make_plan
from resnet_jax.train.state import TrainState, abstract_items, create_train_state
from resnet_jax.train.workdir import prepare_workdir, release_workdir

log = logging.getLogger(__name__)

# (path, the new run's initial variables, its model) -> variables read from `path` and
# matched to those shapes; raises a UserError for a file that does not fit.
WeightLoader = Callable[[str, Mapping[str, Any], Any], Mapping[str, Any]]


class NonFiniteLossError(ResNetJaxError, RuntimeError):
    """Training produced a NaN or infinite loss; the run stops, checkpoints are kept."""

    exit_status = 3


class PreemptedError(ResNetJaxError, RuntimeError):
    """SIGTERM (or Ctrl-C) arrived: a checkpoint of the current step was saved; rerunning resumes.

    `exit_status` is the shell's for a death by that signal (128 + signal number: 143, 130),
    so a scheduler sees the signal it sent, yet the checkpoint is on disk."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + int(signum)


class _PreemptionNotice:
    """Remembers a SIGTERM or a first Ctrl-C (SIGINT) during training instead of dying mid-step.

    A second Ctrl-C stops at once (KeyboardInterrupt): the way out when saving hangs. The
    asynchronous save already under way is still completed on the way out, as for any error
    (`_finish_saves_quietly`); once the handlers are restored, a third Ctrl-C abandons it too.
    Only the main thread may install signal handlers; elsewhere (a notebook's worker
    thread) the signals keep their default meaning, said in a warning.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = False
        self.signum: int | None = None
        self._installed = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _PreemptionNotice:
        if threading.current_thread() is threading.main_thread():
            for signum in self._SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            self._installed = True
        else:
            log.warning("not in the main thread: SIGTERM will kill the run without a final checkpoint")
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the save
        if self.received:
            return
        self.received = True
        self.signum = signum
        if signum == signal.SIGINT:
            log.warning(
                "Ctrl-C: finishing the current steps, saving a checkpoint, then stopping "
                "(Ctrl-C again stops at once, without it)"
            )
        else:
            log.warning("SIGTERM received: finishing the current steps, saving a checkpoint, then stopping")

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            for signum, previous in self._previous.items():
                # None: the old handler was not set from Python; the default is the best guess.
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)

    def agreed(self) -> bool:
        """Whether any process got the notice: all must stop at the same step, or the
        ones still training would wait forever in their next collective."""
        if jax.process_count() == 1:
            return self.received
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.received))))


def _hardware() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "host": platform.node(),
        "jax": jax.__version__,
    }


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


def _nonfinite_message(
    metrics: dict[str, np.ndarray], index: int, step: int, last_good: int | None, directory: Path
) -> str:
    values = ", ".join(f"{k} {metrics[k][index]}" for k in ("loss", "grad_norm", "param_norm"))
    return f"training diverged at step {step} ({values}); " + _nonfinite_where(last_good, directory)


def _nonfinite_where(last_good: int | None, directory: Path) -> str:
    if last_good is None:
        return "stopped without saving it; no checkpoint had been written yet"
    return (
        f"stopped without saving it: the last good checkpoint (step {last_good}) is kept in {directory}; "
        "lower optimizer.learning_rate (or add schedule.warmup_steps) and rerun with "
        "--config.allow_config_change=True to resume from it, or check the data"
    )


@jax.jit
def _all_finite(items: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(items) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def checkpoint_bytes(state: TrainState) -> int:
    """Bytes one checkpoint of `state` holds (arrays only; works on abstract states)."""
    leaves = jax.tree.leaves(state.checkpoint_items())
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


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


class _Run:
    """One training run's set-up and the per-chunk work; `train_and_evaluate` drives it."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, load_weights: WeightLoader | None):
        checked = config_lib.check_fields(config)  # every field, before jax.distributed or any device work
        if config.init_from and load_weights is None:
            raise config_lib.ConfigError(
                f"config field init_from = {config.init_from!r}: this caller of train_and_evaluate gave no "
                "weight loader; pass load_weights=resnet_jax.interop.weights.load_for_init (python -m "
                "resnet_jax.main does)"
            )
        self.load_weights = load_weights
        parallel.initialize(config.distributed)
        self.mesh = parallel.make_mesh()
        self.plan = make_plan(config, self.mesh.devices.size, checked=checked)
        self.info, self.derived, self.config = self.plan.info, self.plan.derived, config
        self.main = parallel.is_main_process()
        self.wall_start = time.time()

        model = self.plan.model
        tx, self.schedule = build_optimizer(config, self.derived)
        init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
        ema_settings = ema_lib.settings_from_config(config)
        init_state = lambda: create_train_state(  # noqa: E731
            model, tx, init_key, self.info.image_shape, self.mesh, ema_settings
        )
        shapes = jax.eval_shape(init_state)  # sizes the disk check before anything is read
        _check_same_ema(
            Path(os.path.abspath(os.path.expanduser(workdir))) / "checkpoints",
            ema_settings is not None,
            config,
        )
        self.workdir = prepare_workdir(
            workdir,
            config.to_dict(),
            allow_config_change=config.allow_config_change,
            ignore_keys=set(config_lib.RESUMABLE_CHANGES),
            override_hint="--config.allow_config_change=True",
            added_defaults=config_lib.defaults(config.dataset.name).to_dict(),
            min_free_bytes=files.disk_space_needed(
                workdir, checkpoint_bytes(shapes), config.keep_checkpoints
            ),
            lock=True,
        )
        try:
            self._set_up(config, model, init_state)
        except BaseException:
            release_workdir(self.workdir)
            raise

    def _set_up(self, config: ml_collections.ConfigDict, model: Any, init_state: Any) -> None:
        """Everything after the workdir is locked: the data source, the state, the checkpoints."""
        train_step = functools.partial(
            steps.train_step,
            label_smoothing=config.label_smoothing,
            accumulate_steps=config.accumulate_steps,
        )
        self.source = sources.build(config, self.mesh, self.info, train_step, steps.eval_step)
        self.state = init_state()
        self.num_params = models.count_params(self.state.params)
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
        if self.main:  # evaluating or exporting the run must not need its training data
            normalization.save(self.checkpointer.directory, self.source.normalization)
        restored = self.checkpointer.restore_latest(abstract_items(self.state))
        self.start_step = self.step = 0
        # Per-step train loss and error since the last train record: saved with each
        # checkpoint, so that the first record after a resume at a step between two records
        # averages the same steps as an uninterrupted run, and (summed exactly, by fsum, in
        # any grouping of steps into dispatches) to the same value.
        self.window: dict[str, list[float]] = {"loss": [], "error": []}
        if restored is not None:
            items, self.start_step, metadata = restored
            self.step = self.start_step
            self.window = {
                k: [float(v) for v in metadata.get("train_window", {}).get(k, [])] for k in self.window
            }
            self.state = self.state.replace_items(items)
        elif config.init_from:
            self.state = _init_from(self.state, config.init_from, model, self.load_weights)
        self.last_good = self.start_step if restored is not None else None
        self.writer = MetricsWriter(self.workdir, enabled=self.main, tensorboard=config.tensorboard)
        self.writer.truncate_after(self.start_step)
        # Evaluations of the run so far (before a resume), so that best_error covers them too.
        history = [
            r
            for r in (read_metrics(self.writer.path) if self.main and self.writer.path.exists() else [])
            if r["split"] == self.info.eval_split
        ]
        self.evals: list[tuple[int, float]] = [(r["step"], r["error"]) for r in history]
        self.ema_evals: list[tuple[int, float]] = [
            (r["step"], r["ema_error"]) for r in history if "ema_error" in r
        ]
        self.train_time = 0.0
        self.progress: Progress | None = None

    @property
    def total(self) -> int:
        return self.derived.total_steps

    def start(self) -> None:
        c, d = self.config, self.derived
        if self.main:
            log.info(
                "%s on %s: %s parameters; %d steps of batch %d (%d per epoch of %d images), lr %.4g; %s",
                c.model.name,
                parallel.describe_devices(self.mesh.devices.flat),
                f"{self.num_params:,}",
                d.total_steps,
                c.batch_size,
                d.steps_per_epoch,
                d.num_train,
                d.learning_rate,
                f"resuming at step {self.start_step}"
                if self.start_step
                else f"starting from the weights of {c.init_from}"
                if c.init_from
                else "starting from scratch",
            )
        self.compile_s = (
            self.source.compile(self.state, self.step, self._chunk_size()) if self.step < self.total else 0.0
        )
        self.progress = Progress(total=self.total, initial=self.start_step, enabled=self.main)

    def _chunk_size(self) -> int:
        return min(self.config.steps_per_dispatch, self.total - self.step)

    def train_chunk(self) -> dict[str, np.ndarray]:
        """The next K steps; stops the run before a diverged state can be saved."""
        n = self._chunk_size()
        t0 = time.perf_counter()
        self.state, metrics = self.source.train(self.state, self.step, n)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - t0
        self.train_time += elapsed
        bad = _first_nonfinite(metrics)
        if bad is not None:
            raise NonFiniteLossError(
                _nonfinite_message(
                    metrics, bad, self.step + bad + 1, self.last_good, self.checkpointer.directory
                )
            )
        self.step += n
        metrics["images_per_sec"] = n * self.config.batch_size / elapsed
        return metrics

    def log_train(self, metrics: dict[str, np.ndarray]) -> None:
        for key, values in self.window.items():
            values.extend(float(v) for v in metrics[key])
        self.progress.update(
            self.step,
            {"loss": float(np.mean(metrics["loss"])), "err": float(np.mean(metrics["error"]))},
            metrics["images_per_sec"],
        )
        if self.step % self.config.log_every_steps and self.step != self.total:
            return
        n = len(self.window["loss"])
        self.writer.write(
            self.step,
            "train",
            {
                "loss": math.fsum(self.window["loss"]) / n,
                "error": math.fsum(self.window["error"]) / n,
                "learning_rate": float(self.schedule(self.step - 1)),
                "grad_norm": float(metrics["grad_norm"][-1]),
                "param_norm": float(metrics["param_norm"][-1]),
                "images_per_sec": metrics["images_per_sec"],
            },
        )
        self.window = {k: [] for k in self.window}

    def evaluate(self, write: bool = True) -> dict[str, float]:
        record = steps.summarize_eval(self.source.evaluate(self.state))
        if self.state.ema is not None:  # the averaged weights, on the same images: ema_error, ...
            averaged = steps.summarize_eval(self.source.evaluate(ema_lib.averaged(self.state)))
            record.update({f"ema_{k}": v for k, v in averaged.items() if k != "count"})
        if write:
            self.writer.write(self.step, self.info.eval_split, record)
        return record

    def maybe_evaluate(self) -> None:
        if self.step % self.config.eval_every_steps and self.step != self.total:
            return
        record = self.evaluate()
        self.evals.append((self.step, record["error"]))
        ema_note = ""
        if "ema_error" in record:
            self.ema_evals.append((self.step, record["ema_error"]))
            ema_note = f"; EMA weights {100 * record['ema_error']:.2f}%"
        self.progress.log(
            f"step {self.step}: {self.info.eval_split} error {100 * record['error']:.2f}% "
            f"(top-5 {100 * record['error_top5']:.2f}%) loss {record['loss']:.4f} "
            f"over {record['count']} images{ema_note}"
        )

    def maybe_checkpoint(self, force: bool = False) -> None:
        if self.step % self.config.checkpoint_every_steps and self.step != self.total and not force:
            return
        items = self.state.checkpoint_items()
        # Finite loss and norms can still hide overflowed BatchNorm statistics.
        if not bool(_all_finite(items)):
            raise NonFiniteLossError(
                f"training diverged at step {self.step} (loss and norms finite, but the state holds NaN "
                "or infinite values: overflowed BatchNorm statistics?); "
                + _nonfinite_where(self.last_good, self.checkpointer.directory)
            )
        self.checkpointer.save(
            self.step, items, {"config_name": self.config.model.name, "train_window": self.window}
        )
        self.last_good = self.step

    def abort(self, error: BaseException) -> None:
        try:
            if self.progress is not None:
                self.progress.close()
            self.writer.close()
            _finish_saves_quietly(self.checkpointer, error)
        finally:
            release_workdir(self.workdir)

    def close(self) -> None:
        try:
            self.progress.close()
            self.writer.close()
            self.checkpointer.close()
        finally:
            release_workdir(self.workdir)

    def recalibrate_bn(self, error_before: float) -> dict[str, Any]:
        """`bn_recalibration`: BN statistics over N training images (train/recalibrate.py), the
        test error with them, and the weights with them saved in `<workdir>/bn_recalibrated`."""
        n, start = self.config.bn_recalibration.num_images, time.perf_counter()
        piece = self.plan.bn_piece
        pieces = self.source.recalibration_pieces(n, piece)
        stats = recalibrate.recalibrated_batch_stats(self.plan.model, self.state.variables, pieces)
        record = steps.summarize_eval(self.source.evaluate(self.state.replace(batch_stats=stats)))
        meta = {"num_images": n, "piece_size": piece, "config_name": self.config.model.name}
        saved = recalibrate.save(
            self.workdir / recalibrate.DIRECTORY, self.step, self.state.params, stats, meta
        )
        if self.main:  # only process 0 holds the error before (the others hold no history)
            self.progress.log(
                f"BN statistics recomputed over {n} training images: {self.info.eval_split} error "
                f"{100 * record['error']:.2f}% (moving averages {100 * error_before:.2f}%)"
            )
        return {
            **meta,
            "error_moving_averages": error_before,
            "error": record["error"],
            "error_top5": record["error_top5"],
            "loss": record["loss"],
            "seconds": time.perf_counter() - start,
            "checkpoint": saved.name,  # in the workdir
        }

    def results(self) -> dict[str, Any]:
        # Resumed a finished run whose metrics.jsonl lacks the final evaluation: evaluate
        # again, without writing a second record for this step. Only process 0 reads
        # metrics.jsonl, and evaluating is collective, so all follow its decision.
        again = not self.evals or self.evals[-1][0] != self.step
        if jax.process_count() > 1:
            again = bool(multihost_utils.broadcast_one_to_all(np.int32(again)))
        if again:
            record = self.evaluate(write=False)
            self.evals.append((self.step, record["error"]))
            if "ema_error" in record:
                self.ema_evals.append((self.step, record["ema_error"]))
        # The other processes hold no history: their results carry the final step only.
        best_step, best_error = min(self.evals, key=lambda e: e[1]) if self.evals else (self.step, None)
        steps_run = self.step - self.start_step
        return {
            "model": self.config.model.name,
            "dataset": self.config.dataset.name,
            "params": self.num_params,
            "eval_split": self.info.eval_split,
            "final_error": self.evals[-1][1] if self.evals else None,
            "best_error": best_error,
            "best_step": best_step,
            "steps": self.step,
            "steps_this_run": steps_run,
            "resumed_from": self.start_step,
            "wall_clock_s": time.time() - self.wall_start,
            "compile_s": self.compile_s,
            "train_images_per_sec": steps_run * self.config.batch_size / self.train_time
            if self.train_time
            else None,
            "hardware": _hardware(),
        } | self._ema_results()

    def _ema_results(self) -> dict[str, Any]:
        """The averaged weights' figures, as final_error/best_error/best_step are the raw ones'."""
        if self.state.ema is None:
            return {}
        best_step, best_error = (
            min(self.ema_evals, key=lambda e: e[1]) if self.ema_evals else (self.step, None)
        )
        return {
            "ema_final_error": self.ema_evals[-1][1] if self.ema_evals else None,
            "ema_best_error": best_error,
            "ema_best_step": best_step,
        }


def _check_same_ema(checkpoints: Path, keeps_ema: bool, config: ml_collections.ConfigDict) -> None:
    """A resumed run keeps the weights' moving average as its checkpoints do: switching it on or
    off would fail every restore, with an error that blames the checkpoints. Checked before the
    workdir's config.json is touched, on the newest step's saved item names."""
    saved = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []
    names = saved_item_names(checkpoints, max(saved)) if saved else None
    if names is None or ("ema" in names) == keeps_ema:
        return
    raise config_lib.ConfigError(
        f"config field ema.decay = {config.ema.decay!r}: the checkpoints in {checkpoints} were written "
        f"{'with' if 'ema' in names else 'without'} a moving average of the weights, and it cannot be "
        "switched on or off in a resumed run; keep ema.decay as it was, or start a new workdir with "
        f"--config.init_from={checkpoints.parent} to start from these weights"
    )


def _init_from(state: TrainState, path: str, model: Any, load_weights: WeightLoader) -> TrainState:
    """The new run's weights from a converted or trained checkpoint (fine-tuning), through the
    loader the caller handed in; the momentum starts at zero either way."""
    try:
        variables = load_weights(path, state.variables, model)
    except UserError as e:
        raise config_lib.ConfigError(f"config field init_from = {path!r}: {e}") from None
    # The average restarts at the loaded weights, not at the discarded initialisation.
    return ema_lib.reset(state.replace(params=variables["params"], batch_stats=variables["batch_stats"]))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, load_weights: WeightLoader | None = None
) -> dict[str, Any]:
    """Trains and evaluates as `config` says, in `workdir`; returns what results.json holds.

    `load_weights(path, target_variables, model) -> variables` reads `config.init_from` (the
    command line passes `resnet_jax.interop.weights.load_for_init`); the trainer knows no
    weight-file format. A run with `init_from` and no loader is refused before anything runs.

    Raises ConfigError, WorkdirError, DataError, CheckpointError for what a user can fix;
    NonFiniteLossError when training diverges; PreemptedError after SIGTERM or Ctrl-C and a save.
    """
    run = _Run(config, workdir, load_weights)
    preempted = False
    try:
        run.start()
        with _PreemptionNotice() as notice:
            while run.step < run.total and not preempted:
                metrics = run.train_chunk()
                run.log_train(metrics)
                run.maybe_evaluate()
                preempted = notice.agreed() and run.step < run.total  # done anyway: finish normally
                run.maybe_checkpoint(force=preempted)
        run.checkpointer.wait()
    except BaseException as error:
        run.abort(error)
        raise
    if preempted:
        run.close()
        # Another process's SIGTERM stops this one too: it says SIGTERM.
        signum = notice.signum if notice.signum is not None else signal.SIGTERM
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "preempted (SIGTERM)"
        raise PreemptedError(
            f"{what} at step {run.step} of {run.total}; checkpoint step {run.step} is saved in "
            f"{run.checkpointer.directory}: rerun the same command to resume from it",
            signum=signum,
        )
    results = run.results()
    if config.bn_recalibration.num_images:
        try:
            results["bn_recalibration"] = run.recalibrate_bn(results["final_error"])
        except BaseException as error:
            run.abort(error)
            raise
    if run.main:
        atomic_write_json(run.workdir / "results.json", results)
        log.info(
            "done: %s error %.2f%% (best %.2f%% at step %d), %.0f s; results in %s",
            results["eval_split"],
            100 * results["final_error"],
            100 * results["best_error"],
            results["best_step"],
            results["wall_clock_s"],
            run.workdir / "results.json",
        )
    run.close()
    return results
