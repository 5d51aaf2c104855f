"""Crash safety through the real command line: kill -9, damaged checkpoints, SIGTERM,
divergence and unusable workdirs, each ending in the same parameters as a run that was
never disturbed (or in a one-line error and a kept checkpoint)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
from _cli import cli_command
from _configs import ROOT, tiny_config
from _workdirs import final_arrays

from resnet_jax import files
from resnet_jax.train import loop
from resnet_jax.train import workdir as workdir_lib
from resnet_jax.train.checkpoint import verify_files
from resnet_jax.train.metrics import read_metrics
from resnet_jax.train.workdir import WorkdirError

KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Subprocesses share one compilation cache: after the first run, no run compiles."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def run(
    cmd: list[str],
    env: dict[str, str],
    kill_when: Callable[[], bool] | None = None,
    term_when: Callable[[], bool] | None = None,
    timeout: float = 120,
    while_frozen: Callable[[], None] | None = None,
) -> tuple[int, str]:
    """Runs `cmd`; sends SIGKILL (or SIGTERM) the moment the condition holds. -> (rc, stderr).

    Both are preceded by SIGSTOP, which freezes the process where it is: `while_frozen`
    then sees the workdir exactly as a kill leaves it, and a SIGTERM lands at the step
    where the condition was seen, however fast the machine."""
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as proc:
        deadline = time.monotonic() + timeout
        if kill_when or term_when:
            while proc.poll() is None and time.monotonic() < deadline:
                if kill_when and kill_when():
                    proc.send_signal(signal.SIGSTOP)
                    if while_frozen:
                        while_frozen()
                    proc.kill()
                    break
                if term_when and term_when():
                    # Frozen first, so that the run cannot get further between the moment
                    # the condition held and the signal (on a fast machine it could finish).
                    proc.send_signal(signal.SIGSTOP)
                    proc.send_signal(signal.SIGTERM)
                    proc.send_signal(signal.SIGCONT)
                    break
                time.sleep(0.002)
        _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        return proc.returncode, stderr


def assert_same_final_state(a: Path, b: Path) -> None:
    step_a, items_a = final_arrays(a)
    step_b, items_b = final_arrays(b)
    assert step_a == step_b == 16
    assert jax.tree.structure(items_a) == jax.tree.structure(items_b)
    jax.tree.map(np.testing.assert_array_equal, items_a, items_b)


def assert_metrics_once_each(workdir: Path) -> None:
    records = read_metrics(workdir / "metrics.jsonl")
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)), f"duplicated metrics records: {keys}"
    assert [r["step"] for r in records if r["split"] == "train"] == [4, 8, 12, 16]
    assert [r["step"] for r in records if r["split"] == "test"] == [8, 16]


@pytest.fixture(scope="module")
def reference(cifar_dir, tmp_path_factory, env) -> Path:
    """tiny_config run from start to end without interruption."""
    workdir = tmp_path_factory.mktemp("reference")
    rc, stderr = run(cli_command(workdir, cifar_dir), env)
    assert rc == 0, stderr[-3000:]
    assert json.loads((workdir / "results.json").read_text())["steps"] == 16
    return workdir


def _tmp_save_of_step_at_least(ckpt_dir: Path, step: int) -> Callable[[], bool]:
    def found() -> bool:
        try:
            names = os.listdir(ckpt_dir)
        except FileNotFoundError:
            return False
        return any(".orbax-checkpoint-tmp" in n and int(n.split(".")[0]) >= step for n in names)

    return found


def test_kill_9_at_several_points_then_rerun_ends_bit_identical(reference, cifar_dir, tmp_path, env):
    workdir = tmp_path / "killed"
    ckpt = workdir / "checkpoints"
    cmd = cli_command(workdir, cifar_dir)
    # Step 4 just committed by orbax, its manifest probably not yet written (async save).
    rc, err = run(cmd, env, kill_when=lambda: (ckpt / "4").is_dir())
    assert rc == KILLED, err[-2000:]
    # In the middle of writing a later step.
    rc, err = run(cmd, env, kill_when=_tmp_save_of_step_at_least(ckpt, 8))
    assert rc == KILLED, err[-2000:]
    # Step 4's manifest is written when the next save starts: it was restored unverified.
    assert "resuming at step 4" in err and "checkpoint step 4" in err and "cannot be verified" in err
    # After the final step's checkpoint, before results.json: frozen the moment step 16 is
    # committed (the process cannot exit while stopped, so the kill certainly lands). The
    # rare poll that comes too late to beat results.json has its file removed while the
    # process is frozen, so the rerun always faces the state this case names.
    rc, err = run(
        cmd,
        env,
        kill_when=lambda: (ckpt / "16").is_dir(),
        while_frozen=lambda: (workdir / "results.json").unlink(missing_ok=True),
    )
    assert rc == KILLED, err[-2000:]
    assert (ckpt / "16").is_dir() and not (workdir / "results.json").exists()
    rc, err = run(cmd, env)
    assert rc == 0, err[-2000:]

    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 16 and results["resumed_from"] == 16 and results["steps_this_run"] == 0
    # The rerun takes the final error from metrics.jsonl's evaluation of step 16 (which the
    # killed run wrote before its last save), not from a second evaluation.
    final_eval = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"][-1]
    assert final_eval["step"] == 16 and results["final_error"] == final_eval["error"]
    assert_same_final_state(reference, workdir)
    assert_metrics_once_each(workdir)
    assert not [p for p in ckpt.iterdir() if "tmp" in p.name], "a temporary save folder was left behind"


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    """64 bytes in the middle inverted: always other contents, the same ones every run (random
    bytes could, however rarely, repeat what was there)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    assert len(data) == path.stat().st_size and data != path.read_bytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", [_truncate, Path.unlink, _garbage], ids=["truncated", "missing", "garbage"]
)
def test_damaged_newest_checkpoint_falls_back_to_previous(reference, cifar_dir, tmp_path, env, damage):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    victim = _largest_file(workdir / "checkpoints" / "16")
    damage(victim)

    rc, err = run(cli_command(workdir, cifar_dir), env)
    assert rc == 0, err[-2000:]
    warning = next(line for line in err.splitlines() if "checkpoint step 16" in line and "damaged" in line)
    assert victim.name in warning
    assert json.loads((workdir / "results.json").read_text())["resumed_from"] == 12
    assert_same_final_state(reference, workdir)
    assert_metrics_once_each(workdir)
    quarantined = list((workdir / "checkpoints" / "quarantine").glob("16-*.reason.txt"))
    assert len(quarantined) == 1 and victim.name in quarantined[0].read_text()


def test_sigterm_saves_then_exits_and_rerun_resumes(reference, cifar_dir, tmp_path, env):
    workdir = tmp_path / "preempted"
    # The cadence would save only at step 16: any earlier checkpoint is the preemption's.
    cmd = cli_command(workdir, cifar_dir, checkpoint_every_steps=16)
    metrics = workdir / "metrics.jsonl"
    rc, err = run(cmd, env, term_when=lambda: metrics.is_file() and metrics.stat().st_size > 0)
    assert rc == 143, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped: preempted (SIGTERM) at step ") and "rerun the same command" in line
    saved = int(re.search(r"at step (\d+)", line).group(1))
    assert saved in (4, 8, 12)
    ckpt = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [saved]
    manifest = json.loads((ckpt / "manifests" / f"{saved}.json").read_text())
    assert verify_files(ckpt / str(saved), manifest["files"]) == []

    rc, err = run(cmd, env)
    assert rc == 0, err[-2000:]
    assert json.loads((workdir / "results.json").read_text())["resumed_from"] == saved
    assert_same_final_state(reference, workdir)
    assert_metrics_once_each(workdir)


def test_divergence_exits_3_and_keeps_the_last_good_checkpoint(cifar_dir, tmp_path, env):
    workdir = tmp_path / "diverged"
    # Eight gentle warm-up steps (checkpoints 4 and 8), then a learning rate that explodes
    # (the loss passed 1e13 by step 16 on one machine, still finite: 40 steps leave room).
    cmd = cli_command(
        workdir,
        cifar_dir,
        optimizer__learning_rate=100.0,
        schedule__warmup_steps=8,
        schedule__warmup_learning_rate=0.05,
        schedule__decay_factor=1.0,
        schedule__total_steps=40,
        schedule__boundaries=(36,),
    )
    rc, err = run(cmd, env)
    assert rc == 3, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: training diverged at step "), line
    bad = int(re.search(r"diverged at step (\d+)", line).group(1))
    good = int(re.search(r"last good checkpoint \(step (\d+)\)", line).group(1))
    assert 8 < bad <= 40 and good == (bad - 1) // 4 * 4 and good >= 8
    ckpt = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert steps[-1] == good, f"a checkpoint after the divergence was written: {steps}"
    manifest = json.loads((ckpt / "manifests" / f"{good}.json").read_text())
    assert verify_files(ckpt / str(good), manifest["files"]) == []
    step, items = final_arrays(workdir)
    assert step == good
    floats = [x for x in jax.tree.leaves(items) if np.issubdtype(x.dtype, np.inexact)]
    assert floats and all(np.isfinite(x).all() for x in floats)


# Run through the real command line with the train step wrapped from outside: from step 6
# on, every BatchNorm running variance is overwritten with +inf. The loss (computed with
# batch statistics), the gradient norm and the parameter norm all stay finite, so only the
# check of the whole state at a save (step 8) can see it.
_POISON_BN_STATS = """
import sys
import jax
import jax.numpy as jnp
from absl import app
from resnet_jax import main
from resnet_jax.train import steps

real_train_step = steps.train_step

def poisoned(state, batch, **kwargs):
    state, metrics = real_train_step(state, batch, **kwargs)
    bad = state.step >= 6
    stats = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.where(bad, jnp.inf, v) if path[-1].key == "var" else v, state.batch_stats)
    return state.replace(batch_stats=stats), metrics

steps.train_step = poisoned
sys.argv = ["resnet_jax.main"] + sys.argv[1:]
app.run(main.main)
"""


def test_nonfinite_state_at_a_save_exits_3_and_keeps_the_last_good_checkpoint(cifar_dir, tmp_path, env):
    workdir = tmp_path / "overflowed"
    cmd = cli_command(workdir, cifar_dir)
    cmd = [sys.executable, "-c", _POISON_BN_STATS] + cmd[cmd.index("--config") :]
    rc, err = run(cmd, env)
    assert rc == 3, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        "error: training diverged at step 8 (loss and norms finite, but the state holds NaN "
        "or infinite values"
    ), line
    assert "last good checkpoint (step 4)" in line
    ckpt = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [4]
    manifest = json.loads((ckpt / "manifests" / "4.json").read_text())
    assert verify_files(ckpt / "4", manifest["files"]) == []
    step, items = final_arrays(workdir)
    floats = [x for x in jax.tree.leaves(items) if np.issubdtype(x.dtype, np.inexact)]
    assert step == 4 and floats and all(np.isfinite(x).all() for x in floats)
    train = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8] and all(np.isfinite(r["loss"]) for r in train)


def test_different_config_refused_in_one_line_unless_allowed(reference, cifar_dir, tmp_path, env):
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    rc, err = run(cli_command(workdir, cifar_dir, optimizer__learning_rate=0.2), env)
    assert rc == 2, err[-2000:]
    message = err[err.index("error: ") :]
    assert "different config" in message and "optimizer.learning_rate: 0.05 -> 0.2" in message
    assert "--config.allow_config_change=True" in message

    config = tiny_config(cifar_dir, optimizer__learning_rate=0.2, allow_config_change=True)
    results = loop.train_and_evaluate(config, str(workdir))
    assert results["resumed_from"] == 16 and results["steps_this_run"] == 0
    assert len(list(workdir.glob("config.*.json"))) == 1  # the old config kept beside


def test_unwritable_workdir_is_refused_before_training(cifar_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(WorkdirError, match=re.escape(str(blocker / "run"))):
        loop.train_and_evaluate(tiny_config(cifar_dir), str(blocker / "run"))


def test_full_disk_is_refused_before_training(cifar_dir, tmp_path, monkeypatch):
    config = tiny_config(cifar_dir)
    real = shutil.disk_usage
    monkeypatch.setattr(
        workdir_lib.shutil, "disk_usage", lambda path: real(path)._replace(free=50 << 20)
    )  # 50 MiB: below the margin
    with pytest.raises(WorkdirError, match=r"has 0\.05 GiB free but the run needs at least 0\.06 GiB"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "config.json").exists()


def test_disk_estimate_counts_checkpoints_to_come(tmp_path):
    step_bytes = 10 << 20
    fresh = files.disk_space_needed(str(tmp_path / "new"), step_bytes, keep=3)
    assert fresh == 4 * step_bytes + files.DISK_MARGIN_BYTES
    existing = tmp_path / "old" / "checkpoints" / "8"
    existing.mkdir(parents=True)
    (existing / "data").write_bytes(b"x" * (3 << 20))
    assert files.disk_space_needed(str(tmp_path / "old"), step_bytes, keep=3) == fresh - (3 << 20)


def test_preemption_notice_records_sigterm_and_restores_the_old_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *args: seen.append("old"))
    try:
        with loop._PreemptionNotice() as notice:
            assert not notice.agreed()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
            assert notice.agreed() and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert seen == ["old"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_first_ctrl_c_is_a_notice_the_second_interrupts_and_handlers_are_restored():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with loop._PreemptionNotice() as notice:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
        assert notice.agreed() and notice.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert {s: signal.getsignal(s) for s in previous} == previous
