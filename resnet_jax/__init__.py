"""ResNets of He et al. (2015, 2016) in JAX/Flax: models, CIFAR and ImageNet training, scaling out.

models/ (blocks, networks, families, registry), summary (params and FLOPs), data/ (CIFAR-10/100
sources and download, on-device augmentation, batching, ImageNet tf.data pipelines, the input
normalisation stored with weights), train/ (config fields and checks, the run's plan, optimizer,
steps, loop, checkpoints, metrics, EMA, BN recalibration), parallel (mesh, shardings,
multi-host), interop/ (torchvision/timm weights in and out, weights by name, NNX), export/
(StableHLO and ONNX), configs/ (the recipes), convert (its command line), analysis/ and
experiments (the papers' experiments), main (the training command line); errors (the error
family and exit statuses) and files (atomic writes) below everything. ``pretrained()`` below
gives a Flax model and its weights in one call.
"""

__version__ = "0.1.0"


def pretrained(path, name=None, *, weights=None, **overrides):
    """``model, variables = resnet_jax.pretrained('resnet50', weights='IMAGENET1K_V2')``: a Flax
    ResNet and its weights.

    ``path``: a torchvision/timm ``.pth``/``.safetensors`` file, a directory written by
    ``python -m resnet_jax.convert`` or a training workdir, or (no such path existing) a
    torchvision model name whose published weights are fetched and cached; see
    :func:`resnet_jax.interop.weights.pretrained`. Imported lazily, so that importing the
    package does not load orbax (nor ever torch).
    """
    from resnet_jax.interop.weights import pretrained as _pretrained

    return _pretrained(path, name, weights=weights, **overrides)
