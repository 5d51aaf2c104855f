"""The default console: the project's lines plain, other libraries' INFO lines (JAX's backend
probing) hidden, warnings kept; `--verbosity` brings absl's format and everything back."""

from __future__ import annotations

import logging
import types

import pytest
from absl import logging as absl_logging

from resnet_jax import main as main_lib
from resnet_jax.parallel import describe_devices


@pytest.fixture
def absl_console(capsys):
    """The absl handler on the root logger, as app.run installs it; logging state restored after."""
    root = logging.getLogger()
    names = ("resnet_jax", "absl", "jax._src.xla_bridge")
    saved = (root.level, list(root.handlers), {n: logging.getLogger(n).level for n in names})
    handler = absl_logging.get_absl_handler()
    saved_formatter = handler.python_handler.formatter
    absl_logging.use_absl_handler()
    yield capsys
    handler.setFormatter(saved_formatter)
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def _lines(capsys) -> list[str]:
    # absl says this once when its flags were never parsed (under pytest; app.run parses them).
    return [
        line
        for line in capsys.readouterr().err.splitlines()
        if line != "WARNING: Logging before flag parsing goes to stderr."
    ]


def _emit() -> None:
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu': no libtpu")
    logging.getLogger("resnet_jax.train.loop").info("cifar_resnet20 on 1 CPU device (2 cores)")
    logging.getLogger("resnet_jax.train.loop").warning("SIGTERM received")
    logging.getLogger("orbax").info("saving step 10")


def test_default_console_is_plain_and_quiet(absl_console) -> None:
    main_lib.configure_logging(detailed=False)
    _emit()
    assert _lines(absl_console) == ["cifar_resnet20 on 1 CPU device (2 cores)", "warning: SIGTERM received"]


def test_verbosity_brings_back_details_and_prefixes(absl_console) -> None:
    absl_logging.set_verbosity(absl_logging.INFO)  # what --verbosity=0 sets
    main_lib.configure_logging(detailed=True)
    _emit()
    lines = _lines(absl_console)
    assert any("Unable to initialize backend 'tpu'" in line for line in lines)
    assert any(line.startswith("I") and "] cifar_resnet20 on 1 CPU" in line for line in lines)
    assert any(line.startswith("W") and "] SIGTERM received" in line for line in lines)


def test_describe_devices() -> None:
    assert describe_devices().startswith("1 CPU device (")  # this machine (conftest: one CPU device)
    gpus = [
        types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", process_index=i // 4)
        for i in range(8)
    ]
    assert describe_devices(gpus) == "8 NVIDIA H200 GPUs over 2 processes"
    assert describe_devices(gpus[:1]) == "1 NVIDIA H200 GPU"
    cpus = [types.SimpleNamespace(platform="cpu", device_kind="cpu", process_index=0)] * 2
    assert describe_devices(cpus).startswith("2 CPU devices (")
