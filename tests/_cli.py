"""Running `python -m resnet_jax.main` from tests: the tiny CIFAR config as command-line flags,
and a bounded run that returns the exit status and stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from _configs import ROOT, load_config, tiny_config

from resnet_jax.train import config as config_lib


def config_flag(value: Any) -> str:
    """A config value as `--config.FIELD=` takes it (sequences as tuples)."""
    return str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)


def cli_command(workdir: Path, cifar_dir: Path, **overrides: Any) -> list[str]:
    """`python -m resnet_jax.main` with the --config.* flags that turn resnet8 into tiny_config."""
    base = config_lib.flatten(load_config("resnet8").to_dict())
    wanted = config_lib.flatten(tiny_config(cifar_dir, **overrides).to_dict())
    flags = [f"--config.{k}={config_flag(v)}" for k, v in sorted(wanted.items()) if base[k] != v]
    return [sys.executable, "-m", "resnet_jax.main", "--config", "configs/cifar10.py:resnet8",
            "--workdir", str(workdir), *flags]  # fmt: skip


def run_cli(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit status, stderr) of `args` run from the repository root; a hung run raises after `timeout`."""
    proc = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, check=False)  # fmt: skip
    return proc.returncode, proc.stderr
