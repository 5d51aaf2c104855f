"""Loads the project's config files (configs/*.py) the way `--config path:arg` does."""

from pathlib import Path

import ml_collections

from resnet_jax.experiments import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def load_config(arg: str = "resnet20", file: str = "cifar10.py") -> ml_collections.ConfigDict:
    """`get_config(arg)` of configs/`file`, loaded by path (the one loader the experiments use)."""
    return load_config_file(ROOT / "configs" / file, arg)


def tiny_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    """A CIFAR ResNet-8 on a 2,048-image subset: seconds per run on 2 CPU cores."""
    config = load_config("resnet8")
    config.dataset.data_dir = str(data_dir)
    config.dataset.source = "binary"
    config.dataset.train_subset = 2048
    config.dataset.eval_subset = 500
    config.batch_size = 32
    config.reference_batch_size = 32
    config.eval_batch_size = 250
    config.optimizer.learning_rate = 0.05
    config.schedule.total_steps = 16
    config.schedule.boundaries = (12,)
    config.steps_per_dispatch = 4
    config.log_every_steps = 4
    config.eval_every_steps = 8
    config.checkpoint_every_steps = 4
    config.tensorboard = False
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
