"""train_and_evaluate(config, workdir): the one way through a training run.

validate the config (before anything is read or compiled) -> start jax.distributed if
asked -> mesh -> workdir (config.json checked against an earlier run) -> data on the
devices -> model and state -> restore the newest good checkpoint -> compiled chunks of
K train steps -> evaluation, metrics, checkpoints -> results.json.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import models, parallel
from resnet_jax.data import batching, cifar
from resnet_jax.train import config as config_lib
from resnet_jax.train import feeding, optim, steps
from resnet_jax.train.checkpoint import Checkpointer
from resnet_jax.train.metrics import MetricsWriter, Progress
from resnet_jax.train.state import TrainState, abstract_items, create_train_state
from resnet_jax.train.workdir import atomic_write_json, prepare_workdir

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops, checkpoints are kept."""


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


def _first_nonfinite(values: np.ndarray) -> int | None:
    bad = np.flatnonzero(~np.isfinite(values))
    return int(bad[0]) if bad.size else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates as `config` says, in `workdir`; returns what results.json holds."""
    config_lib.validate(config)  # every field, before jax.distributed or any device work
    parallel.initialize(config.distributed)
    mesh = parallel.make_mesh()
    derived = config_lib.validate(config, num_devices=mesh.devices.size)
    main = parallel.is_main_process()
    wall_start = time.time()

    workdir_path = prepare_workdir(
        workdir, config.to_dict(), allow_config_change=config.allow_config_change,
        ignore_keys=set(config_lib.RESUMABLE_CHANGES),
        override_hint="--config.allow_config_change=True")

    data = cifar.load_cifar10(config.dataset.source, config.dataset.data_dir,
                              validation_size=config.dataset.validation_size)
    device_data = feeding.put_on_devices(data, mesh, config.dataset.normalization,
                                         config.dataset.train_subset, config.dataset.eval_subset)
    eval_split = "validation" if config.dataset.validation_size else "test"

    model = models.build_model(config.model.name, **config_lib.model_overrides(config.model))
    tx, schedule = build_optimizer(config, derived)
    root = jax.random.key(config.seed)
    state = create_train_state(model, tx, jax.random.fold_in(root, 0), data.train_images.shape[1:], mesh)
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

    def run_eval(step: int) -> dict[str, float]:
        out = jax.device_get(evaluate(state, device_data, eval_idx, eval_mask))
        count = float(out["count"])
        record = {"loss": float(out["loss_sum"]) / count, "error": float(out["wrong"]) / count,
                  "count": int(count)}
        writer.write(step, eval_split, record)
        return record

    compile_s = train_chunk.compile(state, device_data, indices(start_step, k)) if start_step < total else 0.0

    progress = Progress(total=total, initial=start_step, enabled=main)
    evals: list[tuple[int, float]] = []
    sums = {"loss": 0.0, "error": 0.0, "n": 0}
    train_time = 0.0
    step = start_step
    last_good = checkpointer.latest_step()
    try:
        while step < total:
            n = min(k, total - step)
            t0 = time.perf_counter()
            state, metrics = train_chunk(state, device_data, indices(step, n))
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - t0
            train_time += elapsed
            bad = _first_nonfinite(metrics["loss"])
            if bad is not None:
                raise NonFiniteLossError(
                    f"loss became {metrics['loss'][bad]} at step {step + bad + 1}; stopping. "
                    + (f"The last good checkpoint (step {last_good}) is kept in {checkpointer.directory}; "
                       "lower optimizer.learning_rate or check the data before resuming."
                       if last_good is not None else "No checkpoint had been written yet."))
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
                    "grad_norm": float(metrics["grad_norm"][-1]), "param_norm": float(metrics["param_norm"][-1]),
                    "images_per_sec": n * batch / elapsed})
                sums = {"loss": 0.0, "error": 0.0, "n": 0}
            if step % config.eval_every_steps == 0 or step == total:
                record = run_eval(step)
                evals.append((step, record["error"]))
                progress.log(f"step {step}: {eval_split} error {100 * record['error']:.2f}% "
                             f"loss {record['loss']:.4f} over {record['count']} images")
            if step % config.checkpoint_every_steps == 0 or step == total:
                checkpointer.save(step, state.checkpoint_items(), {"config_name": config.model.name})
                last_good = step
    finally:
        progress.close()
    checkpointer.wait()

    if not evals:  # resumed a finished run: report its final evaluation again
        evals.append((step, run_eval(step)["error"]))
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
