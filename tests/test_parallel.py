"""Scale-out: 1 device, 8 simulated devices and 2 real processes run the same trainer.

Device counts are fixed when JAX starts, so every run happens in a subprocess
(tests/_multiprocess_worker.py) with its own XLA_FLAGS; the subprocesses share one
persistent compilation cache. Every subprocess has a timeout and is killed on failure.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _configs import tiny_config

from resnet_jax import parallel
from resnet_jax.files import atomic_write_json
from resnet_jax.train import config as config_lib
from resnet_jax.train import loop
from resnet_jax.train.metrics import read_metrics

WORKER = Path(__file__).resolve().parent / "_multiprocess_worker.py"
TIMEOUT_S = 240

# 8 steps, one per dispatch, so metrics.jsonl holds every step's loss; eval batch 200
# divides by 8 devices (the tiny config's 250 does not).
STEPS = {
    "schedule__total_steps": 8,
    "schedule__boundaries": [6],
    "steps_per_dispatch": 1,
    "log_every_steps": 1,
    "eval_every_steps": 8,
    "checkpoint_every_steps": 4,
    "eval_batch_size": 200,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(job: dict, devices: int, cache_dir: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PLATFORMS="cpu",
    )
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(job)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple[int, str, str]]:
    """Waits for all; kills every one still running if any times out."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def run_ok(procs: list[subprocess.Popen]) -> list[str]:
    results = finish(procs)
    for rc, _, err in results:
        assert rc == 0, err[-4000:]
    return [out for _, out, _ in results]


def train_losses(workdir: Path) -> np.ndarray:
    return np.array([r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"])


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_trees_close(a: dict, b: dict, rel: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        scale = max(float(np.max(np.abs(a[k]))), 1e-3)
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=rel * scale, err_msg=k)


@pytest.fixture(scope="module")
def one_vs_eight(tmp_path_factory, cache_dir):
    """Global BN and ghost BN (G=4: one group per device; G=2: two groups per device) runs on
    1 device and on 8, in two concurrent processes."""
    root = tmp_path_factory.mktemp("scale")
    procs, runs = [], {}
    for devices in (1, 8):
        job = {"mode": "train", "runs": [], "hlo": str(root / f"hlo{devices}.txt") if devices == 8 else None}
        for bn, extra in (
            ("global", {"checkpoint_every_steps": 1}),
            ("ghost4", {"model__ghost_batch_size": 4}),
            ("ghost2", {"model__ghost_batch_size": 2, "checkpoint_every_steps": 1}),
        ):
            name = f"{bn}_{devices}"
            runs[name] = root / name
            run = {
                "workdir": str(root / name),
                "overrides": {**STEPS, **extra},
                "out": str(root / f"{name}.npz"),
            }
            if bn in ("global", "ghost2"):  # checkpointed every step: the first save is step 1's state
                run["first_out"] = str(root / f"{name}.step1.npz")
            job["runs"].append(run)
        procs.append(start(job, devices, cache_dir))
    run_ok(procs)
    return root, runs


def test_eight_devices_train_like_one_with_global_batchnorm(one_vs_eight):
    """One SGD step on 8 devices equals one on 1 device to float rounding; 8 steps stay on
    the same loss trajectory.

    Only float32 sums are reordered (8 partial sums + an all-reduce): after one step every
    array agreed to <= 9e-7 of its scale when measured. Training then amplifies that
    rounding, by how much depends on the CPU's kernels: after 8 steps of this tiny
    config (batch 32, 4 per device) the arrays differed by up to 6e-6 of their scale on one
    machine and 5e-2 (momentum of BN parameters) on another, deterministically, with the
    losses within 5e-5 of each other. So the final states are not compared; per-device BN
    statistics (the ghost test below) move the losses by ~5e-2.
    """
    root, runs = one_vs_eight
    one, eight = load(root / "global_1.npz"), load(root / "global_8.npz")
    assert int(one.pop("step")) == int(eight.pop("step")) == 8
    one_1, eight_1 = load(root / "global_1.step1.npz"), load(root / "global_8.step1.npz")
    assert int(one_1.pop("step")) == int(eight_1.pop("step")) == 1
    assert len(one_1) > 50
    assert_trees_close(one_1, eight_1, rel=1e-5)
    losses_1, losses_8 = train_losses(runs["global_1"]), train_losses(runs["global_8"])
    assert len(losses_1) == len(losses_8) == 8
    # The first loss is a mean of 32 per-example losses summed in another order (within
    # 32 u = 1.9e-6 of it); the second is computed from step-1 states equal to 1e-5 of scale.
    np.testing.assert_allclose(losses_8[:2], losses_1[:2], rtol=1e-5)
    np.testing.assert_allclose(losses_8, losses_1, rtol=5e-4)
    results = json.loads((runs["global_8"] / "results.json").read_text())
    assert results["hardware"]["devices"] == 8


def test_ghost_batchnorm_is_per_group_and_independent_of_the_device_count(one_vs_eight):
    root, runs = one_vs_eight
    ghost1, glob = load(root / "ghost4_1.npz"), load(root / "global_1.npz")
    # Groups are runs of 4 consecutive examples; device shards are runs of 4 too, so the
    # statistics cover the same examples on 1 device and on 8. Statistics of 4 examples
    # amplify round-off (1 / sqrt(var) of tiny variances): the losses drift apart by
    # ~1e-4 over 8 steps when measured, against ~5e-2 between ghost and global BN.
    ghost_1, ghost_8, global_1 = (train_losses(runs[n]) for n in ("ghost4_1", "ghost4_8", "global_1"))
    np.testing.assert_allclose(ghost_8, ghost_1, rtol=0, atol=1e-3)
    assert np.max(np.abs(ghost_1 - global_1)) > 1e-2
    stats = "['batch_stats']['stem_bn']['var']"
    gap = np.max(np.abs(ghost1[stats] - glob[stats])) / np.max(np.abs(glob[stats]))
    assert gap > 1e-2, "ghost batches of 4 must give other running BN statistics than the global batch"


def test_ghost_groups_smaller_than_the_per_device_batch_are_independent_of_the_device_count(one_vs_eight):
    """G=2 with 4 examples per device: two groups on each device, the same 16 groups of
    consecutive examples on 1 device and on 8, so the same step to round-off, and other
    losses than with G=4.

    Compared where rounding has not been amplified, as for global BN above: the state after
    one step (parameters, momentum and the groups' running BN statistics) within 1e-5 of
    each array's scale, measured 5.7e-7 (17x room); the first two losses (the second is
    computed from that state) within 1e-5 relative, measured 1.0e-7 (one float32 ulp; a
    mean of 32 terms summed in another order is within 32 u = 1.9e-6). Groups that
    differed between 1 and 8 devices would move the step-1 BN statistics by O(1); G=4
    already moves the first loss by 2.7e-3 relative. Later steps are not compared: BN over
    2 values divides round-off by tiny standard deviations; the losses drifted apart by
    7e-5 at step 5 and 2.3e-4 at step 8 on one machine, by factors that depend on the
    CPU's kernels.
    """
    root, runs = one_vs_eight
    ghost2_1, ghost2_8, ghost4_1 = (train_losses(runs[n]) for n in ("ghost2_1", "ghost2_8", "ghost4_1"))
    assert len(ghost2_1) == len(ghost2_8) == 8
    one_1, eight_1 = load(root / "ghost2_1.step1.npz"), load(root / "ghost2_8.step1.npz")
    assert int(one_1.pop("step")) == int(eight_1.pop("step")) == 1
    assert len(one_1) > 50 and any("batch_stats" in k for k in one_1)
    assert_trees_close(one_1, eight_1, rel=1e-5)
    np.testing.assert_allclose(ghost2_8[:2], ghost2_1[:2], rtol=1e-5)
    assert abs(ghost2_1[0] - ghost4_1[0]) > 1e-3  # the first step already tells G=2 from G=4
    assert np.max(np.abs(ghost2_1 - ghost4_1)) > 1e-2


def test_each_device_gathers_only_its_share_of_the_batch(one_vs_eight):
    """In the compiled 8-device step no image-sized array crosses devices.

    Each device gathers 4 of the 32 images from its replica of the data set; the only
    collectives are all-reduces of gradients, BN statistics and metrics.
    """
    root, _ = one_vs_eight
    # The step-by-step path CPUs run and the fused lax.scan of two steps GPUs/TPUs run.
    for name in ("hlo8.txt", "hlo8.txt.scan"):
        hlo = (root / name).read_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" not in hlo, name
        assert "u8[4,1,32,32,3]" in hlo and "u8[32," not in hlo, name
        assert "all-reduce" in hlo, name
    assert "while" in (root / "hlo8.txt.scan").read_text()  # the scan really is a loop there


def test_two_processes_agree_with_one_stop_together_and_one_process_restores(
    tmp_path, cache_dir, cifar_dir, one_vs_eight
):
    """One pair of processes (2 x 2 devices) runs three jobs in turn: a workdir holding another
    config (both must refuse it), a run that gets SIGTERM on process 1 only (both must stop at
    the same step), and the rerun that finishes it."""
    workdir, mismatch = tmp_path / "run", tmp_path / "mismatch"
    mismatch.mkdir()
    atomic_write_json(
        mismatch / "config.json", tiny_config(cifar_dir, **STEPS, optimizer__learning_rate=0.2).to_dict()
    )
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(2):
        overrides = {
            **STEPS,
            "distributed__coordinator_address": address,
            "distributed__num_processes": 2,
            "distributed__process_id": pid,
        }
        job = {
            "mode": "train",
            "local_batch": str(tmp_path / "local_batch.npz"),
            "runs": [
                {
                    "workdir": str(mismatch),
                    "overrides": overrides,
                    "expect": "WorkdirError",
                    "error_out": str(tmp_path / "mismatch"),
                },
                {
                    "workdir": str(workdir),
                    "overrides": overrides,
                    "expect": "PreemptedError",
                    "error_out": str(tmp_path / "preempted"),
                },
                {"workdir": str(workdir), "overrides": overrides, "out": str(tmp_path / "saved.npz")},
            ],
        }
        procs.append(start(job, 2, cache_dir))
    # SIGTERM to process 1 alone, once two steps are logged (6 steps are then left to stop in).
    metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if metrics.is_file() and metrics.read_text().count('"split": "train"') >= 2:
            # Frozen while the signal is sent: it lands where the two steps were seen,
            # however fast the machine (else the run could end before it is handled).
            for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGCONT):
                procs[1].send_signal(sig)
            break
        time.sleep(0.01)
    run_ok(procs)

    # The config mismatch, seen by process 0 only, stopped both with the same error and
    # before anything was trained (with the check on process 0 alone, process 1 went on
    # into collectives and waited for JAX's coordination timeout).
    refused = [json.loads((tmp_path / f"mismatch.{pid}.json").read_text()) for pid in range(2)]
    assert refused[0] == refused[1] and refused[0]["error"] == "WorkdirError"
    assert (
        "different config" in refused[0]["message"]
        and "optimizer.learning_rate: 0.2 -> 0.05" in refused[0]["message"]
    )
    assert not (mismatch / "checkpoints").exists()
    # SIGTERM to one process: both stopped at the same step, saved it, and the rerun resumed there.
    stopped = [json.loads((tmp_path / f"preempted.{pid}.json").read_text()) for pid in range(2)]
    steps_at = [int(re.search(r"at step (\d+) of 8", s["message"]).group(1)) for s in stopped]
    assert steps_at[0] == steps_at[1] and 2 <= steps_at[0] < 8, stopped
    results = json.loads((workdir / "results.json").read_text())
    assert results["resumed_from"] == steps_at[0] and results["steps"] == 8
    assert results["hardware"]["processes"] == 2 and results["hardware"]["devices"] == 4
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"] == list(
        range(1, 9)
    )
    # Two processes (4 devices) against one process on one device: the same data, the same
    # steps, but the batch sums are split into 4 partial sums joined by a gloo all-reduce, so
    # float32 round-off differs (measured: ~1e-7 relative at step 1) and training amplifies
    # it step by step; hence only the first three steps, at 1e-5.
    _, runs = one_vs_eight
    np.testing.assert_allclose(train_losses(workdir)[:3], train_losses(runs["global_1"])[:3], rtol=1e-5)
    assert np.any(train_losses(workdir)[:3] != train_losses(workdir)[0])  # three different losses

    # Each process contributed its own 4 rows (values p + 1, labels 100 p + i) to a global batch of 8.
    batch = load(tmp_path / "local_batch.npz")
    assert batch["global_shape"].tolist() == [8, 3]
    np.testing.assert_array_equal(batch["image_rows"], [3] * 4 + [6] * 4)
    np.testing.assert_array_equal(batch["label"], [0, 1, 2, 3, 100, 101, 102, 103])

    restore = {
        "mode": "restore",
        "workdir": str(workdir),
        "overrides": STEPS,
        "out": str(tmp_path / "restored.npz"),
    }
    run_ok([start(restore, 1, cache_dir)])
    saved, restored = load(tmp_path / "saved.npz"), load(tmp_path / "restored.npz")
    assert int(saved.pop("step")) == int(restored.pop("step")) == 8
    assert int(restored.pop("num_devices")) == 1
    assert restored.pop("shardings").tolist() == [
        str(parallel.replicated(parallel.make_mesh(jax.devices()[:1])))
    ]
    assert sorted(saved) == sorted(restored) and len(saved) > 50
    for k in saved:
        np.testing.assert_array_equal(restored[k], saved[k], err_msg=k)


def test_a_process_told_another_process_count_is_refused(cache_dir):
    address = f"127.0.0.1:{free_port()}"
    jobs = [
        {
            "mode": "initialize",
            "timeout_s": 20,
            "distributed": {"coordinator_address": address, "num_processes": n, "process_id": pid},
        }
        for pid, n in ((0, 2), (1, 3))
    ]
    results = finish([start(job, 1, cache_dir) for job in jobs], timeout=90)
    rc, _, err = results[1]
    assert rc != 0
    assert "WORKER-ERROR DistributedError: config.distributed.num_processes = 3 but 2 processes joined" in err


def test_batch_that_does_not_divide_by_the_devices_is_refused_before_compiling(
    cifar_dir, tmp_path, monkeypatch
):
    config = tiny_config(cifar_dir, batch_size=30, eval_batch_size=200)
    with pytest.raises(config_lib.ConfigError, match=r"batch_size = 30 does not divide by the 4 devices"):
        config_lib.validate(config, num_devices=4)
    # Through the trainer: refused after the mesh is known, before the workdir, data or a compile.
    monkeypatch.setattr(parallel, "make_mesh", lambda: parallel.Mesh(np.array(jax.devices() * 4), ("data",)))
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before refusing the config"))
    with pytest.raises(config_lib.ConfigError, match="batch_size = 30"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_process_id_beyond_the_process_count_is_refused(cifar_dir):
    config = tiny_config(
        cifar_dir,
        distributed__coordinator_address="127.0.0.1:1",
        distributed__num_processes=2,
        distributed__process_id=2,
    )
    with pytest.raises(config_lib.ConfigError, match="distributed.process_id = 2 must be below"):
        config_lib.validate(config)


def test_host_local_batches_become_one_global_batch():
    mesh = parallel.make_mesh(jax.devices()[:1])
    local = {"image": np.arange(12, dtype=np.float32).reshape(4, 3), "label": np.arange(4, dtype=np.int32)}
    batch = parallel.host_local_to_global(local, mesh)
    assert batch["image"].shape == (4, 3) and batch["image"].sharding == parallel.batch_sharded(mesh)
    np.testing.assert_array_equal(np.asarray(batch["label"]), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="same leading"):
        parallel.host_local_to_global({"image": np.zeros((4, 3)), "label": np.zeros(3)}, mesh)
    with pytest.raises(ValueError, match="empty"):
        parallel.host_local_to_global({}, mesh)
