"""The documentation site builds: `mkdocs build --strict` (mkdocs.yml at the root) with no error.

Strict mode, with mkdocs.yml's `validation` settings, turns every warning into a failure: a
page missing from the nav, a broken link or anchor, an API page whose object does not
import or whose docstring mkdocstrings cannot render. Nothing is fetched: the build is offline.
"""

import os
import subprocess
import sys

from _configs import ROOT


def test_site_builds_strict_and_has_every_page(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for page in (
        "index.html",
        "models/index.html",
        "reliability/index.html",
        "api/models/index.html",
        "api/train_config/index.html",
    ):
        assert (site / page).is_file(), page
    # The API pages hold the docstrings, not just a heading: a few names they must render.
    api = (site / "api" / "models" / "index.html").read_text()
    assert "build_model" in api and "BasicBlock" in api
    assert "train_and_evaluate" in (site / "api" / "train_loop" / "index.html").read_text()
    # The README's model table lives on the models page (tests/test_model_references.py reads it).
    assert "cifar_resnet1202" in (site / "models" / "index.html").read_text()
