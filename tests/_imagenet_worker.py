"""A subprocess for tests/test_imagenet_train.py: one of N processes reading ImageNet.

argv[1] is JSON: {"port", "process_id", "num_processes", "folder", "out"}. Each process
starts jax.distributed (gloo on CPU), builds the trainer's ImageNet source and reads its
own share of two train steps and of the whole evaluation; the global batches, gathered to
every process, are written by process 0 as an .npz.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

job = json.loads(sys.argv[1])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    f"127.0.0.1:{job['port']}", num_processes=job["num_processes"], process_id=job["process_id"]
)

from test_imagenet_train import small_config  # noqa: E402

from resnet_jax import parallel  # noqa: E402
from resnet_jax.train import sources, steps  # noqa: E402

config = small_config(job["folder"])
mesh = parallel.make_mesh()
info = sources.describe(config)
source = sources.build(config, mesh, info, steps.train_step, steps.eval_step)
gather = jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))

train = source._train_batches(3)  # steps 3 and 4: from the middle of the first epoch
out = {}
for i in range(2):
    batch = next(train)
    out[f"image{i}"], out[f"label{i}"] = (
        np.asarray(gather(batch["image"])),
        np.asarray(gather(batch["label"])),
    )
labels, masks = [], []
for batch in source.eval_batches():
    labels.append(np.asarray(gather(batch["label"])))
    masks.append(np.asarray(gather(batch["mask"])))
out["eval_label"], out["eval_mask"] = np.concatenate(labels), np.concatenate(masks)
if jax.process_index() == 0:
    np.savez(job["out"], **out)
