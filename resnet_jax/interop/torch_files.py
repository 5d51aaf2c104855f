"""Reading and writing torch weight files safely; the only module that imports torch.

A ``.pth`` is a pickle, and unpickling can run arbitrary code. Files are therefore read
with ``torch.load(..., weights_only=True)``, torch's restricted unpickler that accepts
tensors and plain containers only and refuses everything else; ``.safetensors`` files
(no code at all) are read with the ``safetensors`` package. torch is an optional extra:
it is imported here lazily, and a missing install is reported with the pip line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from resnet_jax.interop.layout import ConversionError

INSTALL_HINT = ('pip install torch==2.14.1 torchvision==0.29.1 '
                '(optionally timm==1.0.31 for timm models, safetensors for .safetensors files)')
# Wrappers that training scripts put around a state dict: {'state_dict': {...}}.
_WRAPPERS = ('state_dict', 'model')


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f'reading or writing .pth files needs PyTorch, which is not '
                              f'installed ({e}); install it with: {INSTALL_HINT}') from None
    return torch


def _flat_tensors(obj: Any, torch) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """(state dict as float/int numpy arrays, note on how it was found) from a .pth or
    .safetensors file. Refuses pickles that carry anything but tensors."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f'{path}: no such file')
    if path.suffix == '.safetensors':
        return _load_safetensors(path), 'safetensors'
    torch = _torch()
    import pickle
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ConversionError(
            f'refusing {path}: it holds pickled objects other than tensors, and unpickling '
            f'them could run code ({first}). Only plain state dicts of tensors are accepted; '
            're-save the file as model.state_dict() or as .safetensors') from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ConversionError(f'cannot read {path} as a PyTorch weight file (truncated, '
                              f'damaged or not a .pth?): {type(e).__name__}: {first}') from None
    note = 'state dict'
    if not _flat_tensors(obj, torch) and isinstance(obj, Mapping):
        for wrapper in _WRAPPERS:
            if _flat_tensors(obj.get(wrapper), torch):
                others = sorted(str(k) for k in obj if k != wrapper)
                obj, note = obj[wrapper], f'the {wrapper!r} entry (other entries ignored: {others})'
                break
    if not _flat_tensors(obj, torch):
        raise ConversionError(f'{path} does not hold a state dict (a mapping from names to '
                              f'tensors) but {type(obj).__name__}')
    keys = list(obj)
    if all(k.startswith('module.') for k in keys):
        # torch.nn.DataParallel / DDP wrap every key; the weights are the same.
        obj, note = {k[len('module.'):]: v for k, v in obj.items()}, note + ", 'module.' prefix removed"
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}, note


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ConversionError(f'reading {path} needs the safetensors package ({e}): '
                              'pip install safetensors') from None
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ConversionError(f'cannot read {path} as a safetensors file (truncated or '
                              f'damaged?): {type(e).__name__}: {e}') from None


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Writes a torch-loadable state dict (.pth via torch.save, or .safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == '.safetensors':
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
        return path
    torch = _torch()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    tmp = path.with_name(path.name + '.tmp')
    torch.save(tensors, tmp)
    os.replace(tmp, path)
    return path
