"""Dataset statistics declared once: ImageNet's mean, std and PCA lighting basis.

Every pipeline and transform imports them from here. This module imports nothing, so the
TensorFlow-free parts of the package (and TensorFlow graph code) share the same tuples.
CIFAR has no constants here: its normalisation is computed from the training images
(`augment.normalization_stats`).
"""

# ImageNet statistics in 0..255 RGB units (torchvision's mean/std x 255).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# AlexNet PCA lighting: eigenvalues/eigenvectors of the ImageNet RGB covariance (0..255
# units; the values fb.resnet.torch publishes in 0..1 units, times 255). Columns are vectors.
EIGVAL = (55.46, 4.794, 1.148)
EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

# ILSVRC-2012 (the paper's ImageNet): training and validation images, for checking a config
# against the full dataset without reading it.
ILSVRC2012_SIZES = (1_281_167, 50_000)
