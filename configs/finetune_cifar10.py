r"""Converted ImageNet weights (torchvision/timm) fine-tuned on CIFAR-10.

  python -m resnet_jax.main --config configs/finetune_cifar10.py:resnet50 \
      --workdir runs/ft_resnet50 --config.init_from=runs/tv_resnet50

The recipe ships with the package, so that it also works from an installed copy: its
options, defaults and expected results are documented in resnet_jax/configs/finetune_cifar10.py.
"""

from resnet_jax.configs.finetune_cifar10 import get_config  # noqa: F401
