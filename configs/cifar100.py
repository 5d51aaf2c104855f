r"""CIFAR-100 with the CIFAR-10 recipe, unchanged (100 fine labels; 20 coarse with
`--config.dataset.label_mode=coarse`).

  python -m resnet_jax.main --config configs/cifar100.py:resnet56 --workdir runs/c100_resnet56

The recipe ships with the package, so that it also works from an installed copy: its
options, defaults and expected results are documented in resnet_jax/configs/cifar100.py.
"""

from resnet_jax.configs.cifar100 import get_config  # noqa: F401
