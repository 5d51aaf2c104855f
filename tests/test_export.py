"""python -m resnet_jax.export: artifacts that run without resnet_jax and give the Flax logits.

The StableHLO artifacts of a CIFAR ResNet-8 (shortcut A, from a converted directory with a per-pixel
mean) and of a torchvision ResNet-18 (from its .pth) are loaded in a fresh process in which
importing resnet_jax fails, on real images normalised only as the side JSON says, at two batch
sizes each; their logits must equal the Flax model's. Both sides run float32 XLA on the CPU but
are compiled separately (the artifact's weights are constants, folded and fused differently),
so they agree to float32 rounding of sums of a few thousand terms: 1e-4 of the logit scale is
the bound the issue states and leaves two orders of magnitude of room.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from resnet_jax import export as export_lib
from resnet_jax import models
from resnet_jax.data import normalization
from resnet_jax.export.__main__ import main
from resnet_jax.interop import weights

IMAGENET_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "imagenet-samples"
BATCHES = (1, 3)


def random_variables(model, image_shape, seed):
    """Weights with BN running statistics far from their initial 0 and 1, so eval mode shows."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, *image_shape), np.float32), train=False)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = jax.tree_util.keystr(path)
        if "var" in key:
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1])) if "kernel" in key else 0.2
        return (rng.standard_normal(leaf.shape) * scale).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, {k: shapes[k] for k in ("params", "batch_stats")})


def cifar_images(cifar_dir, n):
    """The first n test images, uint8 [n, 32, 32, 3], read straight from the binary batch."""
    raw = np.fromfile(cifar_dir / "test_batch.bin", np.uint8, count=n * 3073).reshape(n, 3073)
    return raw[:, 1:].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)


def imagenet_images(n, size):
    names = sorted(p for p in IMAGENET_SAMPLES.glob("*.JPEG"))[:n]
    return np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in names]
    )


def as_fed(pixels, side):
    """What a consumer feeds, from the side JSON alone (numpy, no resnet_jax)."""
    norm = side["normalization"]
    scaled = pixels.astype(np.float32) * np.float32(norm["value_range"][1] / 255.0)
    return (scaled - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cifar_dir):
    """Both artifacts, their side JSON, the Flax logits, and the logits of a fresh process."""
    root = tmp_path_factory.mktemp("export")
    # A CIFAR ResNet-8 (shortcut A between its stages) in a converted directory, with a per-pixel mean.
    cifar = models.build_model("cifar_resnet8")
    assert cifar.shortcut == "A"
    cifar_vars = random_variables(cifar, (32, 32, 3), 20)
    mean = np.random.default_rng(1).uniform(0.4, 0.6, (32, 32, 3))
    record = {
        "format": weights.FORMAT,
        "model": "cifar_resnet8",
        "model_overrides": {},
        "source": {"note": "random weights"},
        "normalization": normalization.record(
            "pixel_mean", mean, [1.0, 1.0, 1.0], image_size=(32, 32), value_range=(0, 1), source="random"
        ),
    }
    weights.save_converted(root / "cifar", cifar_vars, record)
    assert main([str(root / "cifar"), str(root / "cifar.stablehlo")]) == 0
    # A torchvision ResNet-18 .pth, BN running statistics randomised.
    torch.manual_seed(18)
    net = torchvision.models.resnet18()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    torch.save(net.state_dict(), root / "resnet18.pth")
    side18 = export_lib.export_model(root / "resnet18.pth", root / "resnet18.stablehlo")

    inputs = {}
    sides = {}
    pixels = {"cifar": cifar_images(cifar_dir, sum(BATCHES)), "resnet18": imagenet_images(sum(BATCHES), 224)}
    for name in ("cifar", "resnet18"):
        sides[name] = json.loads((root / f"{name}.stablehlo.json").read_text())
        inputs[name] = as_fed(pixels[name], sides[name])
        np.save(root / f"{name}.npy", inputs[name])
    assert sides["resnet18"] == json.loads(json.dumps(side18))

    consumer = textwrap.dedent(
        """
        import sys
        sys.modules["resnet_jax"] = None  # importing it fails from here on
        import jax, numpy as np
        from pathlib import Path
        root, batches = Path(sys.argv[1]), [int(b) for b in sys.argv[2:]]
        out = {}
        for name in ("cifar", "resnet18"):
            program = jax.export.deserialize(bytearray((root / f"{name}.stablehlo").read_bytes()))
            images, start = np.load(root / f"{name}.npy"), 0
            for b in batches:
                out[f"{name}_{b}"] = np.asarray(program.call(images[start:start + b]))
                start += b
        assert sys.modules.get("resnet_jax") is None
        assert not any(m.startswith(("resnet_jax.", "flax")) for m in sys.modules)
        np.savez(root / "consumer.npz", **out)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", consumer, str(root), *map(str, BATCHES)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    consumed = dict(np.load(root / "consumer.npz"))

    flax = {}
    for name, src in (("cifar", root / "cifar"), ("resnet18", root / "resnet18.pth")):
        model, variables = weights.pretrained(src)
        flax[name] = np.asarray(model.apply(variables, inputs[name], train=False))
    return root, sides, consumed, flax, net, inputs


@pytest.mark.parametrize("name", ["cifar", "resnet18"])
def test_stablehlo_in_a_process_without_resnet_jax_gives_the_flax_logits(exported, name):
    _, _, consumed, flax, _, _ = exported
    start = 0
    for b in BATCHES:
        got = consumed[f"{name}_{b}"]
        want = flax[name][start : start + b]
        assert got.shape == want.shape == (b, 10 if name == "cifar" else 1000)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (name, b)
        start += b


def test_the_resnet18_artifact_gives_torchvisions_logits(exported):
    """The chain .pth -> artifact is checked against torch itself, not only against our Flax model."""
    _, _, consumed, _, net, inputs = exported
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(inputs["resnet18"].transpose(0, 3, 1, 2).copy())).numpy()
    got = np.concatenate([consumed[f"resnet18_{b}"] for b in BATCHES])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_side_json_says_what_to_feed(exported):
    root, sides, _, _, _, _ = exported
    cifar, r18 = sides["cifar"], sides["resnet18"]
    for side, name, classes, size in ((cifar, "cifar", 10, 32), (r18, "resnet18", 1000, 224)):
        assert side["artifact"] == f"{name}.stablehlo" and side["format"] == "stablehlo"
        assert side["bytes"] == (root / f"{name}.stablehlo").stat().st_size
        assert side["input"] == {
            "layout": "NHWC",
            "shape": ["batch", size, size, 3],
            "dtype": "float32",
            "channels": "RGB",
        }
        assert side["output"]["shape"] == ["batch", classes] and side["num_classes"] == classes
        assert side["stablehlo"]["platforms"] == ["cpu", "cuda", "tpu"]
        assert side["stablehlo"]["input_shape"] == ["batch", str(size), str(size), "3"]
        assert side["weights"] == "raw" and side["compute_dtype"] == "float32"
    assert cifar["model"] == "cifar_resnet8" and r18["model"] == "resnet18"
    assert r18["arch"] == "torchvision:resnet18" and r18["source"]["file"] == "resnet18.pth"
    # The recorded normalisations, whole: the per-pixel mean exactly, ImageNet's constants.
    stored = json.loads((root / "cifar" / weights.META_FILE).read_text())["normalization"]
    assert cifar["normalization"]["mean"] == stored["mean"] and np.shape(stored["mean"]) == (32, 32, 3)
    assert cifar["normalization"]["mode"] == "pixel_mean" and cifar["normalization"]["value_range"] == [0, 1]
    norm = r18["normalization"]
    assert norm["mode"] == "channel_std" and norm["value_range"] == [0, 255] and norm["resize"] == 256
    np.testing.assert_allclose(norm["mean"], [123.675, 116.28, 103.53], rtol=1e-6)
    np.testing.assert_allclose(norm["std"], [58.395, 57.12, 57.375], rtol=1e-6)


def bad_cases(root):
    return [
        ([str(root / "nowhere"), str(root / "x.stablehlo")], "SRC"),
        ([str(root / "cifar"), str(root / "x.tflite")], "must end in .stablehlo or .onnx"),
        ([str(root / "cifar"), str(root / "missing_dir" / "x.stablehlo")], "does not exist"),
        ([str(root / "cifar"), str(root)], "must end in"),
        ([str(root / "cifar"), str(root / "x.stablehlo"), "--arch", "resnet50", "--ema"], "EMA"),
        ([str(root / "cifar"), str(root / "x.stablehlo"), "--platforms", "cpu,gpu"], "allowed: cpu"),
        ([str(root / "cifar"), str(root / "x.onnx"), "--platforms", "cpu"], "--platforms"),
        ([str(root / "cifar"), str(root / "x.onnx"), "--dtype", "bfloat16"], "float32 only"),
        ([str(root / "cifar"), str(root / "x.stablehlo"), "--image-size", "64"], "per-pixel mean of 32x32"),
    ]


def test_bad_src_or_out_is_one_error_line_before_any_compile(exported, capsys, monkeypatch):
    root = exported[0]
    compiled = []
    monkeypatch.setattr(jax.export, "export", lambda *a, **k: compiled.append(a))
    for argv, words in bad_cases(root):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)
    assert not compiled and not (root / "x.stablehlo").exists()


def test_the_command_line_refuses_a_bad_src_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "resnet_jax.export", str(tmp_path / "nowhere"), str(tmp_path / "m.stablehlo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: SRC {tmp_path / 'nowhere'}: no such file or directory; SRC is a training workdir, a "
        "directory written by python -m resnet_jax.convert, a .pth/.safetensors file, or a model name "
        "(resnet50:IMAGENET1K_V2)"
    ]


def test_a_workdir_exports_its_ema_weights_and_recorded_normalisation(tmp_path):
    """A training workdir: the model from config.json, the normalisation from
    checkpoints/normalization.json, the EMA weights unless --no-ema (nothing compiled here)."""
    from resnet_jax.export.source import load_source
    from resnet_jax.train.checkpoint import Checkpointer

    model = models.build_model("cifar_resnet8")
    raw, ema = random_variables(model, (32, 32, 3), 1), random_variables(model, (32, 32, 3), 2)
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = {"model": {"name": "cifar_resnet8", "num_classes": None}, "dataset": {"name": "cifar10"}}
    (workdir / "config.json").write_text(json.dumps(config))
    with Checkpointer(workdir / "checkpoints", max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(7, {"step": np.int32(7), **raw, "ema": ema})
    mean = np.random.default_rng(3).uniform(0.4, 0.6, (32, 32, 3))
    stored = normalization.record(
        "pixel_mean", mean, [1.0, 1.0, 1.0], image_size=(32, 32), value_range=(0, 1), source="run"
    )
    normalization.save(workdir / "checkpoints", stored)
    for ema_flag, want, which in ((None, ema, "ema"), (False, raw, "raw")):
        source = load_source(workdir, ema=ema_flag)
        assert source.record["weights"] == which and source.record["step"] == 7
        jax.tree.map(np.testing.assert_array_equal, source.variables, want)
        assert source.normalization == json.loads(json.dumps(stored))
        assert source.image_shape == (32, 32, 3) and source.num_classes == 10
        assert source.model.conv_impl == "xla" and source.model.shortcut == "A"
