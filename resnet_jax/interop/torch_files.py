"""Reading and writing torch weight files safely; the only module that imports torch.

A ``.pth`` is a pickle, and unpickling can run arbitrary code. Files are therefore read by
:mod:`resnet_jax.interop.pth`, a restricted unpickler over numpy that accepts tensors and
plain containers only, refuses every other global by name, and needs no torch at all;
``.safetensors`` files (no code at all) are read with the ``safetensors`` package. torch is
needed only to WRITE a ``.pth`` (exports): it is imported here lazily, and a missing install
is reported with the pip line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from resnet_jax.files import atomic_file
from resnet_jax.interop import pth
from resnet_jax.interop.layout import ConversionError

# Reading .pth needs no torch; writing one (an export) does, and safetensors files need safetensors.
INSTALL_HINT = (
    "pip install torch==2.14.1 (to write .pth exports; reading .pth needs no torch), "
    "safetensors for .safetensors files"
)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"writing .pth files needs PyTorch, which is not installed ({e}); install it with: {INSTALL_HINT}"
        ) from None
    return torch


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """(state dict as float/int numpy arrays, note on how it was found) from a .pth (.pt, .bin)
    or .safetensors file, without torch. Refuses pickles that carry anything but tensors."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path), "safetensors"
    return pth.load_state_dict(path)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ConversionError(
            f"reading {path} needs the safetensors package ({e}): pip install safetensors"
        ) from None
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ConversionError(
            f"cannot read {path} as a safetensors file (truncated or damaged?): {type(e).__name__}: {e}"
        ) from None


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Writes a torch-loadable state dict (.pth via torch.save, or .safetensors), atomically:
    an interrupted write leaves the previous file (or none), never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        with atomic_file(path) as tmp:
            save_file(arrays, str(tmp))
        return path
    torch = _torch()
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    with atomic_file(path) as tmp:
        torch.save(tensors, tmp)
    return path
