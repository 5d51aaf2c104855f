"""Reading what a training run left in its workdir, for tests."""

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def final_arrays(workdir: Path) -> tuple[int, Any]:
    """The newest checkpoint's arrays, restored without knowing their structure."""
    mngr = ocp.CheckpointManager(os.path.abspath(workdir / "checkpoints"))
    try:
        step = mngr.latest_step()
        items = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        mngr.close()
    return step, jax.tree.map(np.asarray, items)
