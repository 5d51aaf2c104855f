r"""ImageNet with the recipe of He et al. (2015), Section 3.4, and its variants (`goyal`,
`v1.5`, `ghost`).

  python -m resnet_jax.main --config configs/imagenet.py:resnet50 --workdir runs/in_resnet50

The recipe ships with the package, so that it also works from an installed copy: its
options, defaults and expected results are documented in resnet_jax/configs/imagenet.py.
"""

from resnet_jax.configs.imagenet import get_config  # noqa: F401
