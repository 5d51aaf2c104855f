r"""Command line: train and evaluate as a config says.

  python -m resnet_jax.main --config configs/cifar10.py:resnet56 --workdir runs/resnet56 \
      [--config.batch_size=1024 --config.model.dtype=bfloat16 ...]

Rerunning the same command resumes from the newest good checkpoint in the workdir.
The console shows what runs where, the progress bar, evaluations and a summary;
`--verbosity=0` (absl's INFO, with its prefixes and every library's INFO lines, JAX's
backend probing included) or `--verbosity=1` (DEBUG) bring the details back.

Exit status (every failure below is one line on stderr, `error:` or `stopped:`):
  0    done.
  2    a mistake to fix before rerunning: a misspelt or mistyped `--config.` override, a
       config file that does not load, a bad config value, missing or malformed data, a
       workdir that is unusable, full, read-only or in use by another run (the line names
       its host and pid), a missing file. Said before anything is compiled where possible.
  3    the loss diverged; the last good checkpoint is kept.
  75   (EX_TEMPFAIL) the infrastructure failed: the network, the distributed runtime, a
       peer process that died. Nothing is wrong with the run: a scheduler should retry;
       rerunning resumes from the last checkpoint.
  130  (128 + SIGINT) Ctrl-C: the dispatched steps were finished and a checkpoint saved and
       verified; rerun the same command to resume. A second Ctrl-C stops at once.
  143  (128 + SIGTERM) preempted, same as Ctrl-C.
  1    anything else is a bug, shown with its traceback.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax import errors
from resnet_jax.console import configure_logging, parse_flags
from resnet_jax.interop.weights import load_for_init
from resnet_jax.train.loop import PreemptedError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cifar10.py:resnet20.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_INTERRUPTED = 128 + 2  # the shell's status for a death by SIGINT


def report(error: BaseException) -> int | None:
    """Prints `error` as one line and returns the exit status its family means; None for a
    bug (the caller re-raises it, traceback and all)."""
    if isinstance(error, KeyboardInterrupt):
        # A second Ctrl-C, or one before training started: nothing was left half-done.
        print(
            "stopped: interrupted (Ctrl-C) before a checkpoint could be saved; rerun the same command to "
            "resume from the last one",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    status = errors.exit_status(error)
    if status is None:
        return None
    if isinstance(error, PreemptedError):
        print(f"stopped: {error}", file=sys.stderr)
    elif status == errors.EXIT_TRANSIENT and not isinstance(error, errors.TransientError):
        print(
            f"error: {_one_line(error)} ({type(error).__name__}: the infrastructure failed, not the run; "
            "rerun the same command to resume from the last checkpoint)",
            file=sys.stderr,
        )
    else:
        print(f"error: {error}", file=sys.stderr)
    return status


def _one_line(error: BaseException) -> str:
    """The first line of a runtime's message (jaxlib's carry stack traces below it)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_logging(detailed=flags.FLAGS["verbosity"].present)
    try:
        # The trainer knows no weight-file format: the loader for `init_from` is wired here.
        train_and_evaluate(_CONFIG.value, _WORKDIR.value, load_weights=load_for_init)
    except BaseException as e:  # mapped by family; bugs and SystemExit go on
        if isinstance(e, (SystemExit, GeneratorExit)):
            raise
        status = report(e)
        if status is None:
            raise
        errors.silence_abandoned_work()
        if status == errors.EXIT_TRANSIENT and _peers_may_be_gone():
            # A clean exit would wait in jax.distributed's shutdown barrier for the peer that
            # died, until the heartbeat timeout aborts this process (SIGABRT, minutes later),
            # hiding the status. The workdir's lock and files are the kernel's to release.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        sys.exit(status)


def _peers_may_be_gone() -> bool:
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
