"""Promises of README.md and docs/*.md that no other test held, checked through the public
entry points (`python -m resnet_jax.main`, the config files, the schedule a config yields).

Tiny nets and few steps throughout: CIFAR's tiny_config (ResNet-8, 16 steps) and a ResNet-18
at 1/8 width on 32-px crops of the shared ImageNet samples.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from _cli import cli_command, config_flag, run_cli
from _configs import ROOT, load_config
from _imagenet import make_image_folder
from _workdirs import final_arrays

from resnet_jax.train import config as config_lib
from resnet_jax.train import optim
from resnet_jax.train.metrics import read_metrics

TIMEOUT_S = 300  # per command-line run: a hung run fails the test instead of CI


# ResNet-18 at 1/8 width on 32-px crops of a folder of 48 training JPEGs: 6 steps of 8 an epoch.
IMAGENET_FLAGS = {
    "dataset.name": "image_folder",
    "dataset.image_size": 32,
    "dataset.scale_range": (36, 48),
    "dataset.eval_resize": 36,
    "dataset.eval_protocol": "center",
    "model.width_multiplier": 0.125,
    "batch_size": 8,
    "reference_batch_size": 8,
    "eval_batch_size": 4,
    "schedule.epochs": 2.0,
    "schedule.boundary_epochs": (1.0,),
    "steps_per_dispatch": 2,
    "log_every_steps": 2,
    "eval_every_steps": 12,
    "checkpoint_every_steps": 4,
    "tensorboard": False,
}


def imagenet_command(workdir: Path, folder: Path, recipe: str = "", **flags: Any) -> list[str]:
    wanted = {**IMAGENET_FLAGS, "dataset.data_dir": folder, **flags}
    return [
        sys.executable,
        "-m",
        "resnet_jax.main",
        "--config",
        f"configs/imagenet.py:resnet18{recipe}",
        "--workdir",
        str(workdir),
        *(f"--config.{k}={config_flag(v)}" for k, v in wanted.items()),
    ]


def run(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    return run_cli(cmd, env, TIMEOUT_S)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Subprocesses share one compilation cache: after the first run of a config, none compiles."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def assert_same_arrays(a: Path, b: Path, step: int) -> None:
    step_a, items_a = final_arrays(a)
    step_b, items_b = final_arrays(b)
    assert step_a == step_b == step
    assert jax.tree.structure(items_a) == jax.tree.structure(items_b)
    jax.tree.map(np.testing.assert_array_equal, items_a, items_b)


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def cifar_reference(cifar_dir, tmp_path_factory, env) -> Path:
    """tiny_config through the command line, never interrupted."""
    workdir = tmp_path_factory.mktemp("cifar_reference") / "run"
    rc, err = run(cli_command(workdir, cifar_dir), env)
    assert rc == 0, err[-3000:]
    return workdir


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), n_val=4, n_train=48)


# --- ResNet-1202's warm-up (configs/cifar10.py, docs/scaling.md) ----------------------------------


@pytest.mark.parametrize("batch", [128, 1024])
def test_resnet1202_warms_up_at_lr_0_01_for_400_iterations_then_0_1(batch):
    """He et al. 2015, Section 4.2: 0.01 until the training error is below 80% (about 400
    iterations), then 0.1. The config says it as a fixed 400 steps at batch 128, rescaled to the
    batch like every step count; the 1202-layer net is never built (validate checks the name)."""
    config = load_config(f"resnet1202,batch={batch}")
    assert config.model.name == "cifar_resnet1202"
    derived = config_lib.validate(config)
    _, schedule = optim.build_optimizer(config, derived)
    scale = batch / 128
    warmup = round(400 / scale)
    assert (derived.warmup_steps, derived.boundaries, derived.total_steps) == (
        warmup,
        (round(32_000 / scale), round(48_000 / scale)),
        round(64_000 / scale),
    )
    expected = {
        0: 0.01,
        warmup - 1: 0.01,
        warmup: 0.1,
        round(32_000 / scale) - 1: 0.1,
        round(32_000 / scale): 0.01,
        round(48_000 / scale): 0.001,
        round(64_000 / scale) - 1: 0.001,
    }
    got = {step: float(schedule(step)) for step in expected}
    np.testing.assert_allclose(list(got.values()), [lr * scale for lr in expected.values()], rtol=1e-6)
    # The other depths of the paper's Table 6 below 110 do not warm up.
    assert config_lib.validate(load_config("resnet56")).warmup_steps == 0


# --- A finished run whose metrics.jsonl lacks the final evaluation (loop.results) ----------------


def test_rerun_of_a_finished_run_without_its_final_evaluation_evaluates_again(
    cifar_reference, cifar_dir, tmp_path, env
):
    workdir = tmp_path / "run"
    shutil.copytree(cifar_reference, workdir)
    (workdir / "results.json").unlink()
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    last_eval = max(i for i, line in enumerate(lines) if json.loads(line)["split"] == "test")
    deleted = json.loads(lines.pop(last_eval))
    assert deleted["step"] == 16
    # Step 8's evaluation differs: a rerun that reported the last record left would be caught.
    assert [json.loads(line)["error"] for line in lines if json.loads(line)["split"] == "test"] != [
        deleted["error"]
    ]
    (workdir / "metrics.jsonl").write_text("".join(lines))

    rc, err = run(cli_command(workdir, cifar_dir), env)
    assert rc == 0, err[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 16 and results["steps_this_run"] == 0 and results["resumed_from"] == 16
    assert results["final_error"] == deleted["error"]
    tests = [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"]
    assert tests == [8], f"the evaluation again must not be written as a record: {tests}"


# --- A full disk during a run (docs/reliability.md) --------------------------------------------

# Runs resnet_jax.main with the disk "full" from step 12 on: argv[1] says which write fails.
# metrics: the append of any record of step >= 12 to metrics.jsonl (os.write, as a real full
# disk fails it); checkpoint: any file orbax writes into the folder of a step >= 12.
_FULL_DISK = """
import errno, os, re, sys, types
from absl import app
from etils import epath
from resnet_jax import main
from resnet_jax.train import metrics

def full():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

what = sys.argv.pop(1)
if what == "metrics":
    real_write = os.write
    def write(fd, data):
        step = re.match(rb'{"step": (\\d+)', data)
        if step and int(step.group(1)) >= 12:
            raise full()
        return real_write(fd, data)
    metrics.os = types.SimpleNamespace(**{**vars(os), "write": write})
else:
    path_cls = type(epath.Path("/"))
    real_write_text, real_write_bytes = path_cls.write_text, path_cls.write_bytes
    def late_step(path):
        return any(re.fullmatch(r"(\\d+)(\\.orbax-checkpoint-tmp.*)?", part)
                   and int(re.match(r"\\d+", part)[0]) >= 12 for part in path.parts)
    def guard(real):
        def write(self, *args, **kwargs):
            if late_step(self):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real(self, *args, **kwargs)
        return write
    path_cls.write_text, path_cls.write_bytes = guard(real_write_text), guard(real_write_bytes)
sys.argv = ["resnet_jax.main"] + sys.argv[1:]
app.run(main.main)
"""


@pytest.mark.parametrize("what", ["metrics", "checkpoint"])
def test_full_disk_during_a_run_exits_2_and_keeps_the_earlier_checkpoints(
    cifar_reference, cifar_dir, tmp_path, env, what
):
    workdir = tmp_path / "run"
    cmd = cli_command(workdir, cifar_dir)
    rc, err = run([sys.executable, "-c", _FULL_DISK, what, *cmd[cmd.index("--config") :]], env)
    assert rc == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "No space left on device" in last, err[-3000:]
    if what == "metrics":
        assert [line for line in err.splitlines() if line.startswith("error:")] == [last]
        assert str(workdir / "metrics.jsonl") in last, last
    else:  # orbax's background threads log their own failures (ERROR lines, tracebacks) first
        assert last.startswith(f"error: saving checkpoint step 12 to {workdir / 'checkpoints'} failed: ")
        assert "12.orbax-checkpoint-tmp" in last and last.endswith("earlier checkpoints are intact"), last
    assert checkpoint_steps(workdir)[-2:] == [4, 8]
    if what == "metrics":  # nothing of step 12 written, not even part of a line
        assert max(r["step"] for r in read_metrics(workdir / "metrics.jsonl")) == 8
    # Space back: the same command resumes from step 8 and ends where an undisturbed run ends.
    rc, err = run(cmd, env)
    assert rc == 0, err[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["resumed_from"] == 8
    assert_same_arrays(cifar_reference, workdir, 16)


# --- The ImageNet recipes and label smoothing train from the command line ------------------------

# What each recipe of configs/imagenet.py sets apart from the paper's (its docstring's list).
RECIPE_VALUES = {
    "goyal": {
        "model.zero_init_last": True,
        "optimizer.weight_decay_on": "no_bn",
        "schedule.warmup": "linear",
        "schedule.warmup_learning_rate": 0.1,
        "schedule.scale_warmup_learning_rate": False,
        "dataset.train_transform": "inception",
        "dataset.pca_std": 0.0,
    },
    "v1.5": {
        "model.stride_on_3x3": True,
        "model.dtype": "bfloat16",
        "label_smoothing": 0.1,
        "schedule.kind": "cosine",
        "schedule.warmup": "linear",
        "schedule.warmup_learning_rate": 0.0,
        "dataset.train_transform": "inception",
        "dataset.eval_protocol": "center",
    },
    "ghost": {"model.ghost_batch_size": 32},
}
# The tiny run's own schedule: 2 epochs of 8 or 32 images a step, warm-up shortened to fit.
RECIPE_FLAGS = {
    "goyal": {"schedule.warmup_epochs": 0.5},
    "v1.5": {"schedule.warmup_epochs": 0.5, "schedule.boundary_epochs": ()},
    "ghost": {
        "batch_size": 32,
        "reference_batch_size": 32,
        "steps_per_dispatch": 1,
        "log_every_steps": 1,
        "eval_every_steps": 3,
        "checkpoint_every_steps": 3,
    },  # BN over 32: a batch of 32
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPE_VALUES))
def test_imagenet_recipe_trains_from_the_command_line(recipe, folder, tmp_path, env):
    workdir = tmp_path / "run"
    rc, err = run(imagenet_command(workdir, folder, f",{recipe}", **RECIPE_FLAGS[recipe]), env)
    assert rc == 0, err[-3000:]
    saved = config_lib.flatten(json.loads((workdir / "config.json").read_text()))
    assert {k: saved[k] for k in RECIPE_VALUES[recipe]} == RECIPE_VALUES[recipe]
    train = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert train and all(np.isfinite(r["loss"]) for r in train)
    assert json.loads((workdir / "results.json").read_text())["steps"] == train[-1]["step"]


def test_label_smoothing_trains_from_the_command_line(cifar_reference, cifar_dir, tmp_path, env):
    workdir = tmp_path / "run"
    rc, err = run(cli_command(workdir, cifar_dir) + ["--config.label_smoothing=0.1"], env)
    assert rc == 0, err[-3000:]
    assert json.loads((workdir / "config.json").read_text())["label_smoothing"] == 0.1
    smoothed = [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    plain = [r["loss"] for r in read_metrics(cifar_reference / "metrics.jsonl") if r["split"] == "train"]
    assert len(smoothed) == 4 and all(np.isfinite(smoothed))
    # Same data, same start: the smoothed targets change the loss from the first logged step on.
    assert smoothed[0] != plain[0]


# --- Killed at any moment, on both data paths (docs/reliability.md) -----------------------------


@pytest.fixture(scope="module")
def folder_reference(folder, tmp_path_factory, env) -> Path:
    """The tiny image-folder run through the command line, never interrupted (12 steps)."""
    workdir = tmp_path_factory.mktemp("folder_reference") / "run"
    rc, err = run(imagenet_command(workdir, folder), env)
    assert rc == 0, err[-3000:]
    return workdir


def _logged(metrics: Path, step: int) -> bool:
    try:
        return f'{{"step": {step}, "split": "train"'.encode() in metrics.read_bytes()
    except FileNotFoundError:
        return False


def kill_at_seeded_moments(
    cmd: list[str], env: dict[str, str], workdir: Path, log_steps: list[int], seed: int, kills: int = 3
) -> list[tuple[int, float, int]]:
    """Runs `cmd` `kills` times, each SIGKILLed a seeded delay (0-0.5 s) after metrics.jsonl
    first holds the train record of a seeded step. The delay lands the kill anywhere: in a
    step, a save, an evaluation, start-up (when the step was already logged before the
    resume) or after the end. -> (step, delay, exit status) of each run."""
    rng = np.random.default_rng(seed)
    steps = sorted(int(s) for s in rng.choice(log_steps, size=kills, replace=False))
    delays = [float(d) for d in rng.uniform(0.0, 0.5, size=kills)]
    done = []
    for step, delay in zip(steps, delays):
        with subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ) as proc:
            deadline = time.monotonic() + TIMEOUT_S
            try:
                while proc.poll() is None and not _logged(workdir / "metrics.jsonl", step):
                    assert time.monotonic() < deadline, f"step {step} not logged within {TIMEOUT_S} s"
                    time.sleep(0.01)
                time.sleep(delay)
            finally:
                proc.kill()
                _, err = proc.communicate(timeout=60)
        assert proc.returncode in (-signal.SIGKILL, 0), err[-3000:]
        done.append((step, delay, proc.returncode))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("path", ["cifar", "image_folder"])
def test_killed_at_seeded_random_moments_then_rerun_ends_bit_identical(
    path, request, cifar_dir, tmp_path, env
):
    workdir = tmp_path / "killed"
    if path == "cifar":
        reference = request.getfixturevalue("cifar_reference")
        cmd, log_steps, last = cli_command(workdir, cifar_dir), [4, 8, 12, 16], 16
    else:
        reference = request.getfixturevalue("folder_reference")
        cmd, log_steps, last = (
            imagenet_command(workdir, request.getfixturevalue("folder")),
            list(range(2, 13, 2)),
            12,
        )
    kills = kill_at_seeded_moments(cmd, env, workdir, log_steps, seed=len(path))
    assert any(rc == -signal.SIGKILL for *_, rc in kills), kills
    rc, err = run(cmd, env)
    assert rc == 0, err[-3000:]
    assert json.loads((workdir / "results.json").read_text())["steps"] == last
    assert_same_arrays(reference, workdir, last)
    records = read_metrics(workdir / "metrics.jsonl")
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)), f"duplicated metrics records: {keys}"
    assert [r["step"] for r in records if r["split"] == "train"] == log_steps


# --- SLURM starts jax.distributed by itself (docs/scaling.md) -------------------------------------


def _free_slurm_port(rng: np.random.Generator) -> int:
    """A free port of the range jax derives from SLURM_JOB_ID (job id % 4096 + 61440)."""
    for port in rng.permutation(np.arange(61440, 65536))[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return int(port)
    pytest.fail("no free port in 61440-65535 for the SLURM coordinator")


@pytest.mark.slow
def test_slurm_environment_starts_two_processes_that_train_together(cifar_dir, tmp_path, env):
    """Two tasks of one SLURM job step on one node (127.0.0.1), 2 CPU devices each, launched
    with nothing but SLURM's variables: config.distributed.initialize='auto' must start
    jax.distributed (gloo collectives) and both train the same 4-device run to its end."""
    port = _free_slurm_port(np.random.default_rng(0))
    job_id = 7 * 4096 + port - 61440
    workdir = tmp_path / "run"
    cmd = cli_command(
        workdir,
        cifar_dir,
        eval_batch_size=100,
        schedule__total_steps=8,
        schedule__boundaries=(6,),
        eval_every_steps=8,
    ) + ["--verbosity=0"]
    hints = (
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "JAX_COORDINATOR_ADDRESS",
        "JOBSET_NAME",
    )
    base = {k: v for k, v in env.items() if k not in hints and not k.startswith("SLURM_")}
    procs = []
    with open(tmp_path / "stderr.0", "w+") as log0, open(tmp_path / "stderr.1", "w+") as log1:
        try:
            for rank, log in enumerate((log0, log1)):
                slurm = {
                    "SLURM_JOB_ID": str(job_id),
                    "SLURM_NTASKS": "2",
                    "SLURM_PROCID": str(rank),
                    "SLURM_LOCALID": str(rank),
                    "SLURM_NODELIST": "127.0.0.1",
                    "SLURM_STEP_NODELIST": "127.0.0.1",
                    "SLURM_JOB_NUM_NODES": "1",
                    "SLURM_STEP_NUM_NODES": "1",
                    "SLURM_NNODES": "1",
                    "SLURM_NODEID": "0",
                    "SLURM_TASKS_PER_NODE": "2",
                }
                procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        env={**base, **slurm, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                    )
                )
            for proc in procs:
                proc.wait(timeout=TIMEOUT_S)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        errs = []
        for log in (log0, log1):
            log.seek(0)
            errs.append(log.read())
    for rank, (proc, err) in enumerate(zip(procs, errs)):
        assert proc.returncode == 0, f"process {rank}: {err[-3000:]}"
        assert f"jax.distributed: process {rank} of 2, 2 local / 4 global devices" in err, err[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert (
        results["steps"] == 8
        and results["hardware"]["devices"] == 4
        and results["hardware"]["processes"] == 2
    )
    assert checkpoint_steps(workdir) == [4, 8]
