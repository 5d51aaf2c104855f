"""BN statistics recalibrated after training ("precise BN"): the authors' practice.

The He et al. released ImageNet models did not keep BN's moving averages: their statistics were
"strictly computed using average (not moving average) on a sufficiently large training batch
after the training procedure" (KaimingHe/deep-residual-networks). Later work calls this
"precise BN" (Wu & Johnson 2021). The definition computed here:

* the weights stay fixed; the network runs forward in training mode over N training images,
  cut into pieces of the batch BN saw in training (``batch_size / accumulate_steps``), so
  that every BN layer normalises each piece with the piece's own statistics, exactly as
  training did (and each ghost group of ``model.ghost_batch_size`` images with its own, when
  the model has ghost BN; a ``bn_frozen`` model is run unfrozen, as the definition asks);
* for every BN layer, its new ``mean`` is the mean of its input activations over all N images
  (and every spatial position), its new ``var`` their (biased, as Flax keeps it) variance over
  all N images, ``E[x^2] - E[x]^2``: combined exactly from per-piece sums of x and x^2, not a
  mean of per-piece variances (which would leave out the spread of the piece means).

The sums are of ``x - c`` and ``(x - c)^2``, where ``c`` is the layer's moving-average mean
before recalibration: a constant per channel, which changes nothing in the mathematics but
keeps the float32 sums from cancelling when a channel's mean is large against its spread.
Each piece's sums are reduced on the devices (in the dtype of BN's own statistics: float32, or
float64 on the models' float64 path), then added up in float64 on the host.

Pieces are global batches sharded over every device of every process, as in training: the sums
are reduced over the mesh by XLA, so the result does not depend on how many devices share a
piece (to float rounding). Which images, in which order, is the data source's business
(`recalibration_pieces`: the first N images of the run's epoch-0 order, through the
evaluation transform: deterministic, and the input distribution the statistics will
normalise at test time); this module only needs an iterable of image batches.

The BN inputs are caught with a Flax method interceptor around `GhostBatchNorm.__call__`, so
the model's code knows nothing of recalibration.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import parallel
from resnet_jax.models.blocks import GhostBatchNorm
from resnet_jax.train.checkpoint import Checkpointer

COLLECTION = "bn_moments"


@dataclasses.dataclass(frozen=True)
class Moments:
    """Per-channel moments of one BN layer's input over every image seen.

    `count`: values per channel (images x height x width); `shift`: the constant `c`
    subtracted before summing; `sum1`, `sum2`: sums of ``x - c`` and ``(x - c)^2``, float64.
    """

    count: int
    shift: np.ndarray
    sum1: np.ndarray
    sum2: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.shift + self.sum1 / self.count

    @property
    def var(self) -> np.ndarray:
        # E[(x-c)^2] - E[x-c]^2 = Var[x]; clipped like BN's own E[x^2] - E[x]^2.
        return np.maximum(0.0, self.sum2 / self.count - np.square(self.sum1 / self.count))


def _capture(next_fun, args, kwargs, context):
    """Intercepts BN calls: sows the shifted sums of the input, then runs BN unchanged."""
    module = context.module
    if not isinstance(module, GhostBatchNorm) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    x = args[0]
    stats_dtype = jnp.promote_types(jnp.promote_types(module.dtype, module.param_dtype), jnp.float32)
    # The moving-average mean as it was before this call (training mode updates it).
    shift = module.get_variable("batch_stats", "mean").astype(stats_dtype)
    y = next_fun(*args, **kwargs)
    d = x.astype(stats_dtype) - shift
    axes = tuple(range(x.ndim - 1))
    count = jnp.int32(x.size // x.shape[-1])  # static: values per channel in this piece
    module.sow(COLLECTION, "sums", (count, shift, jnp.sum(d, axis=axes), jnp.sum(jnp.square(d), axis=axes)))
    return y


def _unfrozen(model: nn.Module) -> nn.Module:
    # bn_frozen normalises with the running statistics even in training mode; the definition
    # needs each piece's own statistics, so recalibration always runs BN as training does.
    return model.clone(bn_frozen=False) if getattr(model, "bn_frozen", False) else model


def piece_sums_fn(model: nn.Module):
    """jit(variables, images) -> {BN layer path: (count, shift, sum1, sum2)} of one piece."""
    model = _unfrozen(model)

    def sums(variables: Mapping[str, Any], images: jax.Array) -> dict[str, tuple]:
        with nn.intercept_methods(_capture):
            _, state = model.apply(
                {"params": variables["params"], "batch_stats": variables["batch_stats"]},
                images,
                train=True,
                mutable=["batch_stats", COLLECTION],
            )
        out = {}
        for path, calls in flax.traverse_util.flatten_dict(flax.core.unfreeze(state[COLLECTION])).items():
            if len(calls) != 1:  # a BN layer called twice would mix two different inputs
                raise ValueError(f"BN layer {'/'.join(path[:-1])} ran {len(calls)} times in one forward pass")
            out["/".join(path[:-1])] = calls[0]
        return out

    return jax.jit(sums)


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole value on this host, also where the global array spans several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:  # the usual case: the sums were all-reduced
            return np.asarray(x.addressable_shards[0].data)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def bn_moments(
    model: nn.Module, variables: Mapping[str, Any], pieces: Iterable[jax.Array]
) -> dict[str, Moments]:
    """Moments of every BN layer's input ('stage1_block1/bn1': Moments) over all `pieces`.

    `pieces`: batches of images [P, H, W, C], normalised as the model expects (global arrays
    sharded over the mesh, or host arrays); each is one BN batch, as a training step's.
    """
    fn = piece_sums_fn(model)
    totals: dict[str, list] = {}
    for images in pieces:
        for path, (count, shift, s1, s2) in fn(variables, images).items():
            entry = totals.setdefault(path, [0, np.asarray(_to_host(shift), np.float64), 0.0, 0.0])
            entry[0] += int(_to_host(count))
            entry[2] = entry[2] + np.asarray(_to_host(s1), np.float64)
            entry[3] = entry[3] + np.asarray(_to_host(s2), np.float64)
    if not totals:
        raise ValueError("bn_moments: no pieces were given, or the model has no BN layer")
    return {path: Moments(*entry) for path, entry in totals.items()}


def recalibrated_batch_stats(
    model: nn.Module, variables: Mapping[str, Any], pieces: Iterable[jax.Array]
) -> dict[str, Any]:
    """`variables['batch_stats']` with every BN layer's mean and var recalibrated over `pieces`.

    Same tree, dtypes and shardings as the given statistics; every BN layer must have run.
    """
    moments = bn_moments(model, variables, pieces)
    old = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["batch_stats"]))
    new = {}
    for path, leaf in old.items():
        layer, name = "/".join(path[:-1]), path[-1]
        if layer not in moments or name not in ("mean", "var"):
            raise ValueError(f"batch_stats entry {'/'.join(path)} belongs to no BN layer that ran")
        value = getattr(moments[layer], name).astype(leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        new[path] = jax.device_put(value, sharding) if sharding is not None else value
    return flax.traverse_util.unflatten_dict(new)


DIRECTORY = "bn_recalibrated"


def save(directory: str | os.PathLike, step: int, params: Any, batch_stats: Any, metadata: Mapping) -> Path:
    """Writes `params` with the recalibrated `batch_stats` under `directory/checkpoints/<step>/`.

    The layout of a converted checkpoint (items step, params, batch_stats; a sha256 manifest),
    so the weight readers (`scripts/evaluate.py --checkpoint`, `convert`, `init_from`) take it
    as they are; inside a workdir they find the model in the workdir's config.json. A directory
    of this name from an earlier recalibration is replaced; the training checkpoints, in their
    own directory, are never touched. Every process calls it (the arrays may be global).
    """
    directory = Path(os.path.abspath(os.fspath(directory)))
    if parallel.is_main_process() and directory.exists():
        shutil.rmtree(directory)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"recalibrate.save:{directory}")
    leaf = jax.tree.leaves(params)[0]
    # A global array like the others: orbax refuses a host scalar from several processes.
    step_item = (
        jax.device_put(np.int32(step), leaf.sharding) if isinstance(leaf, jax.Array) else np.int32(step)
    )
    items = {"step": step_item, "params": params, "batch_stats": batch_stats}
    with Checkpointer(directory / "checkpoints", max_to_keep=1, async_save=False) as checkpointer:
        checkpointer.save(step, items, metadata=dict(metadata))
    return directory
