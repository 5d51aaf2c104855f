r"""Command line: train and evaluate as a config says.

  python -m resnet_jax.main --config configs/cifar10.py:resnet56 --workdir runs/resnet56 \
      [--config.batch_size=1024 --config.model.dtype=bfloat16 ...]

Rerunning the same command resumes from the newest good checkpoint in the workdir.
The console shows what runs where, the progress bar, evaluations and a summary;
`--verbosity=0` (absl's INFO, with its prefixes and every library's INFO lines, JAX's
backend probing included) or `--verbosity=1` (DEBUG) bring the details back.
Exit status: 0 done; 2 a mistake in the config, the data or the workdir (one line,
before anything is compiled), or a full/unwritable disk; 3 the loss diverged (the last
good checkpoint is kept); 143 (128 + SIGTERM) preempted after saving a checkpoint:
rerun the same command to resume.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax.console import configure_logging
from resnet_jax.data import DataError
from resnet_jax.parallel import DistributedError
from resnet_jax.train.checkpoint import CheckpointError
from resnet_jax.train.config import ConfigError
from resnet_jax.train.loop import NonFiniteLossError, PreemptedError, train_and_evaluate
from resnet_jax.train.workdir import WorkdirError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py:resnet20.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])

# OSError: a disk that fills up or turns read-only mid-run (metrics, results.json);
# its message names the file.
USER_ERRORS = (ConfigError, DataError, WorkdirError, CheckpointError, DistributedError, OSError)
EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_PREEMPTED = 2, 3, 128 + 15


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_logging(detailed=flags.FLAGS["verbosity"].present)
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except PreemptedError as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    app.run(main)
