"""Reading torch ``.pth`` state dicts without torch: a restricted unpickler over numpy.

Since torch 1.6, ``torch.save`` writes a zip archive: ``<name>/data.pkl`` (a protocol-2
pickle of the object, in which every tensor is a call to ``torch._utils._rebuild_tensor_v2``
on a *persistent id* naming its storage), ``<name>/data/<key>`` (each storage's raw bytes)
and ``<name>/byteorder``. This module unpickles ``data.pkl`` with an ``Unpickler`` whose
``find_class`` hands out only the tensor-rebuilding functions (reimplemented here on numpy),
``collections.OrderedDict`` and the storage type names; any other global -- the only way a
pickle can reach code -- is refused by name before anything is called. Storages are read as
numpy arrays of their dtype, and tensors are strided views on them, copied contiguous.

dtypes come back as numpy's equivalent, except bfloat16 (numpy has none): it is returned as
float32, exactly (a bfloat16 is the upper half of a float32). The pre-1.6 "legacy" format (a
stream of pickles, no zip) is refused with the way to re-save the file.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.interop.layout import ConversionError

# Wrappers that training scripts put around a state dict: {'state_dict': {...}}.
_WRAPPERS = ("state_dict", "model")
# The pickle of torch's legacy format starts with protocol 2 + this long int (torch's MAGIC_NUMBER).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_RESAVE = (
    "re-save it with a torch >= 1.6 (torch.load it there, then torch.save(state_dict, path)), "
    "or as .safetensors"
)


class _StorageType:
    """Stands for ``torch.FloatStorage`` & co. inside the pickle: a name and a numpy dtype.
    Not callable, so a pickle cannot use it for anything but a persistent id."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


# bfloat16 storages are read as their raw uint16 bits and widened to float32 after striding.
_STORAGES = {
    name: _StorageType(name, dtype)
    for name, dtype in [
        ("FloatStorage", "<f4"),
        ("HalfStorage", "<f2"),
        ("BFloat16Storage", "<u2"),
        ("DoubleStorage", "<f8"),
        ("LongStorage", "<i8"),
        ("IntStorage", "<i4"),
        ("ShortStorage", "<i2"),
        ("CharStorage", "<i1"),
        ("ByteStorage", "<u1"),
        ("BoolStorage", "|b1"),
    ]
}


class _Storage:
    """A storage read from ``data/<key>``: its flat array and its type (bfloat16: raw uint16 bits)."""

    def __init__(self, array: np.ndarray, kind: _StorageType):
        self.array, self.kind = array, kind
        self.bfloat16 = kind.name == "BFloat16Storage"


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """numpy twin of torch._utils._rebuild_tensor_v2: a contiguous copy of the strided view."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(
            f"tensor storage must come from a persistent id, got {type(storage).__name__}"
        )
    if metadata:  # conj/neg bits and the like: not something a state dict of weights carries
        raise pickle.UnpicklingError(f"tensor metadata {metadata!r} is not supported")
    size, stride = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if type(storage_offset) is not int or storage_offset < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError(
            f"bad tensor geometry: offset {storage_offset!r}, size {size}, stride {stride}"
        )
    flat = storage.array
    if 0 in size:
        out = np.zeros(size, flat.dtype)
    else:
        # as_strided does no bounds check: a hostile file could otherwise make it read past the storage.
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise pickle.UnpicklingError(
                f"tensor of size {size}, stride {stride} at offset "
                f"{storage_offset} reaches past its storage of {flat.size} "
                "elements"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[storage_offset:], shape=size, strides=[s * flat.itemsize for s in stride], writeable=False
        )
        out = np.array(view, order="C")
    if storage.bfloat16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """nn.Parameter wraps a tensor; the weights are the tensor."""
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): storage for name, storage in _STORAGES.items()},
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A global outside the allow-list: ``name`` is 'module.qualname'."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        super().__init__(file)
        self._archive, self._prefix, self._big_endian = archive, prefix, big_endian
        self._storages: dict[str, _Storage] = {}  # tensors that share a storage share one array

    def find_class(self, module: str, name: str):
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid  # location (cpu, cuda:0, ...): everything lands in numpy
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            try:
                info = self._archive.getinfo(name)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {name} is missing from the archive") from None
            nbytes = numel * kind.dtype.itemsize
            if info.file_size != nbytes:
                raise pickle.UnpicklingError(
                    f"storage {name} holds {info.file_size} bytes; {numel} elements of {kind!r} need {nbytes}"
                )
            dtype = kind.dtype.newbyteorder(">") if self._big_endian else kind.dtype
            array = np.frombuffer(self._archive.read(name), dtype=dtype)
            if self._big_endian:
                array = array.astype(kind.dtype)
            self._storages[key] = _Storage(array, kind)
        if self._storages[key].kind is not kind:
            raise pickle.UnpicklingError(
                f"storage {key!r} is read as both {self._storages[key].kind!r} and {kind!r}"
            )
        return self._storages[key]


def read(path: str | os.PathLike) -> Any:
    """The object ``torch.save`` wrote to ``path``, tensors as numpy arrays (bfloat16 as float32).

    Raises ConversionError naming the file for a legacy-format, damaged or non-torch file, and
    for a pickle that names any global besides tensors, OrderedDict and storage types.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    if head == _LEGACY_MAGIC:
        raise ConversionError(
            f"{path} is in the legacy (pre-1.6) torch format, which is read only by torch itself; {_RESAVE}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_archive(path, archive)
    except ConversionError:
        raise
    except _RefusedGlobal as e:
        raise ConversionError(
            f"refusing {path}: it holds pickled objects other than tensors ({e.name}), and "
            "unpickling them could run code. Only plain state dicts of tensors are accepted; "
            "re-save the file as model.state_dict() or as .safetensors"
        ) from None
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        zipfile.LargeZipFile,
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ConversionError(
            f"cannot read {path} as a PyTorch weight file (truncated, damaged or "
            f"not a .pth?): {type(e).__name__}: {first}"
        ) from None


def _read_archive(path: Path, archive: zipfile.ZipFile) -> Any:
    pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
        raise ConversionError(
            f"cannot read {path} as a PyTorch weight file: a torch.save archive has "
            f"one <name>/data.pkl, this zip has {len(pickles)}"
        )
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = b"little"  # what torch assumes when the record is absent (files before 1.10)
    if f"{prefix}byteorder" in archive.namelist():
        byteorder = archive.read(f"{prefix}byteorder").strip()
    if byteorder not in (b"little", b"big"):
        raise ConversionError(f"{path}: unknown byte order {byteorder!r} (allowed: little, big)")
    with archive.open(pickles[0]) as f:
        return _Unpickler(f, archive, prefix, big_endian=byteorder == b"big").load()


def _flat_arrays(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """(state dict as numpy arrays, note on how it was found) from a ``torch.save`` file.

    A ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is unwrapped (other entries
    ignored, and named in the note), and a ``module.`` prefix on every key (DataParallel,
    DDP) is removed. bfloat16 tensors come back as float32.
    """
    obj = read(path)
    note = "state dict"
    if not _flat_arrays(obj) and isinstance(obj, Mapping):
        for wrapper in _WRAPPERS:
            if _flat_arrays(obj.get(wrapper)):
                others = sorted(str(k) for k in obj if k != wrapper)
                obj, note = obj[wrapper], f"the {wrapper!r} entry (other entries ignored: {others})"
                break
    if not _flat_arrays(obj):
        raise ConversionError(
            f"{path} does not hold a state dict (a mapping from names to tensors) but {type(obj).__name__}"
        )
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        # torch.nn.DataParallel / DDP wrap every key; the weights are the same.
        obj, note = {k[len("module.") :]: v for k, v in obj.items()}, note + ", 'module.' prefix removed"
    return dict(obj), note
