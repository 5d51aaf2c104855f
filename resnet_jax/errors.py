"""The project's error family and the exit status each member means on the command line.

Every error the trainer raises on purpose derives from `ResNetJaxError`, whose class
attribute `exit_status` is what `python -m resnet_jax.main` exits with, so the command
line maps errors by family and a new error class cannot be forgotten there:

- `UserError` (2): something the user must fix before rerunning (the config, the data,
  the workdir, a full or read-only disk); rerunning unchanged fails the same way.
  `UsageError` is the one for a bad argument of a command or a library call.
- `TransientError` (75, EX_TEMPFAIL of sysexits.h): the infrastructure failed (the
  network, the distributed runtime, a peer process that died); nothing is wrong with
  the run, and a scheduler should retry it: rerunning resumes from the last checkpoint.

The stops in the middle of a run (divergence: 3; SIGTERM: 143; Ctrl-C: 130) are
`ResNetJaxError`s with their own statuses, defined where they are raised
(`resnet_jax.train.loop`). This module imports nothing, so every layer may use it.
"""

from __future__ import annotations

import errno
import gc
import warnings

EXIT_USER_ERROR = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: "temporary failure, the user is invited to retry"


class ResNetJaxError(Exception):
    """Base of the project's errors; `exit_status` is the command line's exit status."""

    exit_status = 1


class UserError(ResNetJaxError):
    """A mistake the user must fix (config, data, workdir, disk); exit status 2."""

    exit_status = EXIT_USER_ERROR


class UsageError(UserError, ValueError):
    """A bad argument of a command or of a library call (a name, a count, a depth); the
    message names it. Exit status 2."""


class TransientError(ResNetJaxError):
    """An infrastructure failure a rerun may not meet (network, distributed runtime); exit status 75."""

    exit_status = EXIT_TRANSIENT


# OSErrors that say the network or a remote peer failed, not the local disk or a path the
# user gave (those stay user errors: ENOSPC, EROFS, EACCES, ENOENT, ...). ESTALE: an NFS
# handle the server dropped; EIO: a device or network filesystem that failed under us.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "ETIMEDOUT",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "EPIPE",
        "ESTALE",
        "EIO",
        "EAGAIN",
        "ENOLINK",
        "ECOMM",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)

# Status codes (absl / gRPC) at the start of a jaxlib runtime error that mean a collective,
# the coordination service or a peer failed, not the program: the run can be retried.
_TRANSIENT_RUNTIME_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED")
_TRANSIENT_RUNTIME_WORDS = (
    "gloo",
    "coordination service",
    "heartbeat",
    "connection reset",
    "connection closed",
    "broken pipe",
    "socket closed",
)


def is_transient(error: BaseException) -> bool:
    """Whether `error` is an infrastructure failure that a retry of the same run may not meet."""
    if isinstance(error, TransientError):
        return True
    if isinstance(error, ResNetJaxError):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError):
        return error.errno in _TRANSIENT_ERRNOS
    if type(error).__name__ in ("XlaRuntimeError", "JaxRuntimeError"):  # jaxlib's, without importing it
        text = str(error)
        return text.startswith(_TRANSIENT_RUNTIME_CODES) or any(
            word in text.lower() for word in _TRANSIENT_RUNTIME_WORDS
        )
    return False


def exit_status(error: BaseException) -> int | None:
    """The command line's exit status for `error`, or None for an unexpected error (a bug:
    its traceback is worth showing). Every OSError that is not transient is the user's to fix."""
    if isinstance(error, ResNetJaxError):
        return error.exit_status
    if is_transient(error):
        return EXIT_TRANSIENT
    if isinstance(error, OSError):
        return EXIT_USER_ERROR
    return None


def first_line(error: BaseException, limit: int = 300) -> str:
    """The gist of an error for a one-line message: its first line, at most `limit` characters.

    TensorFlow's and orbax's errors span many lines (op traces, stacks); the type's name
    stands in for an empty message.
    """
    text = str(getattr(error, "message", error)).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def silence_abandoned_work() -> None:
    """Keeps an error message the last thing a failed command prints.

    A library whose background save failed (orbax on a full disk) leaves coroutines that
    were never awaited; Python warns about each when it frees them, which can be at
    interpreter exit, after the `error:` line. Those warnings say nothing the user can act
    on, so on the way out they are ignored and what is already unreachable is freed now.
    """
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    gc.collect()
