r"""Memory of the compiled train step under gradient accumulation (`accumulate_steps` = k).

  python scripts/benchmark_accumulate.py                      # ResNet-50, batch 256, 224 px
  python scripts/benchmark_accumulate.py --ks 1 4 --out accumulate.json

For each k the trainer's step (`steps.train_step`, jitted with the state donated, as the
trainer does) is lowered and compiled for abstract inputs (`jax.eval_shape`: nothing is
allocated and the step never runs), and XLA's buffer assignment reports its temporaries,
`compiled.memory_analysis().temp_size_in_bytes`: the activations kept for the backward pass
and every other intermediate, which accumulation shrinks; the arguments (the state and the
batch) and the outputs are the same for every k and listed apart. Prints a table with each
k's temporaries as a fraction of k=1's and writes the figures as JSON.

The figures are XLA:CPU's buffer assignment, a proxy for an accelerator's (which schedules
and fuses differently); `--conv-impl xla` (the default) compiles the convolutions that GPUs
and TPUs run, not the CPU's im2col weight gradient.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from resnet_jax import models, parallel
from resnet_jax.train import optim, steps
from resnet_jax.train.state import create_train_state


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256, help="the global batch of one optimizer update")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--conv-impl", default="xla", choices=("xla", "im2col"))
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="accumulate_steps values")
    p.add_argument("--out", default="benchmark_accumulate.json", help="where the JSON goes")
    return p.parse_args(argv)


def step_memory(state, batch, k: int) -> dict:
    """Compiles the step for k micro-batches; its memory analysis in bytes, and the compile time."""
    step = jax.jit(functools.partial(steps.train_step, accumulate_steps=k), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return {
        "accumulate_steps": k,
        "micro_batch": batch["label"].shape[0] // k,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "compile_s": seconds,
    }


def main(argv=None) -> dict:
    args = parse(argv)
    mesh = parallel.make_mesh()
    model = models.build_model(args.model, dtype=args.dtype, conv_impl=args.conv_impl)
    size = args.image_size
    tx = optim.sgd(optim.step_schedule(0.1, (10**9,)), 0.9, False, 1e-4)
    state = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0), (size, size, 3), mesh))
    sharding = parallel.batch_sharded(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=sharding),
    }
    rows = []
    for k in args.ks:
        row = step_memory(state, batch, k)
        rows.append(row)
        print(f"compiled k={k} in {row['compile_s']:.0f} s", file=sys.stderr, flush=True)
    base = next((r["temp_bytes"] for r in rows if r["accumulate_steps"] == 1), None)
    print(f"{args.model}, batch {args.batch}, {size}x{size}, {args.dtype}, conv {args.conv_impl}, "
          f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}")  # fmt: skip
    print(f"{'k':>3} {'micro':>6} {'temporaries MiB':>16} {'vs k=1':>7} {'arguments MiB':>14}")
    for r in rows:
        r["temp_vs_k1"] = r["temp_bytes"] / base if base else None
        ratio = f"{r['temp_vs_k1']:.3f}" if base else "-"
        print(f"{r['accumulate_steps']:>3} {r['micro_batch']:>6} {r['temp_bytes'] / 2**20:>16.1f} "
              f"{ratio:>7} {r['argument_bytes'] / 2**20:>14.1f}")  # fmt: skip
    result = {
        "model": args.model,
        "batch": args.batch,
        "image_size": size,
        "dtype": args.dtype,
        "conv_impl": args.conv_impl,
        "platform": jax.devices()[0].platform,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
