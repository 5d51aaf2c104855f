"""The recipes as ml_collections configs, shipped with the package: `get_config(arg)` of each
module is what `--config configs/NAME.py:ARG` runs from a checkout (configs/NAME.py there
re-exports it), and what `resnet_jax.configs.load(NAME, ARG)` returns from an installed one.

  cifar10            He et al. 2015, Sec. 4.2 (every CIFAR net; `quick` for 2 CPU cores)
  cifar100           the same recipe on CIFAR-100
  imagenet           He et al. 2015, Sec. 3.4 (and the Goyal / v1.5 / ghost variants)
  finetune_cifar10   converted ImageNet weights fine-tuned on CIFAR-10
"""

from __future__ import annotations

import importlib

import ml_collections

from resnet_jax.errors import UsageError

RECIPES = ("cifar10", "cifar100", "imagenet", "finetune_cifar10")


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of recipe `name` (one of RECIPES); `arg=None` is the recipe's default."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; the recipes are {', '.join(RECIPES)}")
    module = importlib.import_module(f"resnet_jax.configs.{name}")
    return module.get_config() if arg is None else module.get_config(arg)
