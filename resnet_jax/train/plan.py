"""The plan of a run: what validating a config yields, read by every later stage.

`make_plan` checks every field (train/fields.py declares them), looks at the data (sizes,
classes, input shape; a DataError names what is missing), derives the schedule at the batch
actually used (train/optim.py) and builds the model, once. The trainer and the evaluation
command read the plan; none of them derives these values from the raw config again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from resnet_jax import models
from resnet_jax.train import config as config_lib
from resnet_jax.train import sources
from resnet_jax.train.optim import Derived


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked config and what follows from it.

    Attributes:
      config: the config, every field checked.
      info: the data found: sizes, classes, input shape, the evaluation split's name.
      derived: steps, boundaries, warm-up and rates at the batch used; None for a plan that
        only evaluates (it has no training schedule).
      model: the network, with a head for the data's classes.
      bn_piece: images per BN batch in training (batch_size / accumulate_steps), the piece BN
        recalibration normalises at a time (`config.bn_piece_size`).
    """

    config: ml_collections.ConfigDict
    info: sources.DatasetInfo
    derived: Derived | None
    model: models.ResNet
    bn_piece: int


def make_plan(
    config: ml_collections.ConfigDict,
    num_devices: int,
    *,
    train: bool = True,
    checked: Mapping[str, Any] | None = None,
) -> Plan:
    """The plan of a run over `num_devices` devices; ConfigError or DataError first.

    `train=False`: an evaluation, for which the training split need not be there. `checked`:
    the flat config `config.check_fields` already returned (a run checks its fields before
    it starts the distributed runtime, and need not check them twice).
    """
    flat = dict(checked) if checked is not None else config_lib.check_fields(config)
    info = sources.describe(config, splits=("train", "eval") if train else ("eval",))
    if train:
        derived = config_lib.validate(
            config, num_devices=num_devices, sizes=(info.num_train, info.num_eval), checked=flat
        )
    else:
        derived = None
        if flat["eval_batch_size"] % num_devices:
            raise config_lib.ConfigError(
                f"config field eval_batch_size = {flat['eval_batch_size']} does not "
                f"divide by the {num_devices} devices"
            )
    return Plan(
        config,
        info,
        derived,
        config_lib.build_model(config, info.num_classes),
        bn_piece=config_lib.bn_piece_size(flat),
    )
