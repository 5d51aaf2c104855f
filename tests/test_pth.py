"""interop/pth.py: torch.save files read without torch, checked against torch.load itself.

torch writes every file here (module-scope fixture), then ONE subprocess in which ``import torch``
fails reads them all with resnet_jax's reader and reports, per file, each array's dtype, shape
and sha256 (or the error). The reference is ``torch.load(weights_only=True)`` in this process,
so equal digests mean bit-identical arrays. Covered: every torchvision depth and timm's
resnet26/50 (num_batches_tracked included), views sharing one storage (transposed, sliced,
offset), every storage dtype (bfloat16 comes back as float32), wrappers and the 'module.'
prefix, big-endian archives, and refusals: pickles carrying code (the command must not run),
the legacy format, truncated / non-zip files, and a tensor reaching past its storage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
TV_DEPTHS = (18, 34, 50, 101, 152)
TIMM_DEPTHS = (26, 50)

_READER = """
import hashlib, json, sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
from resnet_jax.interop import pth
from resnet_jax.interop.layout import ConversionError
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is importable in the reader process")
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        sd, note = pth.load_state_dict(path)
    except ConversionError as e:
        out[name] = {"error": str(e)}
        continue
    out[name] = {"note": note, "arrays": {
        k: [str(v.dtype), list(v.shape), bool(v.flags.c_contiguous), hashlib.sha256(v.tobytes()).hexdigest()]
        for k, v in sd.items()}}
print(json.dumps(out))
"""


def digest(t: torch.Tensor) -> list:
    """What the reader process reports for an array, computed from torch's own tensor."""
    a = (t.float() if t.dtype == torch.bfloat16 else t).detach().contiguous().numpy()
    return [str(a.dtype), list(a.shape), True, hashlib.sha256(a.tobytes()).hexdigest()]


def reference(path: Path) -> dict:
    return {k: digest(v) for k, v in torch.load(path, weights_only=True).items()}


def distinct_buffers(sd: dict, seed: int) -> dict:
    """BN statistics and counters that differ per layer, so a swapped key would show."""
    gen = torch.Generator().manual_seed(seed)
    for i, (k, v) in enumerate(sd.items()):
        if k.endswith("num_batches_tracked"):
            v.fill_(1000 + i)
        elif k.endswith(("running_mean", "running_var")):
            v.copy_(torch.rand(v.shape, generator=gen) + 0.5)
    return sd


def rewrite_zip(src: Path, dst: Path, edit) -> None:
    """Copies a torch.save archive entry by entry, passing each (name, bytes) through edit."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))


class _System:
    """Unpickling this runs a shell command: what a hostile .pth carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pth")
    paths = {}

    def save(name, obj, **kw):
        paths[name] = tmp / f"{name}.pth"
        torch.save(obj, paths[name], **kw)

    torch.manual_seed(0)
    for depth in TV_DEPTHS:
        save(
            f"tv{depth}",
            distinct_buffers(getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict(), depth),
        )
    for depth in TIMM_DEPTHS:
        save(
            f"timm{depth}",
            distinct_buffers(timm.create_model(f"resnet{depth}", pretrained=False).state_dict(), 100 + depth),
        )
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 1.5 - 7
    save(
        "views",
        {
            "base": base,
            "t": base.t(),
            "slice": base[1:3, 2:5],
            "col": base[:, 3],
            "tail": base.view(-1)[17:],
            "step": base[::2, ::3],
            "scalar": base[2, 1],
        },
    )
    x = torch.randn(3, 5)
    save(
        "dtypes",
        {
            "f16": x.half(),
            "bf16": x.bfloat16(),
            "bf16_t": x.bfloat16().t(),
            "f64": x.double(),
            "i64": torch.arange(-7, 8),
            "i32": torch.arange(-5, 5, dtype=torch.int32),
            "i16": torch.tensor([-300, 7], dtype=torch.int16),
            "i8": torch.tensor([-100, 3], dtype=torch.int8),
            "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
            "bool": x > 0,
            "empty": torch.zeros(0, 4),
        },
    )
    save(
        "wrapped",
        {"epoch": 3, "optimizer": {"lr": 0.1}, "state_dict": {"module.fc.weight": x, "module.fc.bias": x[0]}},
    )
    save("parameter", {"w": torch.nn.Parameter(x), "b": torch.nn.Parameter(x[:, 0], requires_grad=False)})
    save("small", {"w": x})
    rewrite_zip(
        paths["small"],
        tmp / "big_endian.pth",
        lambda n, b: (
            b"big"
            if n.endswith("/byteorder")
            else np.frombuffer(b, "<f4").astype(">f4").tobytes()
            if "/data/" in n
            else b
        ),
    )
    paths["big_endian"] = tmp / "big_endian.pth"
    # A tensor whose size is patched from 7 to 9 elements: it would read past its 7-element storage.
    save("seven", {"w": torch.arange(7, dtype=torch.float32)})
    paths["overrun"] = tmp / "overrun.pth"

    def grow(name, data):
        if not name.endswith("/data.pkl"):
            return data
        assert data.count(b"K\x07\x85") == 1  # BININT1 7, TUPLE1: the size (7,)
        return data.replace(b"K\x07\x85", b"K\x09\x85")

    rewrite_zip(paths["seven"], paths["overrun"], grow)

    save("evil_torch", {"conv1.weight": torch.zeros(1), "evil": _System(tmp / "MARK_torch")})
    paths["evil_zip"] = tmp / "evil_zip.pth"
    with zipfile.ZipFile(paths["evil_zip"], "w") as z:  # the zip layout by hand, plain pickle inside
        z.writestr("evil_zip/data.pkl", pickle.dumps(_System(tmp / "MARK_zip"), protocol=2))
        z.writestr("evil_zip/byteorder", "little")
    save("legacy", {"w": x}, _use_new_zipfile_serialization=False)
    data = paths["tv18"].read_bytes()
    paths["truncated"] = tmp / "truncated.pth"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["not_torch"] = tmp / "not_torch.pth"
    paths["not_torch"].write_bytes(b"just some bytes, not a zip and not a pickle")
    return tmp, paths


@pytest.fixture(scope="module")
def read(files):
    """{file name: {'note', 'arrays': {key: [dtype, shape, contiguous, sha256]}} or {'error'}},
    read in a process where torch cannot be imported."""
    _, paths = files
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", _READER, json.dumps({k: str(v) for k, v in paths.items()})],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def arrays(read, name):
    assert "arrays" in read[name], read[name].get("error")
    return read[name]["arrays"]


@pytest.mark.parametrize("name", [f"tv{d}" for d in TV_DEPTHS] + [f"timm{d}" for d in TIMM_DEPTHS])
def test_resnet_state_dicts_equal_torch_load_exactly(files, read, name):
    path = files[1][name]
    want = reference(path)
    got = arrays(read, name)
    assert list(got) == list(want)  # same keys, same order
    assert got == want
    counters = [k for k in got if k.endswith("num_batches_tracked")]
    assert counters and all(got[k][:2] == ["int64", []] for k in counters)
    assert read[name]["note"] == "state dict"


def test_views_sharing_one_storage_round_trip(files, read):
    path = files[1]["views"]
    with zipfile.ZipFile(path) as z:  # one storage behind all seven tensors: offsets and strides matter
        assert len([n for n in z.namelist() if "/data/" in n and not n.endswith("serialization_id")]) == 1
    loaded = torch.load(path, weights_only=True)
    assert not loaded["t"].is_contiguous() and loaded["tail"].storage_offset() == 17
    assert arrays(read, "views") == reference(path)


def test_every_storage_dtype_and_bfloat16_as_float32(files, read):
    got = arrays(read, "dtypes")
    assert got == reference(files[1]["dtypes"])
    assert {k: v[0] for k, v in got.items()} == {
        "f16": "float16",
        "bf16": "float32",
        "bf16_t": "float32",
        "f64": "float64",
        "i64": "int64",
        "i32": "int32",
        "i16": "int16",
        "i8": "int8",
        "u8": "uint8",
        "bool": "bool",
        "empty": "float32",
    }


def test_wrapper_module_prefix_and_parameters(files, read):
    got = arrays(read, "wrapped")
    want = torch.load(files[1]["wrapped"], weights_only=True)["state_dict"]
    assert got == {k[len("module.") :]: digest(v) for k, v in want.items()}
    assert read["wrapped"]["note"] == (
        "the 'state_dict' entry (other entries ignored: ['epoch', 'optimizer']), 'module.' prefix removed"
    )
    with zipfile.ZipFile(files[1]["parameter"]) as z:
        assert b"_rebuild_parameter" in z.read("parameter/data.pkl")
    assert arrays(read, "parameter") == reference(files[1]["parameter"])


def test_big_endian_archive_is_byteswapped(files, read):
    want = torch.load(files[1]["big_endian"], weights_only=True)["w"]  # torch byteswaps it too
    assert torch.equal(want, torch.load(files[1]["small"], weights_only=True)["w"])
    assert arrays(read, "big_endian") == {"w": digest(want)}


@pytest.mark.parametrize("name", ["evil_torch", "evil_zip"])
def test_a_pickle_carrying_code_is_refused_by_name_without_running_it(files, read, name):
    tmp, paths = files
    marker = tmp / f"MARK_{name.split('_')[1]}"
    assert "arrays" not in read[name]
    error = read[name]["error"]
    assert str(paths[name]) in error
    assert "refusing" in error and "(posix.system)" in error.replace("nt.system", "posix.system")
    assert "could run code" in error
    assert not marker.exists()
    if name == "evil_zip":  # the payload is live: plain pickle runs it
        with zipfile.ZipFile(paths[name]) as z:
            pickle.loads(z.read("evil_zip/data.pkl"))
        assert marker.read_text().strip() == "pwned"


def test_legacy_format_is_refused_with_the_resave_hint(files, read):
    error = read["legacy"]["error"]
    assert str(files[1]["legacy"]) in error and "legacy (pre-1.6)" in error
    assert "torch.save(state_dict, path)" in error and ".safetensors" in error


@pytest.mark.parametrize("name", ["truncated", "not_torch"])
def test_truncated_or_foreign_file_is_refused_naming_it(files, read, name):
    error = read[name]["error"]
    assert error.startswith(f"cannot read {files[1][name]} as a PyTorch weight file (truncated")


def test_a_tensor_reaching_past_its_storage_is_refused(files, read):
    assert arrays(read, "seven") == reference(files[1]["seven"])  # the unpatched file reads
    error = read["overrun"]["error"]
    assert str(files[1]["overrun"]) in error and "reaches past its storage of 7 elements" in error


def test_in_process_reader_refuses_globals_and_geometry():
    """The unpickler on its own, no file layout: any global besides the allow-list is refused."""
    from resnet_jax.interop import pth

    for module, name in [
        ("builtins", "eval"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_qtensor"),
        ("torch", "UntypedStorage"),
        ("collections", "defaultdict"),
    ]:
        unpickler = pth._Unpickler(io.BytesIO(b""), None, "", big_endian=False)
        with pytest.raises(pickle.UnpicklingError, match=rf"^{module}\.{name}$"):
            unpickler.find_class(module, name)
