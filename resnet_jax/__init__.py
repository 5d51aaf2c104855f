"""ResNets of He et al. (2015, 2016) in JAX/Flax: models, CIFAR-10 training, data parallelism.

models/ (blocks, networks, families, registry), summary (params and FLOPs), data/ (CIFAR-10
sources, on-device augmentation, batching), train/ (config, optimizer, steps, loop,
checkpoints, metrics), parallel (mesh, shardings, multi-host), main (the command line).
"""

__version__ = "0.1.0"


def pretrained(path, name=None, **overrides):
    """``model, variables = resnet_jax.pretrained('resnet50.pth')``: a Flax ResNet and its weights.

    ``path``: a torchvision/timm ``.pth``/``.safetensors`` file, a directory written by
    ``python -m resnet_jax.convert`` or a training workdir; see
    :func:`resnet_jax.interop.weights.pretrained`. Imported lazily, so that importing the
    package does not load orbax (nor ever torch).
    """
    from resnet_jax.interop.weights import pretrained as _pretrained

    return _pretrained(path, name, **overrides)
