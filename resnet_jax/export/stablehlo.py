"""A model as a serialized ``jax.export`` artifact: StableHLO with the weights inside.

The weights are closed over, so they become constants of the program: the artifact is one
self-contained file whose only input is the image batch. The batch dimension is symbolic (one
artifact serves every batch size) and the program is lowered for several platforms at once;
``jax.export.deserialize(data).call(images)`` runs it on whichever the caller has, with no
resnet_jax (nor Flax) installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax.files import atomic_write_bytes

PLATFORMS = ("cpu", "cuda", "tpu")


def export(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    variables: Mapping[str, Any],
    image_shape: Sequence[int],
    platforms: Sequence[str] = PLATFORMS,
) -> jax.export.Exported:
    """``apply_fn(variables, images)`` for float32 images ``[batch, *image_shape]``, any batch."""
    constants = jax.tree.map(jnp.asarray, dict(variables))
    spec = jax.ShapeDtypeStruct(
        jax.export.symbolic_shape(", ".join(["batch", *map(str, image_shape)])), jnp.float32
    )
    return jax.export.export(jax.jit(lambda images: apply_fn(constants, images)), platforms=tuple(platforms))(
        spec
    )


def write_stablehlo(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    variables: Mapping[str, Any],
    image_shape: Sequence[int],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    platforms: Sequence[str] = PLATFORMS,
) -> dict[str, Any]:
    """Exports (see :func:`export`) and writes the serialized bytes to ``path`` atomically.

    ``metadata`` is accepted for symmetry with the ONNX writer; a ``jax.export`` artifact has
    no place for it, so the caller's side JSON carries it. Returns what a consumer should know
    of the artifact itself: platforms, calling convention, the jax that wrote it, its shapes.
    """
    del metadata
    exported = export(apply_fn, variables, image_shape, platforms)
    data = bytes(exported.serialize())
    atomic_write_bytes(path, data)
    return {
        "platforms": list(exported.platforms),
        "calling_convention_version": int(exported.calling_convention_version),
        "jax_version": jax.__version__,
        "input_shape": [str(d) for d in exported.in_avals[0].shape],
        "output_shape": [str(d) for d in exported.out_avals[0].shape],
        "bytes": len(data),
    }
