r"""Train-step throughput and compile time on synthetic data, as one JSON line per measurement.

  python scripts/benchmark.py --model cifar_resnet20 --batch 128 --dtype bfloat16
  python scripts/benchmark.py --model resnet50 --batch 256 --dtype bfloat16 --image-size 224

Two measurements in the same process, so their ratio is what to read:
- `resnet_jax`: the trainer's own path (`feeding.TrainChunk`): the dataset on the devices,
  K steps per dispatch (lax.scan on GPU/TPU), gather + crop + flip on the device.
- `baseline`: the plain JAX loop a user would write first: one `jax.jit(train_step)` call
  per step on a batch already on the device (no augmentation at all).
Compilation is timed separately and kept out of the throughput; every timing blocks until
the devices are done; the best of `--repeats` is reported with the others alongside.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models, parallel
from resnet_jax.data import augment
from resnet_jax.train import feeding, optim, steps
from resnet_jax.train.state import create_train_state


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--batch", type=int, default=128, help="global batch over all devices")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--image-size", type=int, default=None, help="default: 32 for CIFAR nets, 224 otherwise")
    p.add_argument("--steps-per-dispatch", type=int, default=100)
    p.add_argument("--dispatches", type=int, default=5, help="timed dispatches per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-baseline", action="store_true")
    return p.parse_args(argv)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> list[dict]:
    args = parse(argv)
    mesh = parallel.make_mesh()
    parallel.check_divisible(args.batch, mesh, "--batch")
    model = models.build_model(args.model, dtype=args.dtype)
    size = args.image_size or (32 if model.stem == "cifar" else 224)
    num_classes = model.num_classes
    tx = optim.sgd(optim.step_schedule(0.1, (10**9,)), 0.9, False, 1e-4)
    state = create_train_state(model, tx, jax.random.key(0, impl="rbg"), (size, size, 3), mesh)

    rng = np.random.default_rng(0)
    n = max(4 * args.batch, 1024)
    rep = parallel.replicated(mesh)
    split = feeding.DeviceSplit(
        images=parallel.host_to_global(rng.integers(0, 256, (n, size, size, 3), np.uint8), rep),
        labels=parallel.host_to_global(rng.integers(0, num_classes, n).astype(np.int32), rep),
    )
    data = feeding.DeviceData(
        train=split,
        test=split,
        mean=parallel.host_to_global(np.full(3, 0.5, np.float32), rep),
        std=parallel.host_to_global(np.full(3, 0.25, np.float32), rep),
    )
    k = args.steps_per_dispatch
    idx = parallel.host_to_global(
        rng.integers(0, n, (k, args.batch)).astype(np.int32), parallel.batch_sharded(mesh, axis=1)
    )
    common = {
        "model": args.model,
        "batch": args.batch,
        "dtype": args.dtype,
        "image_size": size,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "params": models.count_params(state.params),
    }
    out = []

    chunk = feeding.TrainChunk(steps.train_step, mesh, seed=0, pad=4 if size == 32 else 0, flip=True)
    compile_s = chunk.compile(state, data, idx)
    holder = {"state": state}

    def run_chunks():
        for _ in range(args.dispatches):
            holder["state"], m = chunk(holder["state"], data, idx)
        return m

    jax.block_until_ready(run_chunks())  # warm-up
    times = timed(run_chunks, args.repeats)
    images = args.dispatches * k * args.batch
    out.append(
        {
            "bench": "resnet_jax",
            **common,
            "steps_per_dispatch": k,
            "fused": chunk.fused,
            "compile_s": round(compile_s, 3),
            "img_per_s": images / min(times),
            "img_per_s_all": [images / t for t in times],
            "ms_per_step": 1e3 * min(times) / (images / args.batch),
        }
    )

    if not args.no_baseline:
        batch = {
            "image": augment.eval_batch(data.train.images[: args.batch], data.mean, data.std, jnp.float32),
            "label": data.train.labels[: args.batch],
        }
        batch = jax.device_put(batch, parallel.batch_sharded(mesh))
        step = jax.jit(steps.train_step, donate_argnums=(0,))
        start = time.perf_counter()
        compiled = step.lower(holder["state"], batch).compile()
        base_compile = time.perf_counter() - start

        def run_steps():
            for _ in range(args.dispatches * k):
                holder["state"], m = compiled(holder["state"], batch)
            return m

        jax.block_until_ready(run_steps())
        times = timed(run_steps, args.repeats)
        out.append(
            {
                "bench": "baseline",
                **common,
                "steps_per_dispatch": 1,
                "compile_s": round(base_compile, 3),
                "img_per_s": images / min(times),
                "img_per_s_all": [images / t for t in times],
                "ms_per_step": 1e3 * min(times) / (images / args.batch),
            }
        )
        out[0]["ratio_vs_baseline"] = out[0]["img_per_s"] / out[1]["img_per_s"]
    for record in out:
        print(json.dumps(record), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
