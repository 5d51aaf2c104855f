"""Layer responses (Fig. 7 of the 2015 paper): the standard deviation of each 3x3 layer's
output after BN and before the nonlinearity (before the addition in residual blocks).

A layer's std is the per-channel standard deviation over images and positions, averaged
over channels: a BN output with unit scale and zero shift normalised with its own batch's
statistics has std 1 in every channel, so the number reads as "how far this layer's learned
scale moved the response from unit size". The paper's claim is that residual functions
are closer to zero than plain layers: ResNets have smaller responses, and deeper ResNets
smaller ones still.

Evaluation mode (BN with its running statistics) on test images is the default, as a
trained net would see them; ``train=True`` uses each batch's own statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.analysis.probes import conv3x3_bn_interceptor
from resnet_jax.errors import UsageError


def _moments_fn(model: nn.Module, train: bool, order: list[str]):
    """A jitted (variables, images) -> [(mean, squared deviations, count) per layer]; ``order``
    receives the layer paths while tracing (a list keeps them in call order, where a
    dict returned from jit would come back with its keys sorted)."""

    @jax.jit
    def moments(variables, images):
        order.clear()
        stats: list[tuple[jax.Array, jax.Array, jax.Array]] = []

        def on_response(path: str, y: jax.Array) -> None:
            y = y.astype(jnp.float32)
            axes = tuple(range(y.ndim - 1))
            order.append(path)
            # Centred within the batch: E[y^2] - E[y]^2 in float32 cancels badly when a
            # response's mean is large against its spread (as running statistics allow).
            mean = jnp.mean(y, axis=axes)
            stats.append(
                (
                    mean,
                    jnp.sum(jnp.square(y - mean), axis=axes),
                    jnp.asarray(np.prod(y.shape[:-1]), jnp.float32),
                )
            )

        with nn.intercept_methods(conv3x3_bn_interceptor(on_response)):
            if train:
                model.apply(variables, images, train=True, mutable=["batch_stats"])
            else:
                model.apply(variables, images, train=False)
        return stats

    return moments


def layer_responses(
    model: nn.Module, variables: Mapping[str, Any], images: Any, batch_size: int = 500, train: bool = False
) -> list[dict[str, Any]]:
    """[{'layer': 'stage1_block1/bn1', 'std': ..., 'channel_std': [...]}, ...] in layer order.

    Moments are merged over batches of ``batch_size`` in float64, so the result does not
    depend on the batch size in evaluation mode. With ``train=True`` every batch is
    normalised with its own statistics, so use a single batch there.
    """
    images = np.asarray(images, np.float32)
    if batch_size <= 0:
        raise UsageError(f"batch_size={batch_size} must be positive")
    order: list[str] = []
    moments = _moments_fn(model, train, order)
    # Per layer: (count, mean, sum of squared deviations), merged over batches in float64
    # (Chan et al.'s pairwise update), so the result does not depend on the batch size.
    acc: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        stats = jax.device_get(moments(variables, jnp.asarray(images[start : start + batch_size])))
        for path, (m, m2, n) in zip(order, stats):
            m, m2, n = np.asarray(m, np.float64), np.asarray(m2, np.float64), float(n)
            if path not in acc:
                acc[path] = (n, m, m2)
                continue
            na, ma, m2a = acc[path]
            delta = m - ma
            total = na + n
            acc[path] = (total, ma + delta * n / total, m2a + m2 + delta**2 * na * n / total)
    layers = []
    for path, (n, _, m2) in acc.items():  # insertion order = call order = layer order
        channel_std = np.sqrt(m2 / n)
        layers.append(
            {"layer": path, "std": float(channel_std.mean()), "channel_std": [float(v) for v in channel_std]}
        )
    return layers


def summary_row(layers: list[dict[str, Any]]) -> dict[str, float]:
    stds = np.array([layer["std"] for layer in layers])
    return {
        "layers": len(stds),
        "mean_std": float(stds.mean()),
        "median_std": float(np.median(stds)),
        "max_std": float(stds.max()),
    }


def markdown_table(data: Mapping[str, Any]) -> str:
    lines = [
        "| net | checkpoint step | 3x3 layers | mean std | median std | max std |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, net in data["nets"].items():
        r = summary_row(net["layers"])
        lines.append(
            f"| {name} | {net.get('step', '-')} | {r['layers']} | {r['mean_std']:.3f} | "
            f"{r['median_std']:.3f} | {r['max_std']:.3f} |"
        )
    return "\n".join(lines) + "\n"
