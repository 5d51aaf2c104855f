"""A subprocess for tests/test_parallel.py: trains or restores with a chosen device count.

The device count (XLA_FLAGS=--xla_force_host_platform_device_count=N) must be set before
JAX is imported, so each device count needs its own process; the parent sets it and
passes one JSON job description as argv[1]:

  {"mode": "train", "runs": [{"workdir": ..., "overrides": {...}, "out": "x.npz"}, ...],
   (a run may add "first_out": "y.npz", the arrays of its first checkpoint save)
   (a run may add "expect": "WorkdirError", "error_out": "path": see train())
   "hlo": "path.txt" (optional; "hlo_scan": false skips the scan's), "local_batch": "path.npz" (optional)}
  {"mode": "restore", "workdir": ..., "overrides": {...}, "out": "x.npz"}
  {"mode": "initialize", "distributed": {...}, "timeout_s": 20}

Outputs are .npz files of flattened arrays ("params/..." etc.), written by process 0.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _configs import tiny_config  # noqa: E402

from resnet_jax import models, parallel  # noqa: E402
from resnet_jax.data import batching, cifar  # noqa: E402
from resnet_jax.train import config as config_lib  # noqa: E402
from resnet_jax.train import feeding, loop, steps  # noqa: E402
from resnet_jax.train.checkpoint import Checkpointer  # noqa: E402
from resnet_jax.train.state import abstract_items, create_train_state  # noqa: E402

CIFAR_DIR = (
    Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10" / "cifar-10-batches-bin"
)


def flat_arrays(tree) -> dict[str, np.ndarray]:
    """Host copies of a pytree's leaves keyed by their path (state is replicated: each
    process can read it in full)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def capture_saves() -> dict:
    """Records the state of the last checkpoint save (what the run itself wrote to disk) and
    host copies of the first save's arrays ("first": (step, arrays))."""
    captured = {}
    original = Checkpointer.save

    def save(self, step, state, metadata=None, force=False):
        captured["step"], captured["state"] = step, state
        if "first" not in captured:
            captured["first"] = (step, flat_arrays(state))
        return original(self, step, state, metadata, force)

    Checkpointer.save = save
    return captured


def build_state(config):
    """A fresh state on this process's mesh, the way the trainer builds it."""
    parallel.initialize(config.distributed)
    mesh = parallel.make_mesh()
    derived = config_lib.validate(config, num_devices=mesh.devices.size)
    model = models.build_model(config.model.name, **config_lib.model_overrides(config.model))
    tx, _ = loop.build_optimizer(config, derived)
    state = create_train_state(
        model, tx, jax.random.fold_in(jax.random.key(config.seed), 0), (32, 32, 3), mesh
    )
    return mesh, state


def dump_hlo(config, path: str, scan: bool = True) -> None:
    """The optimised HLO of one train step as the trainer compiles it on CPU (to `path`),
    and (`scan`) of the fused `lax.scan` of two steps that GPUs and TPUs run (to `path` + ".scan")."""
    mesh, state = build_state(config)
    data = cifar.load_cifar10("binary", str(CIFAR_DIR), validation_size=0)
    device_data = feeding.put_on_devices(
        data, mesh, config.dataset.normalization, config.dataset.train_subset, config.dataset.eval_subset
    )
    step = functools.partial(steps.train_step, accumulate_steps=config.accumulate_steps)
    chunk = feeding.TrainChunk(step, mesh, seed=0, pad=4, flip=True, fuse=False)
    idx = batching.train_indices(0, 0, 2, config.batch_size, device_data.train.size)
    idx = parallel.host_to_global(idx, parallel.batch_sharded(mesh, axis=1))
    Path(path).write_text(chunk._step.lower(state, device_data, idx[0], chunk._aug_root).compile().as_text())
    if scan:
        Path(path + ".scan").write_text(
            chunk._scan.lower(state, device_data, idx, chunk._aug_root).compile().as_text()
        )


def local_batch_sum(path: str) -> None:
    """Each process contributes its own rows; process 0 records the global result."""
    mesh = parallel.make_mesh()
    rows = 2 * jax.local_device_count()
    local = {
        "image": np.full((rows, 3), jax.process_index() + 1, np.float32),
        "label": np.arange(rows, dtype=np.int32) + 100 * jax.process_index(),
    }
    batch = parallel.host_local_to_global(local, mesh)
    total = jax.jit(lambda b: (b["image"].sum(axis=1), b["label"]), out_shardings=parallel.replicated(mesh))(
        batch
    )
    if parallel.is_main_process():
        np.savez(
            path,
            image_rows=np.asarray(total[0]),
            label=np.asarray(total[1]),
            global_shape=np.array(batch["image"].shape),
        )


def train(job: dict) -> None:
    captured = capture_saves()
    for run in job["runs"]:
        captured.clear()
        config = tiny_config(CIFAR_DIR, **run["overrides"])
        try:
            loop.train_and_evaluate(config, run["workdir"])
        except Exception as e:
            # A run may be meant to fail ("expect": class name): each process records what it
            # raised (to "<error_out>.<process index>.json") and goes on with the next run.
            if type(e).__name__ != run.get("expect"):
                raise
            Path(f"{run['error_out']}.{jax.process_index()}.json").write_text(
                json.dumps({"error": type(e).__name__, "message": str(e)})
            )
            continue
        if parallel.is_main_process() and run.get("out"):
            np.savez(run["out"], step=captured["step"], **flat_arrays(captured["state"]))
            if run.get("first_out"):
                first_step, arrays = captured["first"]
                np.savez(run["first_out"], step=first_step, **arrays)
    if job.get("hlo"):
        dump_hlo(tiny_config(CIFAR_DIR, **job["runs"][0]["overrides"]), job["hlo"], job.get("hlo_scan", True))
    if job.get("local_batch"):
        local_batch_sum(job["local_batch"])


def restore(job: dict) -> None:
    config = tiny_config(CIFAR_DIR, **job["overrides"])
    _, state = build_state(config)
    with Checkpointer(Path(job["workdir"]) / "checkpoints", max_to_keep=5) as ckpt:
        restored = ckpt.restore_latest(abstract_items(state))
    shardings = {str(leaf.sharding) for leaf in jax.tree.leaves(restored.state)}
    np.savez(
        job["out"],
        step=restored.step,
        num_devices=jax.device_count(),
        shardings=sorted(shardings),
        **flat_arrays(restored.state),
    )


def initialize(job: dict) -> None:
    parallel.initialize(job["distributed"], timeout_s=job["timeout_s"])
    print(json.dumps({"process_count": jax.process_count(), "device_count": jax.device_count()}))


def main() -> None:
    job = json.loads(sys.argv[1])
    try:
        {"train": train, "restore": restore, "initialize": initialize}[job["mode"]](job)
    except Exception as e:  # the parent matches the class and message in stderr
        traceback.print_exc()
        print(f"WORKER-ERROR {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
