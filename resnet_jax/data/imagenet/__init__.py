"""ImageNet input pipelines: tfds `imagenet2012` or an image folder, read by tf.data.

The package is split by concern; this module re-exports what callers use:

- `spec.py`: where the data comes from (`ImageNetSpec`), the folder listing, labels,
  tfds builder access, and the cheap checks (`check`, `num_examples`, `class_names`).
- `train_pipeline.py`: `train_batches`, the per-process training iterators (and
  `centred_train_batches`, the same images through the evaluation's centre crop); step s is a
  pure function of (seed, s), so resuming repeats an uninterrupted run (its docstring).
- `eval_pipeline.py`: `eval_batches` and `num_eval_batches` (centre, 10-crop, multi-scale).
- `bad_files.py`: `BatchIterator` and what happens to an undecodable file (named in a
  DataError, or skipped with its row filled or masked: its docstring).

Per-image transforms live in `resnet_jax.data.image_transforms`, statistics in
`resnet_jax.data.constants`. TensorFlow (and tfds) is imported inside functions only, so
the package imports on machines without it.
"""

from resnet_jax.data.batching import train_indices
from resnet_jax.data.constants import EIGVAL, EIGVEC, MEAN_RGB, STD_RGB
from resnet_jax.data.imagenet.bad_files import (
    BatchIterator,
    _assemble,
    _find_bad_file,
    _substitute,
)
from resnet_jax.data.imagenet.eval_pipeline import (
    PROTOCOLS,
    eval_batches,
    num_eval_batches,
)
from resnet_jax.data.imagenet.spec import (
    IMAGE_EXTENSIONS,
    NUM_CLASSES,
    SOURCES,
    ImageNetSpec,
    _folder_files,
    check,
    class_names,
    imagenet_synsets,
    num_examples,
)
from resnet_jax.data.imagenet.train_pipeline import TRANSFORMS, centred_train_batches, train_batches

__all__ = [
    "EIGVAL",
    "EIGVEC",
    "IMAGE_EXTENSIONS",
    "MEAN_RGB",
    "NUM_CLASSES",
    "PROTOCOLS",
    "SOURCES",
    "STD_RGB",
    "TRANSFORMS",
    "BatchIterator",
    "ImageNetSpec",
    "_assemble",
    "_find_bad_file",
    "_folder_files",
    "_substitute",
    "centred_train_batches",
    "check",
    "class_names",
    "eval_batches",
    "imagenet_synsets",
    "num_eval_batches",
    "num_examples",
    "train_batches",
    "train_indices",
]
