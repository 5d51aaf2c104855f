"""Pretrained weights in and out: torchvision / timm ResNets <-> this project's variables.

* :mod:`~resnet_jax.interop.layout`: the key-by-key mapping (numpy only, no torch);
* :mod:`~resnet_jax.interop.pth`: reading ``.pth`` files without torch (restricted unpickler);
* :mod:`~resnet_jax.interop.torch_files`: safe reading/writing of ``.pth`` and
  ``.safetensors`` (the only module that imports torch, lazily, to write ``.pth``);
* :mod:`~resnet_jax.interop.weights`: converted checkpoints on disk, ``pretrained()``,
  ``init_variables_from()`` for fine-tuning;
* :mod:`~resnet_jax.interop.hub`: torchvision weights by name (cache, download with a hash check);
* :mod:`~resnet_jax.interop.nnx`: a Flax NNX wrapper.

The command line is ``python -m resnet_jax.convert``.
"""

from resnet_jax.interop.layout import (
    SUPPORTED,
    ConversionError,
    build_target,
    detect_arch,
    from_state_dict,
    to_state_dict,
)
from resnet_jax.interop.weights import (
    convert_file,
    export_state_dict,
    init_variables_from,
    load_variables,
    match_variables,
    pretrained,
    save_converted,
)

__all__ = [
    "SUPPORTED",
    "ConversionError",
    "build_target",
    "detect_arch",
    "from_state_dict",
    "to_state_dict",
    "convert_file",
    "export_state_dict",
    "init_variables_from",
    "load_variables",
    "match_variables",
    "pretrained",
    "save_converted",
]
