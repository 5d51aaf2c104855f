"""The command lines' behaviour on mistakes and interruptions, each through a real subprocess:
one `error:`/`stopped:` line and an exit status by error family (resnet_jax.errors), no
tracebacks for what the user can fix; Ctrl-C saves like SIGTERM; one run per workdir."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _cli import cli_command
from _cli import run_cli as _run_cli
from _configs import ROOT

from resnet_jax import errors, experiments, parallel
from resnet_jax.analysis import plots
from resnet_jax.data import DataError
from resnet_jax.train import checkpoint, loop, workdir
from resnet_jax.train.checkpoint import verify_files
from resnet_jax.train.config import ConfigError

TIMEOUT_S = 180


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def run_cli(args: list[str], env: dict[str, str], timeout: float = TIMEOUT_S) -> tuple[int, str]:
    return _run_cli(args, env, timeout)


def assert_one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# --- 1. one error family ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, base, status",
    [
        (ConfigError, ValueError, 2),
        (errors.UsageError, ValueError, 2),
        (plots.MatplotlibMissingError, ImportError, 2),
        (DataError, ValueError, 2),
        (workdir.WorkdirError, ValueError, 2),
        (checkpoint.CheckpointError, RuntimeError, 2),
        (parallel.DistributedError, ValueError, 2),
        (loop.NonFiniteLossError, RuntimeError, 3),
        (loop.PreemptedError, RuntimeError, 143),
    ],
)
def test_every_error_class_is_in_the_family_and_keeps_its_builtin_base(cls, base, status):
    assert issubclass(cls, errors.ResNetJaxError) and issubclass(cls, base)
    assert errors.exit_status(cls("x")) == status
    assert issubclass(cls, errors.UserError) == (status == 2)


def test_exit_status_of_foreign_errors():
    assert errors.exit_status(OSError(errno.ENOSPC, "No space left on device")) == 2
    assert errors.exit_status(OSError(errno.EROFS, "Read-only file system")) == 2
    assert errors.exit_status(FileNotFoundError(errno.ENOENT, "missing")) == 2
    assert errors.exit_status(ConnectionResetError(errno.ECONNRESET, "reset")) == 75
    assert errors.exit_status(TimeoutError("coordinator")) == 75
    assert errors.exit_status(errors.TransientError("x")) == 75
    assert errors.exit_status(loop.PreemptedError("x", signum=signal.SIGINT)) == 130
    assert errors.exit_status(RuntimeError("a bug")) is None

    class XlaRuntimeError(RuntimeError):  # jaxlib's name; its wording as a dead gloo peer gives it
        pass

    assert errors.exit_status(XlaRuntimeError("UNAVAILABLE: failed to connect to all addresses")) == 75
    assert errors.exit_status(XlaRuntimeError("INTERNAL: gloo: Connection closed by peer")) == 75
    assert errors.exit_status(XlaRuntimeError("INVALID_ARGUMENT: shapes differ")) is None


# main with train_and_evaluate replaced by one that raises `error`: how each family leaves it.
# Like orbax after a failed background save, it leaves a coroutine never awaited, which Python
# would warn about at exit, after the error line, unless main silences it.
_RAISING_MAIN = """
import errno, sys
from absl import app
from resnet_jax import errors, main
from resnet_jax.train.checkpoint import CheckpointError

async def write_fragment():
    pass

def failing(config, workdir, **hooks):
    global abandoned
    abandoned = write_fragment()
    raise {error}

main.train_and_evaluate = failing
sys.argv = ["resnet_jax.main"] + sys.argv[1:]
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.parametrize(
    "error, status, words",
    [
        (
            "CheckpointError('no checkpoint in w can be restored')",
            2,
            "error: no checkpoint in w can be restored",
        ),
        ("OSError(errno.ENOSPC, 'No space left on device', 'w/metrics.jsonl')", 2, "No space left on device"),
        ("ConnectionResetError(errno.ECONNRESET, 'Connection reset by peer')", 75, "rerun the same command"),
        ("errors.TransientError('the coordinator went away')", 75, "error: the coordinator went away"),
    ],
    ids=["checkpoint", "disk-full", "network", "transient"],
)
def test_main_maps_errors_by_family(error, status, words, env, tmp_path):
    args = [
        sys.executable,
        "-c",
        _RAISING_MAIN.format(error=error),
        "--config",
        "configs/cifar10.py:resnet8",
        "--workdir",
        str(tmp_path / "w"),
    ]
    rc, err = run_cli(args, env)
    assert rc == status, err[-3000:]
    assert words in assert_one_error_line(err)


def test_a_bug_keeps_its_traceback(env, tmp_path):
    args = [
        sys.executable,
        "-c",
        _RAISING_MAIN.format(error="RuntimeError('a bug')"),
        "--config",
        "configs/cifar10.py:resnet8",
        "--workdir",
        str(tmp_path / "w"),
    ]
    rc, err = run_cli(args, env)
    assert rc == 1 and "Traceback" in err and "RuntimeError: a bug" in err, err[-3000:]


def test_experiments_maps_errors_by_family(monkeypatch, tmp_path, capsys):
    """As main: a family error is one line and its status; a plain ValueError is a bug."""
    argv = ["table1", "--nets", "resnet18", "--out", str(tmp_path)]

    def raising(error):
        def command(args):
            raise error

        return command

    monkeypatch.setattr(experiments, "_table1", raising(errors.UsageError("--nets: not a net")))
    assert experiments.main(argv) == 2
    assert capsys.readouterr().err == "error: --nets: not a net\n"
    monkeypatch.setattr(experiments, "_table1", raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        experiments.main(argv)


# --- 2. mistakes on the command line -------------------------------------------------------------

_MAIN = [sys.executable, "-m", "resnet_jax.main", "--workdir", "{w}"]
_EVALUATE = [sys.executable, "scripts/evaluate.py", "--workdir", "{w}"]
_EXPERIMENTS = [
    sys.executable,
    "-m",
    "resnet_jax.experiments",
    "degradation",
    "--depths",
    "20",
    "--steps",
    "4",
    "--workdir",
    "{w}",
]


@pytest.mark.parametrize("command", [_MAIN, _EVALUATE], ids=["main", "evaluate"])
@pytest.mark.parametrize(
    "mistake, words",
    [
        (
            ["--config", "configs/cifar10.py:resnet8", "--config.optimizer.learnin_rate=0.1"],
            ["--config.optimizer.learnin_rate=0.1", "no such config field", 'did you mean "learning_rate"'],
        ),
        (
            ["--config", "configs/cifar10.py:resnet8", "--config.batch_size=abc"],
            ["--config.batch_size=abc", "'abc'"],
        ),
        (
            ["--config", "configs/no_such_file.py:resnet8"],
            ["--config configs/no_such_file.py:resnet8", "No such file or directory"],
        ),
    ],
    ids=["misspelt", "bad-type", "missing-file"],
)
def test_a_config_mistake_is_one_line_and_status_2(command, mistake, words, env, tmp_path):
    rc, err = run_cli([a.format(w=tmp_path / "w") for a in command] + mistake, env)
    assert rc == 2, err[-3000:]
    line = assert_one_error_line(err)
    assert all(w in line for w in words), line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "mistake, words",
    [
        (
            ["--set", "optimizer.learnin_rate=0.1"],
            ["optimizer.learnin_rate", "no such config field", "did you mean 'learning_rate'"],
        ),
        (  # the issue's own example, in main's spelling
            ["--config.optimizer.learnin_rate=0.1"],
            ["--config.optimizer.learnin_rate=0.1", "no such config field", "did you mean 'learning_rate'"],
        ),
        (["--set", "batch_size=abc"], ["--set batch_size=abc", "int"]),
        (
            ["--config", "configs/no_such_file.py"],
            ["--config configs/no_such_file.py", "no such config file"],
        ),
    ],
    ids=["misspelt", "misspelt-config-flag", "bad-type", "missing-file"],
)
def test_experiments_config_mistake_is_one_line_and_status_2(mistake, words, env, tmp_path):
    rc, err = run_cli([a.format(w=tmp_path / "w") for a in _EXPERIMENTS] + mistake, env)
    assert rc == 2, err[-3000:]
    line = assert_one_error_line(err)
    assert all(w in line for w in words), line
    assert not (tmp_path / "w").exists(), "a net started training before the mistake was found"


# --- 4. Ctrl-C -----------------------------------------------------------------------------------


def _ignores_sigint(pid: int) -> bool:
    """Whether the process ignores SIGINT (Linux: the SigIgn mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False  # no /proc (or already gone): nothing to check
    mask = int(re.search(r"^SigIgn:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (signal.SIGINT - 1) & 1)


class Watched:
    """A command line in its own session, SIGINT not ignored (as at a terminal); stderr
    collected line by line while it runs."""

    def __init__(self, args: list[str], env: dict[str, str]):
        # exec keeps an ignored signal ignored: where this test runs with SIGINT ignored (a job
        # started with & by a non-interactive shell), the child would inherit that. A handler
        # set from Python is reset to the default by exec, so one is set while the child starts.
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        if ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                restore_signals=True,
            )
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert not _ignores_sigint(self.proc.pid), "the command line would not see Ctrl-C"
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, condition, timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                self._reader.join(timeout=10)
                pytest.fail("never happened; stderr:\n" + "".join(self.lines)[-3000:])
            time.sleep(0.01)

    def wait_for_line(self, text: str, timeout: float = TIMEOUT_S) -> None:
        self.wait_for(lambda: any(text in line for line in self.lines), timeout)

    def finish(self, timeout: float = TIMEOUT_S) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._reader.join(timeout=10)
        return rc, "".join(self.lines)


def _first_train_line(metrics: Path):
    return lambda: metrics.is_file() and metrics.stat().st_size > 0


def test_ctrl_c_saves_a_checkpoint_and_exits_130_then_rerun_resumes(cifar_dir, tmp_path, env):
    work = tmp_path / "interrupted"
    # The cadence would save only at step 16: any earlier checkpoint is the interrupt's.
    cmd = cli_command(work, cifar_dir, checkpoint_every_steps=16)
    proc = Watched(cmd, env)
    proc.wait_for(_first_train_line(work / "metrics.jsonl"))
    # Frozen while the signal is sent: it lands at the step seen, however fast the machine.
    for sig in (signal.SIGSTOP, signal.SIGINT, signal.SIGCONT):
        proc.proc.send_signal(sig)
    rc, err = proc.finish()
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped: interrupted (Ctrl-C) at step ") and "rerun the same command" in line, (
        line
    )
    saved = int(re.search(r"at step (\d+)", line).group(1))
    assert saved in (4, 8, 12)
    ckpt = work / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [saved]
    manifest = json.loads((ckpt / "manifests" / f"{saved}.json").read_text())
    assert verify_files(ckpt / str(saved), manifest["files"]) == []

    rc, err = run_cli(cmd, env)
    assert rc == 0, err[-3000:]
    assert json.loads((work / "results.json").read_text())["resumed_from"] == saved


# The forced save after a Ctrl-C takes a minute here, so the second Ctrl-C certainly lands
# in it; "saving" on stderr says when.
_SLOW_SAVE_MAIN = """
import sys, time
from absl import app
from resnet_jax import main
from resnet_jax.train.checkpoint import Checkpointer

def slow_save(self, step, items, metadata=None, force=False):
    print("saving", file=sys.stderr, flush=True)
    time.sleep(120)

Checkpointer.save = slow_save
sys.argv = ["resnet_jax.main"] + sys.argv[1:]
app.run(main.main, flags_parser=main.parse_flags)
"""


def test_a_second_ctrl_c_stops_at_once(cifar_dir, tmp_path, env):
    work = tmp_path / "impatient"
    cmd = cli_command(work, cifar_dir, checkpoint_every_steps=16)
    cmd = [sys.executable, "-c", _SLOW_SAVE_MAIN] + cmd[cmd.index("--config") :]
    proc = Watched(cmd, env)
    proc.wait_for(_first_train_line(work / "metrics.jsonl"))
    proc.proc.send_signal(signal.SIGINT)
    proc.wait_for_line("saving")
    proc.proc.send_signal(signal.SIGINT)
    rc, err = proc.finish(timeout=60)  # well before the save's two minutes
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped: interrupted (Ctrl-C) before a checkpoint"), err


# --- 5. one run per workdir ----------------------------------------------------------------------


def test_a_workdir_in_use_is_refused_and_a_dead_holders_lock_does_not_block(cifar_dir, tmp_path, env):
    work = tmp_path / "shared"
    cmd = cli_command(
        work, cifar_dir, schedule__total_steps=4000, schedule__boundaries=(3000,), checkpoint_every_steps=4000
    )
    holder = Watched(cmd, env)
    try:
        holder.wait_for(_first_train_line(work / "metrics.jsonl"))
        rc, err = run_cli(cmd, env)
        assert rc == 2, err[-3000:]
        line = assert_one_error_line(err)
        assert "is in use by" in line and f"pid {holder.proc.pid} on host {socket.gethostname()}" in line, (
            line
        )
        assert holder.proc.poll() is None, "the refused run disturbed the holder"
    finally:
        holder.proc.kill()  # dies without releasing anything itself
        holder.finish()
    assert (work / workdir.LOCK_FILE).is_file()
    # The killed holder's lock does not block a rerun (a shorter one, to finish quickly).
    rc, err = run_cli(cli_command(work, cifar_dir, allow_config_change=True), env)
    assert rc == 0, err[-3000:]
    assert json.loads((work / "results.json").read_text())["steps"] == 16


# --- 3. the infrastructure's failures against the user's -----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_peer_that_dies_mid_run_is_transient_for_the_survivor(cifar_dir, tmp_path, env):
    """Two processes on loopback (gloo); process 1 is killed once process 0 has started the
    run: process 0's next collective fails, and it exits 75 at once, not after the
    coordination service's heartbeat timeout (which would abort it: SIGABRT, minutes later)."""
    work = tmp_path / "pair"
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(2):
        cmd = cli_command(
            work,
            cifar_dir,
            schedule__total_steps=400,
            schedule__boundaries=(300,),
            checkpoint_every_steps=400,
            distributed__coordinator_address=address,
            distributed__num_processes=2,
            distributed__process_id=pid,
        )
        procs.append(Watched(cmd, env))
    survivor, victim = procs
    try:
        # Printed by process 0 after set-up (collectives included), before compiling.
        survivor.wait_for_line("starting from scratch")
        victim.proc.kill()
        victim.finish()
        rc, err = survivor.finish(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.finish()
    assert rc == errors.EXIT_TRANSIENT, err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert "the infrastructure failed, not the run" in line and "rerun the same command" in line, line


def test_a_workdir_that_cannot_be_created_is_the_users_to_fix(cifar_dir, tmp_path, env):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc, err = run_cli(cli_command(blocker / "run", cifar_dir), env)
    assert rc == 2, err[-3000:]
    assert str(blocker / "run") in assert_one_error_line(err)


# --- 6. first contact ----------------------------------------------------------------------------


def test_first_command_on_a_fresh_machine_without_data_or_network_is_one_line(env, tmp_path):
    """The README's first command with no CIFAR-10 anywhere (no CIFAR10_DIR, an empty home,
    so no ~/tensorflow_datasets) and the download refused: stderr is the error line alone."""
    fresh = {k: v for k, v in env.items() if k not in ("CIFAR10_DIR", "TFDS_DATA_DIR")}
    fresh.update(
        HOME=str(tmp_path / "home"),
        RESNET_JAX_DATA=str(tmp_path / "cache"),
        RESNET_JAX_DATA_URL="http://127.0.0.1:9",
    )  # the discard port: refused
    (tmp_path / "home").mkdir()
    rc, err = run_cli(
        [
            sys.executable,
            "-m",
            "resnet_jax.main",
            "--config",
            "configs/cifar10.py:quick",
            "--workdir",
            str(tmp_path / "runs" / "quick"),
        ],
        fresh,
    )
    assert rc == 2, err[-3000:]
    line = assert_one_error_line(err)
    assert "cannot download" in line and "cifar-10-binary.tar.gz" in line, line
