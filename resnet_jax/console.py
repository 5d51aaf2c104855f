"""The console: what a person sees of a run by default, and how to see more.

Shared by the command-line entry points (`resnet_jax.main`, `scripts/evaluate.py`); it
defines no flags, so any of them can import it. `parse_flags` is their absl flag parser:
a mistake on the command line (a misspelt `--config.` field, a value of the wrong type, a
config file that does not load) is one `error:` line and exit status 2, not a traceback.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import NoReturn

from absl import flags
from absl import logging as absl_logging

from resnet_jax.errors import EXIT_USER_ERROR


class _PlainFormatter(logging.Formatter):
    """The project's INFO lines as they are; anything louder says its level, without absl's prefix."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def configure_logging(detailed: bool) -> None:
    """Quiet by default: resnet_jax's INFO lines and everyone's warnings, no prefixes.

    `detailed` (the user gave --verbosity/-v): absl's format, every logger at absl's level.
    """
    root = logging.getLogger()
    if detailed:
        root.setLevel(absl_logging.get_absl_logger().getEffectiveLevel())
        # orbax logs every save step by step at INFO through absl: its warnings only, still.
        logging.getLogger("absl").setLevel(max(logging.WARNING, root.level))
        return
    # JAX's backend probing ("Unable to initialize backend 'tpu'") and other libraries'
    # INFO lines stay out of the default console.
    root.setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("resnet_jax").setLevel(logging.INFO)
    absl_logging.get_absl_handler().setFormatter(_PlainFormatter("%(message)s"))


def usage_error(message: str) -> NoReturn:
    """One `error:` line on stderr, exit status 2: the user's mistake, said once."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _innermost_text(error: BaseException) -> str:
    """ml_collections wraps a KeyError's message in an AttributeError(KeyError(...)); unwrap it."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _override_message(error: BaseException, argv: list[str]) -> str:
    """'--config.optimizer.learnin_rate=0.1: no such config field 'learnin_rate'; did you mean ...'"""
    lines = [line.strip() for line in _innermost_text(error).splitlines() if line.strip()]
    key = re.fullmatch(r"'([^']*)'", lines[0]) if lines else None
    if key is None:
        return "; ".join(lines) or type(error).__name__
    name = key.group(1)
    culprit = next(
        (
            a
            for a in argv
            if a.startswith("--") and "." in a.split("=")[0] and name in a.split("=")[0].split(".")
        ),
        None,
    )
    hints = [line[0].lower() + line[1:] for line in lines[1:]]
    return "; ".join([f"{culprit or 'a --config. override'}: no such config field {name!r}", *hints])


def _load_failure(value: object) -> str | None:
    """Why a config flag's file did not load (ml_collections defers that error), or None."""
    if type(value).__name__ != "_ErrorConfig":
        return None
    try:
        value.keys()  # type: ignore[attr-defined]  # raises the deferred OSError
    except Exception as e:  # noqa: BLE001  the message is all that is wanted
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return lines[-1] if lines else type(e).__name__
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`) with the user's mistakes
    as one `error:` line and exit status 2: absl says `FATAL Flags parsing error` and exits 1,
    and ml_collections raises a 30-line traceback for a misspelt `--config.` field.

    A config file that does not load (missing, a syntax error) is found here too, though
    ml_collections only raises when the config is first used."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        usage_error(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
        usage_error(_override_message(e, argv))
    except (TypeError, ValueError) as e:  # ml_collections: an override's value cannot be converted
        usage_error(_innermost_text(e))
    for name in flags.FLAGS:
        holder = flags.FLAGS[name]
        if type(holder).__name__ == "_ConfigFlag" and holder.present:
            why = _load_failure(holder.value)
            if why is not None:
                usage_error(
                    f"--{name} {getattr(holder, 'config_filename', '')}: the config file does not load: {why}"
                )
    return rest
