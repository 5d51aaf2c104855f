r"""CIFAR-10 with the recipe of He et al. (2015), Section 4.2.

Run (the paper's ResNet-56; any CIFAR depth 6n+2, residual or plain):

  python -m resnet_jax.main --config configs/cifar10.py:resnet56 --workdir runs/resnet56

`ARG` is a model name with the `cifar_` prefix left off (`resnet20`, `plain56`,
`preact_resnet164`, ...), or `quick` (a short run for 2 CPU cores: see `quick()`),
optionally followed by `,key=value` pairs for the few arguments that change derived values:
`resnet110,batch=1024`. Anything else is overridden with `--config.FIELD=VALUE`.

The recipe: SGD with momentum 0.9, weight decay 1e-4 on all weights (as L2 in the
gradient), batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, 64k iterations in
all, 4-px zero padding + random 32x32 crop + horizontal flip, per-pixel mean
subtraction, He initialisation, shortcut option A. ResNet-110 warms up at lr 0.01 for 400
iterations. Step counts are given at `reference_batch_size` (128) and rescaled to
`batch_size` by the linear scaling rule (Goyal et al. 2017), as is the learning rate.

What it should reach (paper, Table 6, test error on the 10k test set after training on
45k/5k is used to tune only): ResNet-20/32/44/56/110: 8.75 / 7.51 / 7.17 / 6.97 / 6.43 %.
"""

import ml_collections

from resnet_jax.train import config as config_lib


def get_config(arg: str = "resnet20") -> ml_collections.ConfigDict:
    name, _, rest = arg.partition(",")
    kwargs = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    if name == "quick":
        return quick(**kwargs)
    return paper(name, **kwargs)


def base() -> ml_collections.ConfigDict:
    """Every field the trainer reads, at the paper's values (resnet_jax/train/fields.py says
    what each means); only the schedule is this recipe's own."""
    c = config_lib.defaults("cifar10")
    c.schedule.total_steps = 64_000
    c.schedule.boundaries = (32_000, 48_000)
    return c


def paper(name: str, batch: str = "128") -> ml_collections.ConfigDict:
    c = base()
    c.model.name = name if name.startswith("cifar_") else "cifar_" + name
    c.batch_size = int(batch)
    depth = int("".join(ch for ch in name if ch.isdigit()) or 0)
    if depth >= 110:
        # Section 4.2: "0.01 to warm up the training until the training error is below
        # 80% (about 400 iterations), and then go back to 0.1".
        c.schedule.warmup_steps = 400
    return c


def quick(batch: str = "64") -> ml_collections.ConfigDict:
    """ResNet-20 for 2 CPU cores: about 10 minutes, about 66% test accuracy (README, Quick start).

    Same network, data, augmentation and optimizer as the paper; what it trades for time:
    1.5 epochs (1200 steps of batch 64) in place of 164, and a cosine schedule from lr 0.05
    (the paper's 0.1 at batch 128, linearly scaled) in place of the steps. Batch 64 because
    on 2 CPU cores it trains as many images per second as 128 while taking twice the steps,
    which is what a short run needs: measured on 2026-11-29, 1.28 epochs (cosine) gave 64.1% at
    batch 64 and 60.7% at batch 128.
    """
    c = paper("resnet20", batch=batch)
    c.schedule.kind = "cosine"
    c.schedule.total_steps = 600  # at reference_batch_size 128: 1200 steps of batch 64
    c.schedule.boundaries = ()
    c.steps_per_dispatch = 25
    c.log_every_steps = 50
    c.eval_every_steps = 1200
    c.checkpoint_every_steps = 200
    return c
