"""The models as Flax NNX modules: same weights, same outputs, trainable with NNX tools.

    model, variables = resnet_jax.pretrained('resnet50.pth')
    net = to_nnx(model, variables)          # an nnx.Module holding the weights
    logits = net(images, train=False)       # equals model.apply(variables, images, train=False)
    logits = net(images, train=True)        # batch statistics; updates the running ones in net
    variables = to_linen(net)               # back: {'params', 'batch_stats'} for the project's tools

The linen module stays the single definition of the network; the wrapper only changes how
its variables are held (``nnx.Param`` / ``nnx.BatchStat`` objects inside the module instead
of a separate dict), so nothing can drift between the two. ``flax.nnx.bridge.ToNNX`` holds
them the same way but its ``net(x, train=True)`` fails on the immutable ``batch_stats``
unless every caller passes ``mutable=['batch_stats']``; this wrapper writes the new
statistics back in place, as ``nnx.BatchNorm`` does, so ``nnx.grad``, ``nnx.jit`` and
``nnx.Optimizer(net, tx, wrt=nnx.Param)`` work on it as on any NNX module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax.interop.layout import ConversionError

# Linen collection -> the NNX variable type holding it.
_COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class LinenNet(nnx.Module):
    """A linen network whose variables live in the module: ``params`` (nested dicts of
    ``nnx.Param``, as in linen's ``'params'`` collection) and ``batch_stats`` (of
    ``nnx.BatchStat``). Built by :func:`to_nnx`."""

    def __init__(self, model: Any, params: Any, batch_stats: Any):
        self.model = model  # static: the linen module is the definition, not state
        self.params = nnx.data(jax.tree.map(nnx.Param, params))
        self.batch_stats = nnx.data(jax.tree.map(nnx.BatchStat, batch_stats))

    def __call__(self, x: jax.Array, train: bool = False, **kwargs: Any) -> Any:
        """``model.apply`` with the held variables. ``train=True`` normalises with the batch
        statistics and writes the updated running statistics into ``batch_stats``."""
        variables = to_linen(self)
        if not train:
            return self.model.apply(variables, x, train=False, **kwargs)
        out, updates = self.model.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
        # In place (Variable.set_value), not by replacing the Variables: NNX transforms
        # (jit, grad) carry in-place writes out to the caller's module.
        jax.tree.map(
            lambda var, new: var.set_value(new), self.batch_stats, updates["batch_stats"], is_leaf=_is_var
        )
        return out


def to_linen(net: LinenNet) -> dict[str, Any]:
    """The module's variables as linen's ``{'params': ..., 'batch_stats': ...}`` (plain
    nested dicts of arrays): what ``model.apply``, checkpoints and the .pth export take."""
    return {"params": _values(net.params), "batch_stats": _values(net.batch_stats)}


def _values(tree: Any) -> Any:
    return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_var)


def to_nnx(model: Any, variables: Mapping[str, Any], seed: int = 0) -> LinenNet:
    """An NNX module wrapping the linen ``model`` with ``variables`` loaded into it.

    The variable structure comes from ``model.init`` traced abstractly (``jax.eval_shape``
    on a 32x32 image: the shapes do not depend on the image size; ``seed`` is its key and
    changes nothing). A variable missing from ``variables``, of another shape, or left over
    in it raises ConversionError naming it; values are cast to the model's dtypes.
    """
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)
    )
    loaded: dict[str, Any] = {}
    for collection in _COLLECTIONS:
        given = variables.get(collection, {})

        def load(path, spec, collection=collection, given=given):
            names = [str(getattr(p, "key", p)) for p in path]
            node: Any = given
            try:
                for name in names:
                    node = node[name]
            except (KeyError, TypeError):
                raise ConversionError(
                    f"variables have no {collection}/{'/'.join(names)}, which the model needs"
                ) from None
            if tuple(node.shape) != tuple(spec.shape):
                raise ConversionError(
                    f"{collection}/{'/'.join(names)} has shape "
                    f"{tuple(node.shape)}; the model needs {tuple(spec.shape)}"
                )
            return jnp.asarray(node, spec.dtype)

        loaded[collection] = jax.tree_util.tree_map_with_path(load, dict(abstract.get(collection, {})))
    for collection in variables:
        needed = {tuple(leaf) for leaf in _leaf_paths(abstract.get(collection, {}))}
        for leaf in _leaf_paths(variables[collection]):
            if collection not in _COLLECTIONS or leaf not in needed:
                raise ConversionError(f"variable {collection}/{'/'.join(leaf)} has no place in the model")
    return LinenNet(model, loaded["params"], loaded["batch_stats"])


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(tree, Mapping):
        return [p for k, v in tree.items() for p in _leaf_paths(v, prefix + (str(k),))]
    return [prefix]
