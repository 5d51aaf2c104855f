"""Input data: dataset sources, on-device augmentation and batch index plans.

Submodules are imported explicitly (``resnet_jax.data.cifar``, ``.download``, ``.augment``,
``.batching``, ``.constants``, ``.normalization``, ``.image_transforms``, the ``.imagenet``
package) so that importing this package stays cheap and never pulls in TensorFlow. This module
owns only the error type shared by every data source.
"""

from resnet_jax.errors import UserError


class DataError(UserError, ValueError):
    """A dataset file or directory is missing, malformed or inconsistent.

    Messages name the offending file (and record, where one is at fault) and say
    how to obtain good data.
    """
