"""ResNets of He et al. (2015, 2016) in JAX/Flax: models, CIFAR-10 training, data parallelism.

models/ (blocks, networks, families, registry), summary (params and FLOPs), data/ (CIFAR-10
sources, on-device augmentation, batching), train/ (config, optimizer, steps, loop,
checkpoints, metrics), parallel (mesh, shardings, multi-host), main (the command line).
"""

__version__ = "0.1.0"
