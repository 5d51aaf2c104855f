r"""CIFAR-100 with the CIFAR-10 recipe of He et al. (2015), Section 4.2, unchanged.

  python -m resnet_jax.main --config configs/cifar100.py:resnet56 --workdir runs/c100_resnet56

The paper trains no CIFAR-100 model; this is its CIFAR-10 recipe (same networks, SGD,
schedule, augmentation, per-pixel mean) with a 100-way classifier on the 100 fine labels.
`--config.dataset.label_mode=coarse` trains on the 20 superclasses instead. `ARG` is as in
configs/cifar10.py (`resnet20`, `preact_resnet164,batch=256`, `quick`, ...).

Data: with no `--config.dataset.data_dir` and no $CIFAR100_DIR, the official binary archive
(https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz) is downloaded once into
$RESNET_JAX_DATA (default ~/.cache/resnet_jax) and verified against its published MD5.
"""

import ml_collections

from resnet_jax.configs import cifar10


def get_config(arg: str = "resnet20") -> ml_collections.ConfigDict:
    c = cifar10.get_config(arg)
    c.dataset.name = "cifar100"
    c.dataset.label_mode = "fine"  # 'fine': 100 classes; 'coarse': the 20 superclasses
    return c
