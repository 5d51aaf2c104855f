"""A subprocess for tests/test_recalibrate.py: a tiny CIFAR run with BN recalibration on however
many devices XLA_FLAGS gives this process (set before JAX starts), then scripts/evaluate.py
--recalibrate-bn on its workdir.

argv[1] is a JSON job {"workdir", "data_dir", "overrides": {tiny_config's keyword overrides},
"out"}; writes what scripts/evaluate.py reports to `out` (JSON), and the final checkpoint's
variables and the saved bn_recalibrated ones to `out`.final.npz and `out`.saved.npz (keys:
tree paths joined by '/'), read here because an orbax checkpoint written on 8 devices does
not restore without a target tree on another device count.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import flax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _configs import tiny_config  # noqa: E402

from resnet_jax.interop import weights  # noqa: E402
from resnet_jax.train import loop, recalibrate  # noqa: E402
from resnet_jax.train.checkpoint import read_newest  # noqa: E402


def main() -> None:
    job = json.loads(sys.argv[1])
    config = tiny_config(job["data_dir"], **job["overrides"])
    loop.train_and_evaluate(config, job["workdir"])
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    n = config.bn_recalibration.num_images
    Path(job["out"]).write_text(json.dumps(script.evaluate(config, job["workdir"], recalibrate_bn=n)))
    final, _ = read_newest(Path(job["workdir"]) / "checkpoints")
    saved, _ = weights.load_variables(Path(job["workdir"]) / recalibrate.DIRECTORY)
    for name, tree in (("final", final), ("saved", saved)):
        variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
        np.savez(f"{job['out']}.{name}.npz", **flax.traverse_util.flatten_dict(variables, sep="/"))


if __name__ == "__main__":
    main()
