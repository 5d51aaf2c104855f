"""Checkpointer: bit-exact round trips, damage detection and fallback, safe retention,
leftovers of a kill, full disk, and restoring a checkpoint onto another device count."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from resnet_jax.train.checkpoint import (
    MANIFEST_DIR,
    QUARANTINE_DIR,
    Checkpointer,
    CheckpointError,
    read_newest,
)


def make_state(seed: int) -> dict:
    """A small train-state-like pytree whose values identify the step that saved it."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.standard_normal((40, 16)), jnp.float32),
            "scale": jnp.asarray(rng.standard_normal((7,)), jnp.bfloat16),
        },
        "opt": {"momentum": jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)},
        "step": jnp.asarray(seed, jnp.int32),
    }


def assert_bit_equal(a, b) -> None:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def save_steps(directory: Path, steps, max_to_keep: int = 5) -> None:
    with Checkpointer(directory, max_to_keep=max_to_keep, async_save=False) as ckpt:
        for step in steps:
            assert ckpt.save(step, make_state(step), {"step": step})


def data_file(directory: Path, step: int) -> Path:
    """The largest file of the step's array store: it holds the array bytes."""
    files = [p for p in (directory / str(step) / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


ABSTRACT = make_state(0)


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_bit_exact_with_metadata(tmp_path, async_save):
    directory = tmp_path / "checkpoints"
    with Checkpointer(directory, max_to_keep=3, async_save=async_save) as ckpt:
        assert ckpt.save(10, make_state(10), {"config_hash": "abc", "wall": 1.5})
        assert ckpt.save(20, make_state(20), {"config_hash": "abc", "wall": 2.5})
        assert not ckpt.save(20, make_state(99))  # an existing step is left alone
    assert sorted(p.name for p in (directory / MANIFEST_DIR).iterdir()) == ["10.json", "20.json"]

    ckpt = Checkpointer(directory, max_to_keep=3)
    state, step, metadata = ckpt.restore_latest(ABSTRACT)
    assert step == 20
    assert metadata == {"config_hash": "abc", "wall": 2.5}
    assert_bit_equal(state, make_state(20))
    assert ckpt.last_restore_warnings == []
    # Restoring writes nothing into the step: it still matches its manifest.
    assert ckpt.restore_latest(ABSTRACT).step == 20
    assert ckpt.last_restore_warnings == []
    ckpt.close()


def test_no_checkpoint_gives_none(tmp_path):
    with Checkpointer(tmp_path / "checkpoints", max_to_keep=2) as ckpt:
        assert ckpt.restore_latest(ABSTRACT) is None
        assert ckpt.latest_step() is None and ckpt.all_steps() == []


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Checkpointer("run/checkpoints", max_to_keep=1, async_save=False) as ckpt:
        assert ckpt.directory == tmp_path / "run" / "checkpoints"
        ckpt.save(1, make_state(1))
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


@pytest.mark.parametrize("max_to_keep", [0, -1, 1.5])
def test_max_to_keep_is_validated(tmp_path, max_to_keep):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=max_to_keep)


def truncate(path: Path) -> str:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return "bytes, the manifest says"


def delete(path: Path) -> str:
    path.unlink()
    return "is missing"


def garbage(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(bytes(255 - b for b in path.read_bytes()[size // 3 : size // 3 + 64]))
    assert path.stat().st_size == size  # same size: only the hash can tell
    return "different contents"


@pytest.mark.parametrize("damage", [truncate, delete, garbage])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    victim = data_file(directory, 2)
    what = damage(victim)

    ckpt = Checkpointer(directory, max_to_keep=5, async_save=False)
    state, step, metadata = ckpt.restore_latest(ABSTRACT)
    assert step == 1 and metadata == {"step": 1}
    assert_bit_equal(state, make_state(1))
    first = ckpt.last_restore_warnings[0]
    assert "step 2" in first and victim.name in first and what in first
    # The damaged step is moved aside, so the resumed run can save step 2 again.
    assert ckpt.all_steps() == [1]
    assert [p.name.split("-")[0] for p in (directory / QUARANTINE_DIR).iterdir() if p.is_dir()] == ["2"]
    assert ckpt.save(2, make_state(22))
    ckpt.close()
    again = Checkpointer(directory, max_to_keep=5)
    assert again.restore_latest(ABSTRACT).step == 2
    assert again.last_restore_warnings == []
    assert_bit_equal(again.restore_latest(ABSTRACT).state, make_state(22))
    again.close()


def test_all_damaged_raises_with_every_step(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    truncate(data_file(directory, 1))
    delete(data_file(directory, 2))
    with Checkpointer(directory, max_to_keep=5) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore_latest(ABSTRACT)
        message = str(info.value)
        assert "step 1:" in message and "step 2:" in message
        assert ckpt.all_steps() == [1, 2]  # nothing moved or deleted when nothing is usable


def test_missing_manifest_restores_unverified_with_warning(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    (directory / MANIFEST_DIR / "2.json").unlink()  # a kill between orbax's commit and the manifest
    with Checkpointer(directory, max_to_keep=5) as ckpt:
        restored = ckpt.restore_latest(ABSTRACT)
        assert restored.step == 2
        assert_bit_equal(restored.state, make_state(2))
        assert len(ckpt.last_restore_warnings) == 1
        assert (
            "step 2" in ckpt.last_restore_warnings[0]
            and "cannot be verified" in ckpt.last_restore_warnings[0]
        )


def test_unverified_and_unreadable_falls_back(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    (directory / MANIFEST_DIR / "2.json").unlink()
    truncate(data_file(directory, 2))
    with Checkpointer(directory, max_to_keep=5) as ckpt:
        restored = ckpt.restore_latest(ABSTRACT)
        assert restored.step == 1
        assert any("orbax could not restore" in w and "step 2" in w for w in ckpt.last_restore_warnings)


def test_retention_keeps_newest_verified(tmp_path):
    directory = tmp_path / "checkpoints"
    with Checkpointer(directory, max_to_keep=2, async_save=True) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, make_state(step))
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in (directory / MANIFEST_DIR).iterdir()) == ["3.json", "4.json"]
    assert sorted(p.name for p in directory.iterdir()) == ["3", "4", MANIFEST_DIR]


def test_retention_never_deletes_the_older_good_step(tmp_path):
    directory = tmp_path / "checkpoints"
    with Checkpointer(directory, max_to_keep=2, async_save=False) as ckpt:
        ckpt.save(1, make_state(1))
        ckpt.save(2, make_state(2))
        garbage(data_file(directory, 2))
        # Orbax's own max_to_keep=2 would now delete step 1, leaving one good step (3).
        ckpt.save(3, make_state(3))
        assert ckpt.all_steps() == [1, 2, 3]
        ckpt.save(4, make_state(4))  # two verified steps above 1 and 2: now they may go
        assert ckpt.all_steps() == [3, 4]

    directory = tmp_path / "unverified"
    with Checkpointer(directory, max_to_keep=2, async_save=False) as ckpt:
        ckpt.save(1, make_state(1))
        ckpt.save(2, make_state(2))
        (directory / MANIFEST_DIR / "2.json").unlink()  # unverified steps do not count either
        ckpt.save(3, make_state(3))
        assert ckpt.all_steps() == [1, 2, 3]


def test_kill_leftovers_do_not_break_restore_or_save(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [1, 2])
    # What a kill leaves: orbax's temporary folder of step 3, and a half-done deletion.
    tmp = directory / "3.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
    tmp.mkdir(parents=True)
    (tmp / "half_written").write_bytes(b"\x00garbage")
    (directory / "deleting-1" / "state").mkdir(parents=True)

    ckpt = Checkpointer(directory, max_to_keep=5, async_save=False)
    restored = ckpt.restore_latest(ABSTRACT)
    assert restored.step == 2 and ckpt.last_restore_warnings == []
    assert ckpt.save(3, make_state(3))
    ckpt.close()
    assert not (directory / "3.orbax-checkpoint-tmp").exists()
    assert not (directory / "deleting-1").exists()
    with Checkpointer(directory, max_to_keep=5) as ckpt:
        restored = ckpt.restore_latest(ABSTRACT)
        assert restored.step == 3 and ckpt.last_restore_warnings == []
        assert_bit_equal(restored.state, make_state(3))


# Orbax's background writers of the failed save die with "Event loop is closed".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_raises_and_keeps_previous(tmp_path, monkeypatch, async_save):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, max_to_keep=1, async_save=async_save)
    ckpt.save(1, make_state(1))
    ckpt.wait()

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    path_cls = type(epath.Path(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(path_cls, "write_text", no_space)
        with pytest.raises(CheckpointError, match=r"step 2 .*No space left on device") as info:
            ckpt.save(2, make_state(2), {"x": 1})
            ckpt.wait()  # an async save reports its failure here at the latest
        assert str(directory) in str(info.value)
    assert ckpt.all_steps() == [1]
    # Once space is back, saving works again, and retention (keep 1) drops step 1 only then.
    assert ckpt.save(3, make_state(3))
    ckpt.close()
    with Checkpointer(directory, max_to_keep=1) as again:
        restored = again.restore_latest(ABSTRACT)
        assert restored.step == 3 and again.last_restore_warnings == []


def test_metadata_must_be_json(tmp_path):
    with Checkpointer(tmp_path / "c", max_to_keep=1) as ckpt:
        with pytest.raises(ValueError, match="metadata for step 1"):
            ckpt.save(1, make_state(1), {"bad": object()})
        assert ckpt.all_steps() == []


RESHARD_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from resnet_jax.train.checkpoint import Checkpointer

    directory = sys.argv[1]
    devices = jax.devices()
    assert len(devices) == 4, devices
    w = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    mesh4 = Mesh(np.array(devices), ("data",))
    state = {"w": jax.device_put(w, NamedSharding(mesh4, P("data"))),
             "b": jax.device_put(np.ones(6, np.float32), NamedSharding(mesh4, P()))}
    with Checkpointer(directory, max_to_keep=1) as ckpt:
        ckpt.save(5, state)

    mesh2 = Mesh(np.array(devices[:2]), ("data",))
    target = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh2, P(None, "data"))),
              "b": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh2, P()))}
    with Checkpointer(directory, max_to_keep=1) as ckpt:
        restored = ckpt.restore_latest(target)
    assert restored.step == 5 and ckpt.last_restore_warnings == []
    assert restored.state["w"].sharding == target["w"].sharding
    assert len(restored.state["w"].sharding.device_set) == 2
    assert restored.state["w"].addressable_shards[0].data.shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), w)
    print("RESHARD_OK")
    """
)


def test_restore_onto_a_different_device_count_and_read_on_one(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", RESHARD_SCRIPT, str(tmp_path / "checkpoints")],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "RESHARD_OK" in result.stdout, result.stderr[-3000:]
    # A reader outside training (evaluate, convert, export) on this 1-device process reads the
    # 4-device run's arrays whole; orbax alone refuses: "Topology mismatch".
    assert jax.device_count() == 1
    items, step = read_newest(tmp_path / "checkpoints")
    assert step == 5
    np.testing.assert_array_equal(items["w"], np.arange(8 * 6, dtype=np.float32).reshape(8, 6))
    np.testing.assert_array_equal(items["b"], np.ones(6, np.float32))


KILL_CHILD = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from resnet_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], max_to_keep=2, async_save=True)
    for step in range(1, 10_000):
        ckpt.save(step, {"w": jnp.full((512, 1024), step, jnp.float32)}, {"step": step})
        print(step, flush=True)
    """
)


def test_kill_9_during_saves_resumes_from_a_complete_step(tmp_path):
    directory = tmp_path / "checkpoints"
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    try:
        for line in child.stdout:
            if int(line) >= 4:  # several saves done, more in flight
                break
        time.sleep(np.random.default_rng(0).uniform(0.0, 0.3))  # seeded: the same kill moment each run
    finally:
        child.kill()
        child.wait()
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        restored = ckpt.restore_latest({"w": np.zeros((512, 1024), np.float32)})
        assert restored.step >= 3
        assert restored.metadata == {"step": restored.step}
        assert np.all(np.asarray(restored.state["w"]) == restored.step)


MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import pathlib, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from resnet_jax.train.checkpoint import Checkpointer

    mesh = Mesh(np.array(jax.devices()), ("data",))  # 2 processes x 2 devices

    def state(step):
        w = np.arange(16 * 4, dtype=np.float32).reshape(16, 4) + step
        sharding = NamedSharding(mesh, P("data"))
        return {"w": jax.make_array_from_callback(w.shape, sharding, lambda i: w[i]),
                "s": jax.device_put(np.int32(step), NamedSharding(mesh, P()))}

    ckpt = Checkpointer(directory, max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state(step), {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3], ckpt.all_steps()
    if process == 0:  # damage step 3: both processes must fall back together
        data = max((p for p in pathlib.Path(directory, "3", "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[:10])
    multihost_utils.sync_global_devices("damaged")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
    restored = ckpt.restore_latest(abstract)
    assert restored.step == 2 and restored.metadata == {"step": 2}
    full = multihost_utils.process_allgather(restored.state["w"], tiled=True)
    np.testing.assert_array_equal(full, np.arange(64, dtype=np.float32).reshape(16, 4) + 2)
    ckpt.save(4, state(4))
    ckpt.close()
    assert ckpt.all_steps() == [2, 4], ckpt.all_steps()
    print("MP_OK", flush=True)
    """
)


@pytest.mark.multiprocess
def test_two_processes_save_verify_and_fall_back_together(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    directory = str(tmp_path / "checkpoints")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTIPROCESS_SCRIPT, str(i), str(port), directory],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append((out, err))
    for out, err in outputs:
        assert "MP_OK" in out, err[-3000:]
    assert [
        p.name.split("-")[0] for p in (tmp_path / "checkpoints" / QUARANTINE_DIR).iterdir() if p.is_dir()
    ] == ["3"]
