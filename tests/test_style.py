"""One style, checked: ruff's linter and formatter (configured in pyproject.toml) pass on the
whole tree, so the test command is also the style check."""

import subprocess
import sys

import pytest
from _configs import ROOT


@pytest.mark.parametrize("command", [["check", "--output-format", "concise"], ["format", "--check"]])
def test_ruff_passes(command):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
