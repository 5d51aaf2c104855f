"""The model zoo: blocks, the ResNet network, depth tables, families and the name registry.

Typical use: ``build_model('resnet50', dtype='bfloat16')`` or ``cifar_resnet(110)``.
Nothing here imports data/, train/ or TensorFlow.
"""

from resnet_jax.models.blocks import (SHORTCUTS, BasicBlock, Block, Bottleneck, GhostBatchNorm,
                                      PlainBlock, PlainBottleneck, PreActBasicBlock,
                                      PreActBottleneck, pad_shortcut)
from resnet_jax.models.families import (CIFAR_WIDTHS, FAMILIES, IMAGENET_DEPTHS,
                                        IMAGENET_WIDTHS, MODEL_NAMES, RESNET_FIELDS, VARIANTS,
                                        block_kind, build_model, cifar_blocks_per_stage,
                                        cifar_plain, cifar_preact_resnet, cifar_resnet,
                                        list_models, plain, preact_resnet, resnet)
from resnet_jax.models.network import (CONV_IMPLS, DTYPES, STEMS, ResNet, conv_impl_for,
                                       count_params, he_normal, resolve_dtype)

__all__ = [
    'SHORTCUTS', 'BasicBlock', 'Block', 'Bottleneck', 'GhostBatchNorm', 'PlainBlock',
    'PlainBottleneck', 'PreActBasicBlock', 'PreActBottleneck', 'pad_shortcut',
    'CIFAR_WIDTHS', 'FAMILIES', 'IMAGENET_DEPTHS', 'IMAGENET_WIDTHS', 'MODEL_NAMES',
    'RESNET_FIELDS', 'VARIANTS', 'block_kind', 'build_model', 'cifar_blocks_per_stage',
    'cifar_plain', 'cifar_preact_resnet', 'cifar_resnet', 'list_models', 'plain',
    'preact_resnet', 'resnet',
    'CONV_IMPLS', 'DTYPES', 'STEMS', 'ResNet', 'conv_impl_for', 'count_params', 'he_normal',
    'resolve_dtype',
]
