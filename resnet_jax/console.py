"""The console: what a person sees of a run by default, and how to see more.

Shared by the command-line entry points (`resnet_jax.main`, `scripts/evaluate.py`); it
defines no flags, so any of them can import it.
"""

from __future__ import annotations

import logging

from absl import logging as absl_logging


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
