"""Pretrained weights by name (interop/hub.py), against a real HTTP server on 127.0.0.1.

No test here touches the internet: torch writes one ResNet-18 state dict with random values
(10 classes, so it is not the published file), the server is Python's http.server in a thread
on the loopback address, and the table of published files is pointed at that file's name,
whose hash prefix is the real sha256 of its bytes. The torch hub cache ($TORCH_HOME) and the
converted cache ($RESNET_JAX_WEIGHTS) are fresh temporary folders in every test.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet_jax import convert, pretrained
from resnet_jax.interop import hub, layout
from resnet_jax.interop.layout import ConversionError
from resnet_jax.interop.weights import load_variables


class _Server:
    """Serves `files` by name; `plan` says, request by request, how to misbehave."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plan: list[str] = []  # 'ok' | 'truncate'; empty: 'ok'
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                name = self.path.lstrip("/")
                server.requests.append(name)
                mode = server.plan.pop(0) if server.plan else "ok"
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "truncate":  # promise the whole body, send 40% of it, hang up
                    self.wfile.write(body[: len(body) * 2 // 5])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # keep pytest's output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    running = _Server()
    yield running
    running.close()


def _resnet18_shapes(classes: int) -> dict[str, tuple[int, ...]]:
    """torchvision's resnet18 state dict keys and shapes (written out here, not taken from the
    layout under test; importing torchvision would cost seconds)."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(key: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{key}.{name}"] = (c,)
        shapes[f"{key}.num_batches_tracked"] = ()

    bn("bn1", 64)
    cin = 64
    for i, width in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            prefix = f"layer{i}.{j}"
            shapes[f"{prefix}.conv1.weight"] = (width, cin, 3, 3)
            bn(f"{prefix}.bn1", width)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{prefix}.bn2", width)
            if cin != width:
                shapes[f"{prefix}.downsample.0.weight"] = (width, cin, 1, 1)
                bn(f"{prefix}.downsample.1", width)
            cin = width
    shapes["fc.weight"] = (classes, 512)
    shapes["fc.bias"] = (classes,)
    return shapes


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict (10 classes) with random values in every float tensor."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in _resnet18_shapes(10).items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(7, dtype=torch.int64)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=gen)
    return sd


@pytest.fixture(scope="module")
def pth_bytes(state_dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def filename(pth_bytes: bytes) -> str:
    """Named as torchvision names its files: the first 8 hex digits of the sha256 after a dash."""
    return f"resnet18-{hashlib.sha256(pth_bytes).hexdigest()[:8]}.pth"


def _closed_port() -> int:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: _Server) -> dict[str, Path]:
    """Fresh hub and converted caches; downloads from the test server's /models/."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "converted"))
    monkeypatch.setenv(hub.URL_ENV, server.url + "/models")
    server.plan.clear()
    server.requests.clear()
    return {"hub": tmp_path / "torch" / "hub" / "checkpoints", "converted": tmp_path / "converted"}


@pytest.fixture
def publish(server: _Server, pth_bytes: bytes, monkeypatch: pytest.MonkeyPatch):
    """Serves our file under `name` and makes it resnet18's IMAGENET1K_V1 in the table."""

    def register(name: str) -> str:
        server.files[f"models/{name}"] = pth_bytes
        monkeypatch.setitem(hub.TORCHVISION, "resnet18", {"IMAGENET1K_V1": name})
        return name

    return register


def _assert_equal_to_file(variables, state_dict) -> None:
    # Two keys mapped by hand (OIHW -> HWIO, the fc transposed), then every key through the layout.
    sd = {k: v.numpy() for k, v in state_dict.items()}
    params = variables["params"]
    np.testing.assert_array_equal(
        np.asarray(params["stem_conv"]["kernel"]), sd["conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]), sd["fc.weight"].T)
    np.testing.assert_array_equal(
        np.asarray(variables["batch_stats"]["stage4_block2"]["bn2"]["var"]), sd["layer4.1.bn2.running_var"]
    )
    back = layout.to_state_dict(variables, "resnet18")
    for key, value in sd.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_download_check_convert_and_cache(
    caches, publish, server, filename, pth_bytes, state_dict, monkeypatch
):
    publish(filename)
    model, variables = pretrained("resnet18", weights="IMAGENET1K_V1")
    assert server.requests == [f"models/{filename}"]
    assert model.num_classes == 10 and tuple(model.stage_sizes) == (2, 2, 2, 2)
    _assert_equal_to_file(variables, state_dict)
    # The hub cache holds exactly the published bytes (no temporary file left beside them) ...
    assert _files(caches["hub"]) == [filename]
    assert (caches["hub"] / filename).read_bytes() == pth_bytes
    # ... and the converted cache one checkpoint directory named after the file.
    converted = caches["converted"] / "torchvision" / filename[: -len(".pth")]
    assert [p.name for p in (caches["converted"] / "torchvision").iterdir()] == [converted.name]
    # A second call reads the converted cache: neither the server nor the .pth is needed.
    monkeypatch.setenv(hub.URL_ENV, f"http://127.0.0.1:{_closed_port()}")
    (caches["hub"] / filename).unlink()
    _, again = pretrained("resnet18:IMAGENET1K_V1")
    _assert_equal_to_file(again, state_dict)
    assert server.requests == [f"models/{filename}"]


def test_hub_cache_is_used_without_a_server(
    caches, publish, server, filename, pth_bytes, state_dict, monkeypatch
):
    """A file torch already fetched is used as it is; the convert command takes a name."""
    publish(filename)
    caches["hub"].mkdir(parents=True)
    (caches["hub"] / filename).write_bytes(pth_bytes)
    monkeypatch.setenv(hub.URL_ENV, f"http://127.0.0.1:{_closed_port()}")
    assert hub.fetch("resnet18", "IMAGENET1K_V1", progress=False) == (caches["hub"] / filename, "resnet18")
    dst = caches["converted"].parent / "rn18"
    assert convert.main(["resnet18:IMAGENET1K_V1", str(dst)]) == 0
    variables, record = load_variables(dst)
    assert record["arch"] == "torchvision:resnet18" and record["source"]["file"] == filename
    _assert_equal_to_file(variables, state_dict)
    assert server.requests == []
    # torch's default place when $TORCH_HOME is unset: $XDG_CACHE_HOME/torch.
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(dst.parent / "xdg"))
    assert hub.hub_checkpoints_dir() == dst.parent / "xdg" / "torch" / "hub" / "checkpoints"


def _one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(ConversionError, match=match) as info:
        hub.fetch(*args, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_truncated_download_leaves_nothing(caches, publish, server, filename, pth_bytes):
    publish(filename)
    server.plan[:] = ["truncate"]
    message = _one_line_error(
        rf"download of .*/models/{filename} stopped after [\d,]+ of {len(pth_bytes):,} bytes .*"
        rf"put it at {caches['hub'] / filename}$",
        "resnet18",
    )
    assert "deleted it" in message
    assert _files(caches["hub"]) == [] and _files(caches["converted"]) == []


def test_wrong_hash_leaves_nothing(caches, publish, server, filename, pth_bytes):
    wrong = "resnet18-00000000.pth"  # our bytes under a name whose hash prefix they do not have
    publish(wrong)
    digest = hashlib.sha256(pth_bytes).hexdigest()
    with pytest.raises(
        hub.DownloadError, match=rf"sha256 {digest[:16]}\.\.\. does not start with 00000000"
    ) as e:
        pretrained("resnet18")
    assert "\n" not in str(e.value) and e.value.exit_status == 75
    assert server.requests == [f"models/{wrong}"]
    assert _files(caches["hub"]) == [] and _files(caches["converted"]) == []


def test_server_down_names_the_file_and_where_to_put_it(caches, publish, filename, monkeypatch, capsys):
    publish(filename)
    dead = _closed_port()
    monkeypatch.setenv(hub.URL_ENV, f"http://127.0.0.1:{dead}/")
    url = f"http://127.0.0.1:{dead}/{filename}"
    _one_line_error(
        rf"^cannot download {url} \(.*refused.*\): offline\? "
        rf"fetch {url} and put it at {caches['hub'] / filename}$",
        "resnet18:IMAGENET1K_V1",
    )
    # The command line: that one line, exit status 75 (EX_TEMPFAIL: rerun later).
    assert convert.main(["resnet18", str(caches["converted"].parent / "out")]) == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot download {url} (")
    assert _files(caches["hub"]) == [] and _files(caches["converted"]) == []
    assert not (caches["converted"].parent / "out").exists()


def test_names_tags_and_timm(caches, server, tmp_path, monkeypatch):
    # The published table: file names carry the hash prefix torch checks; DEFAULT is V2 from ResNet-50 on.
    assert hub.torchvision_file("resnet50", "IMAGENET1K_V2")[2] == "resnet50-11ad3fa6.pth"
    assert hub.torchvision_file("resnet50")[1:] == ("IMAGENET1K_V2", "resnet50-11ad3fa6.pth")
    assert hub.torchvision_file("torchvision:resnet18:DEFAULT")[2] == "resnet18-f37072fd.pth"
    assert hub.torchvision_file("resnet152", "ResNet152_Weights.IMAGENET1K_V1")[2] == "resnet152-394f9c45.pth"
    assert hub.hash_prefix("resnet101-cd907fc2.pth") == "cd907fc2"
    with pytest.raises(
        ConversionError, match=r"no resnet18 weights 'IMAGENET1K_V2'; it has: IMAGENET1K_V1, DEFAULT"
    ):
        hub.torchvision_file("resnet18", "IMAGENET1K_V2")
    with pytest.raises(ConversionError, match=r"'resnet26' has no published torchvision weights"):
        hub.torchvision_file("resnet26")
    # A name is a name only where no such path exists; a path keeps its meaning.
    assert hub.is_model_name("resnet50") and hub.is_model_name("timm:resnet50.a1_in1k")
    assert not hub.is_model_name("resnet50.pth") and not hub.is_model_name("runs/resnet50")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet50").mkdir()
    assert not hub.is_model_name("resnet50")
    with pytest.raises(ConversionError, match=r"weights='IMAGENET1K_V2' goes with a model name"):
        pretrained("resnet50", weights="IMAGENET1K_V2")
    # timm: only from a file on disk, never downloaded (no hash to check one against).
    message = _one_line_error(
        r"^timm weights are not downloaded by name .*: fetch https://huggingface\.co/timm/resnet50\.a1_in1k/"
        r"resolve/main/model\.safetensors and put it at .*/timm/resnet50\.a1_in1k\.safetensors, or pass",
        "timm:resnet50.a1_in1k",
    )
    assert str(caches["converted"]) in message and server.requests == []
    (caches["converted"] / "timm").mkdir(parents=True)
    (caches["converted"] / "timm" / "resnet50.a1_in1k.safetensors").write_bytes(b"")
    assert hub.fetch("timm:resnet50.a1_in1k") == (
        caches["converted"] / "timm" / "resnet50.a1_in1k.safetensors",
        "timm:resnet50",
    )
    snapshot = tmp_path / "hf" / "models--timm--resnet26.bt_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert hub.fetch("timm:resnet26.bt_in1k")[0] == snapshot / "model.safetensors"
