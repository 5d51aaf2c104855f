"""Reading a network from the outside: the inputs of its blocks and the responses of its
3x3 layers, captured with flax method interceptors (``nn.intercept_methods``), so the
models carry no analysis code on their hot path. Also: loading a trained net from a
workdir, and a batch of CIFAR-10 images as the trainer normalises them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models
from resnet_jax.errors import UsageError
from resnet_jax.models import GhostBatchNorm

_BLOCK_NAME = re.compile(r"stage\d+_block\d+")


def is_block(module: nn.Module) -> bool:
    """A residual or plain block called by the network (named stage<i>_block<j>)."""
    return (
        hasattr(type(module), "residual")
        and module.name is not None
        and _BLOCK_NAME.fullmatch(module.name) is not None
    )


def block_interceptor(on_input: Callable[[str, Any], Any]) -> Callable:
    """An interceptor that replaces every block's input ``x`` by ``on_input(name, x)``."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and is_block(context.module):
            args = (on_input(context.module.name, args[0]),) + tuple(args[1:])
        return next_fun(*args, **kwargs)

    return interceptor


def conv3x3_bn_interceptor(on_response: Callable[[str, Any], None]) -> Callable:
    """Calls ``on_response(path, y)`` for every BN whose input is a 3x3 conv's output.

    ``y`` is the BN output: after BN, before the ReLU (and, in the last layer of a
    post-activation residual block, before the addition), the responses of Fig. 7.
    A BN is matched to the conv that fed it by the identity of the traced array, so
    nothing depends on submodule names.
    """
    last_conv = {"out": None, "kernel": None}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        if isinstance(module, nn.Conv):
            last_conv["out"], last_conv["kernel"] = out, tuple(module.kernel_size)
        elif isinstance(module, (GhostBatchNorm, nn.BatchNorm)):
            if args and args[0] is last_conv["out"] and last_conv["kernel"] == (3, 3):
                on_response("/".join(module.path), out)
        return out

    return interceptor


def init_variables(model: nn.Module, seed: int = 0) -> dict[str, Any]:
    """The variables the trainer starts from with this seed (same key derivation)."""
    key = jax.random.fold_in(jax.random.key(seed), 0)
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3), jnp.float32), train=False))(key)


def load_workdir(workdir: str | Path) -> tuple[dict[str, Any], nn.Module, dict[str, Any], int]:
    """(config, model, variables, step) of the newest checkpoint in a training workdir.

    Read-only, through the checkpoint module's reader (`train.checkpoint.read_newest`): the
    newest step is checked against its manifest, a damaged one is an error rather than a
    silent fallback, a run saved on another device count reads on this one, and analysing a
    run never changes its workdir.
    """
    from resnet_jax.train import checkpoint
    from resnet_jax.train import config as config_lib

    workdir = Path(workdir).resolve()
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{workdir}: no config.json; is this a training workdir?")
    config = json.loads(config_path.read_text())
    model = models.build_model(config["model"]["name"], **config_lib.model_overrides(config["model"]))
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder (the run saved nothing yet)")
    items, step = checkpoint.read_newest(ckpt_dir)
    variables = {"params": items["params"], "batch_stats": items["batch_stats"]}
    return config, model, jax.tree.map(jnp.asarray, variables), int(step)


def cifar_batch(
    data_dir: str | None, split: str, count: int, offset: int = 0, normalization: str = "pixel_mean"
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` CIFAR-10 images (float32, normalised with the training set's statistics,
    as the trainer does) and their labels, from ``split`` ('train' or 'test')."""
    from resnet_jax.data import augment, cifar

    data = cifar.load_cifar10("binary" if data_dir else "auto", data_dir)
    images = data.train_images if split == "train" else data.test_images
    labels = data.train_labels if split == "train" else data.test_labels
    if not 0 < count <= len(labels) - offset:
        raise UsageError(f"count={count} with offset={offset}: the {split} split has {len(labels)} images")
    mean, std = augment.normalization_stats(data.train_images, normalization)
    x = (images[offset : offset + count].astype(np.float32) / 255.0 - mean) / std
    return x.astype(np.float32), labels[offset : offset + count]
