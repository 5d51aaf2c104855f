r"""CIFAR-10 with the recipe of He et al. (2015), Section 4.2: every CIFAR net (`resnet20` ...
`resnet1202`, `plain56`, `preact_resnet164`, ...) and `quick` for 2 CPU cores.

  python -m resnet_jax.main --config configs/cifar10.py:resnet56 --workdir runs/resnet56

The recipe ships with the package, so that it also works from an installed copy: its
options, defaults and expected results are documented in resnet_jax/configs/cifar10.py.
"""

from resnet_jax.configs.cifar10 import get_config  # noqa: F401
