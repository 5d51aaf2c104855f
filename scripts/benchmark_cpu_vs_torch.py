r"""The CIFAR ResNet-20 train step on the CPU: this project (JAX/XLA:CPU) against PyTorch, same process.

  python scripts/benchmark_cpu_vs_torch.py                      # batch 128, float32
  python scripts/benchmark_cpu_vs_torch.py --torch-compile      # adds torch.compile (slow to compile)
  python scripts/benchmark_cpu_vs_torch.py --no-convs           # skip the per-convolution profile

Prints JSON lines. `step` lines: images/s of one full train step (forward, backward, SGD
with momentum and weight decay, BatchNorm in training mode) on one synthetic batch,
for `jax` (the project's model and `steps.train_step`, one jitted call per step; on CPU
its convolutions go through `models.cpu_conv`, whose weight gradient is one im2col
matrix product: `conv_impl='im2col'`), `jax_xla_conv` (the same with XLA's own convolution
gradients, `conv_impl='xla'`, what the project did before),
`torch_eager` (NCHW), `torch_channels_last` and, when asked, `torch_compile`. The
candidates are timed in turns, `--repeats` rounds of `--steps` steps each, so a machine
shared with other work slows all of them alike; medians are reported, and the `ratio`
line divides each torch figure by JAX's. `conv` lines split the 3x3 convolutions of
each stage (16 channels at 32x32, 32 at 16x16, 64 at 8x8) into forward, input gradient
and weight gradient, in JAX and in torch (channels_last), which shows where XLA:CPU
loses time. Without torch installed only the JAX figures are printed.

Both networks are the paper's CIFAR ResNet-20 (option A shortcuts: strided subsampling
and zero channels), 269,722 parameters, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models, parallel
from resnet_jax.train import optim, steps
from resnet_jax.train.state import create_train_state


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth 6n+2")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds; medians are reported")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the cores this process may use)"
    )
    p.add_argument("--torch-compile", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-convs", action="store_true")
    return p.parse_args(argv)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- JAX


def jax_step(batch: int, depth: int, xla_conv: bool = False) -> tuple[Callable[[], Any], int]:
    """One train step of the project's model, as the trainer compiles it (no augmentation).

    `xla_conv`: XLA's own convolution on every backend (the reference), else the model's default.
    """
    mesh = parallel.make_mesh()
    model = models.build_model(f"cifar_resnet{depth}", conv_impl="xla" if xla_conv else "auto")
    tx = optim.sgd(optim.step_schedule(0.1, (10**9,)), 0.9, False, 1e-4)
    state = create_train_state(model, tx, jax.random.key(0), (32, 32, 3), mesh)
    rng = np.random.default_rng(0)
    data = {
        "image": jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, batch).astype(np.int32)),
    }
    step = jax.jit(steps.train_step, donate_argnums=(0,)).lower(state, data).compile()
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics)

    return run, models.count_params(state.params)


def jax_convs(batch: int) -> dict[str, Callable[[], Any]]:
    out = {}
    dn = ("NHWC", "HWIO", "NHWC")
    rng = np.random.default_rng(0)
    for channels, size in ((16, 32), (32, 16), (64, 8)):
        x = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))
        w = jnp.asarray(0.1 * rng.standard_normal((3, 3, channels, channels), np.float32))
        dy = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))

        def conv(x: jax.Array, w: jax.Array) -> jax.Array:
            return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

        fwd = jax.jit(conv)
        dgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
        wgrad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
        key = f"{channels}ch_{size}px"
        out[f"{key}/forward"] = lambda f=fwd, x=x, w=w: f(x, w).block_until_ready()
        out[f"{key}/input_grad"] = lambda f=dgrad, x=x, w=w, dy=dy: f(x, w, dy).block_until_ready()
        out[f"{key}/weight_grad"] = lambda f=wgrad, x=x, w=w, dy=dy: f(x, w, dy).block_until_ready()
    return out


# ---------------------------------------------------------------- torch


def _torch_resnet(torch: Any, depth: int) -> Any:
    nn = torch.nn
    F = torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout, momentum=0.1)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout, momentum=0.1)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x: Any) -> Any:
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            shortcut = x
            if self.stride != 1 or self.extra:  # option A: subsample, pad channels with zeros
                shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))
            return F.relu(y + shortcut)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            n = (depth - 2) // 6
            self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            blocks, cin = [], 16
            for stage, width in enumerate((16, 32, 64)):
                for i in range(n):
                    blocks.append(Block(cin, width, 2 if stage and i == 0 else 1))
                    cin = width
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(64, 10)

        def forward(self, x: Any) -> Any:
            x = self.blocks(F.relu(self.bn(self.conv(x))))
            return self.fc(x.mean((2, 3)))

    return Net()


def torch_steps(
    torch: Any, batch: int, depth: int, compile_too: bool
) -> tuple[dict[str, Callable[[], Any]], int]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    out = {}
    params = 0
    variants = [("torch_eager", False, False), ("torch_channels_last", True, False)]
    if compile_too:
        variants.append(("torch_compile", True, True))
    for name, channels_last, compiled in variants:
        net = _torch_resnet(torch, depth)
        params = sum(p.numel() for p in net.parameters())
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        inputs = x.contiguous(memory_format=fmt)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step(net: Any = net, opt: Any = opt, inputs: Any = inputs, loss_fn: Any = loss_fn) -> Any:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(inputs), y)
            loss.backward()
            opt.step()
            return loss

        out[name] = torch.compile(step) if compiled else step
    return out, params


def torch_convs(torch: Any, batch: int) -> dict[str, Callable[[], Any]]:
    F = torch.nn.functional
    out = {}
    torch.manual_seed(0)
    for channels, size in ((16, 32), (32, 16), (64, 8)):
        x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
        w = (0.1 * torch.randn(channels, channels, 3, 3)).contiguous(memory_format=torch.channels_last)
        dy = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
        key = f"{channels}ch_{size}px"

        def forward(x: Any = x, w: Any = w) -> Any:
            with torch.no_grad():
                return F.conv2d(x, w, padding=1)

        def input_grad(x: Any = x, w: Any = w, dy: Any = dy) -> Any:
            return torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1)

        def weight_grad(x: Any = x, w: Any = w, dy: Any = dy) -> Any:
            return torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1)

        out[f"{key}/forward"], out[f"{key}/input_grad"], out[f"{key}/weight_grad"] = (
            forward,
            input_grad,
            weight_grad,
        )
    return out


# ---------------------------------------------------------------- timing


def rounds(candidates: dict[str, Callable[[], Any]], per_round: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one list entry per round, candidates taking turns."""
    for fn in candidates.values():  # warm-up (and torch.compile's compilation)
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: PLC0415 (optional)
        except ImportError:
            torch = None
    if torch is not None:
        torch.set_num_threads(args.threads or _cores())
    common = {
        "batch": args.batch,
        "depth": args.depth,
        "cores": _cores(),
        "jax": jax.__version__,
        "torch": getattr(torch, "__version__", None),
        "load_avg_1m": os.getloadavg()[0],
    }
    run, params = jax_step(args.batch, args.depth)
    candidates = {"jax": run, "jax_xla_conv": jax_step(args.batch, args.depth, xla_conv=True)[0]}
    if torch is not None:
        torch_candidates, torch_params = torch_steps(torch, args.batch, args.depth, args.torch_compile)
        assert torch_params == params, (torch_params, params)  # the same network on both sides
        candidates.update(torch_candidates)
    times = rounds(candidates, args.steps, args.repeats)
    out: list[dict[str, Any]] = []
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        out.append(
            {
                "bench": "step",
                "impl": name,
                **common,
                "params": params,
                "ms_per_step": 1e3 * medians[name],
                "img_per_s": args.batch / medians[name],
                "img_per_s_rounds": [round(args.batch / s, 1) for s in t],
            }
        )
    ratio = {
        "bench": "ratio",
        **common,
        **{f"{name}_over_jax": medians["jax"] / medians[name] for name in medians if name != "jax"},
    }
    out.append(ratio)
    for record in out:  # now, before the longer convolution profile
        print(json.dumps(record), flush=True)
    printed = len(out)
    if not args.no_convs:
        convs = {f"jax/{k}": fn for k, fn in jax_convs(args.batch).items()}
        if torch is not None:
            convs.update({f"torch/{k}": fn for k, fn in torch_convs(torch, args.batch).items()})
        conv_times = rounds(convs, 2, args.repeats)
        for name, t in conv_times.items():
            impl, layer, part = name.split("/")
            out.append(
                {
                    "bench": "conv",
                    "impl": impl,
                    "layer": layer,
                    "part": part,
                    **common,
                    "ms": 1e3 * statistics.median(t),
                }
            )
    for record in out[printed:]:
        print(json.dumps(record), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
