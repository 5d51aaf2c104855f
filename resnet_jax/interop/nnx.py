"""The models as Flax NNX modules, through ``flax.nnx.bridge`` (same weights, same outputs).

    model, variables = resnet_jax.pretrained('resnet50.pth')
    net = to_nnx(model, variables)          # an nnx.Module holding the weights
    logits = net(images, train=False)       # equals model.apply(variables, images, train=False)

The linen module stays the single definition of the network; the bridge only changes how
its variables are held (NNX ``Param`` / ``BatchStat`` objects inside the module instead of
a separate dict), so nothing can drift between the two.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge

from resnet_jax.interop.layout import ConversionError

# Linen collection -> the NNX variable type the bridge gives it.
_COLLECTIONS = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}


def to_nnx(model: Any, variables: Mapping[str, Any], seed: int = 0) -> nnx.Module:
    """An NNX module wrapping the linen ``model`` with ``variables`` loaded into it.

    The bridge learns the variable structure from one tiny forward pass (32x32: the
    shapes do not depend on the image size); then every variable is overwritten with
    ``variables``' value, and a variable missing from ``variables`` (or left over in it)
    raises ConversionError naming it.
    """
    net = bridge.ToNNX(model, rngs=nnx.Rngs(seed)).lazy_init(
        jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(net)):
        collection = next((c for c, t in _COLLECTIONS.items() if isinstance(var, t)), None)
        if collection is None:
            continue  # the bridge's own rng state
        node: Any = variables.get(collection, {})
        try:
            for p in path:
                node = node[p]
        except (KeyError, TypeError):
            raise ConversionError(f'variables have no {collection}/{"/".join(map(str, path))}, '
                                  'which the model needs') from None
        if tuple(node.shape) != tuple(var.get_value().shape):
            raise ConversionError(f'{collection}/{"/".join(map(str, path))} has shape '
                                  f'{tuple(node.shape)}; the model needs {tuple(var.get_value().shape)}')
        var.set_value(jnp.asarray(node, var.get_value().dtype))
        used.add((collection, *map(str, path)))
    for collection in variables:
        for leaf in _leaf_paths(variables[collection]):
            if (collection, *leaf) not in used:
                raise ConversionError(f'variable {collection}/{"/".join(leaf)} has no place in '
                                      'the model')
    return net


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, Mapping):
        return [p for k, v in tree.items() for p in _leaf_paths(v, prefix + (str(k),))]
    return [prefix]
