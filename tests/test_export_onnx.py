"""ONNX export (resnet_jax.export.onnx): onnxruntime's logits equal the Flax model's on real images.

Networks: the CIFAR ResNet-20 (shortcut A: strided slice + zero channel padding) on CIFAR-10
test images with a per-pixel mean, ResNet-18, and ResNet-50 with the stride on the first 1x1
(paper) and on the 3x3 (torchvision) on real ImageNet JPEGs. ResNet-18's basic blocks have no
1x1 to move the stride to (``stride_on_3x3`` is ignored there), so its two placements are one
graph. Weights are random but fixed, with perturbed BatchNorm statistics and affine terms, so a
swapped mean/var, a dropped epsilon, a wrong stride or padding shows up; nothing is downloaded.
The ImageNet nets run at 64x64 crops: every layer but the head's global mean is size-agnostic,
and a ResNet-50 costs a fraction of its 224x224 time on 2 cores. The input normalisation runs
inside the exported function, as it does for ``python -m resnet_jax.export``.

The bound, ``max|onnx - flax| <= 1e-4 * max|flax|`` (both float32): a dot product of K
float32 terms carries a rounding error of about ``sqrt(K) * u`` of its terms' magnitude
(u = 2**-24 ~ 6e-8, errors of random sign adding like a random walk); the widest sums here are
ResNet-50's 3x3 convolutions over 512 channels, K = 4608, so about 4e-6 per layer. BatchNorm
rescales each layer's output to order one, so the relative errors of the L ~ 50 layers on the
longest path add up rather than multiply: like a random walk again, ``sqrt(L) * 4e-6 ~ 3e-5``,
and the head's pooling and 2048-term product add ~3e-6. onnxruntime folds BatchNorm into the
convolution weights and sums in another order, which changes the individual roundings but not
their size. So 1e-4 leaves a factor of about 3 over the expected accumulation error, while any
real conversion mistake moves the logits by a sizeable fraction of their scale. The measured
differences are below 1e-6 of the scale (docs/pretrained.md).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
from _imagenet import SAMPLES_DIR, samples
from PIL import Image

from resnet_jax.data.constants import MEAN_RGB, STD_RGB
from resnet_jax.export import onnx as onnx_export
from resnet_jax.models import build_model

BOUND = 1e-4  # of max|logits|, derived in the module docstring
BATCHES = (1, 5)  # neither is a trace batch size (2, 3): the batch dimension really is dynamic
IMAGENET_SIZE = 64


def _random_variables(model, image_shape, seed):
    """Fixed random weights in the shapes ``model.init`` would make, without compiling it.

    Convolution kernels He-normal, the classifier 1/sqrt(fan-in); BatchNorm scale, bias, mean
    and variance all perturbed away from their init (1, 0, 0, 1) so that each one matters.
    """
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key)
        shape = leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            gain = 2.0 if len(shape) == 4 else 1.0
            values = rng.normal(0.0, np.sqrt(gain / fan_in), shape)
        elif name == "scale":
            values = rng.uniform(0.5, 1.5, shape)
        elif name == "var":
            values = rng.uniform(0.5, 2.0, shape)
        elif name in ("bias", "mean"):
            values = rng.normal(0.0, 0.2, shape)
        else:
            raise AssertionError(f"unexpected variable {jax.tree_util.keystr(path)}")
        return np.asarray(values, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _imagenet_images(n):
    """n real JPEGs: centre square, resized to IMAGENET_SIZE, RGB values in 0..255 (float32)."""
    out = []
    for row in samples()[:n]:
        image = Image.open(SAMPLES_DIR / row["filename"]).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        out.append(np.asarray(image.resize((IMAGENET_SIZE, IMAGENET_SIZE), Image.BILINEAR), np.float32))
    return np.stack(out)


def _cifar_images(cifar_dir: Path, n):
    """The first n CIFAR-10 test images in [0, 1] and a per-pixel mean of 1000 training images,
    read straight from the binary records (1 label byte, then 3x32x32 bytes, channel-major)."""

    def read(name, count):
        raw = np.fromfile(cifar_dir / name, np.uint8, count=count * 3073).reshape(count, 3073)
        return raw[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0

    return read("test_batch.bin", n), read("data_batch_1.bin", 1000).mean(axis=0)


def _check_export(tmp_path, model, variables, normalise, images):
    """Exports, runs both batch sizes in onnxruntime; returns (max |diff| / max |logits|, bytes)."""

    def apply_fn(variables, x):
        return model.apply(variables, normalise(x), train=False)

    path = tmp_path / "model.onnx"
    metadata = {"model": "test", "normalization": {"mean": [1.5, 2.5]}}
    info = onnx_export.write_onnx(apply_fn, variables, images.shape[1:], path, metadata)
    assert info["opset"] == onnx_export.OPSET
    assert info["input"]["shape"] == ["batch", *images.shape[1:]]
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left behind

    stored = onnx.load(path)
    assert {p.key: p.value for p in stored.metadata_props} == {
        "model": "test",
        "normalization": '{"mean": [1.5, 2.5]}',
    }
    assert stored.opset_import[0].version == onnx_export.OPSET

    expected = np.asarray(jax.jit(apply_fn)(variables, images))  # one compile, at the larger batch
    scale = float(np.abs(expected).max())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in BATCHES:
        (got,) = session.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: images[:batch]})
        assert got.shape == expected[:batch].shape and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - expected[:batch]).max()) / scale)
    # Independent of the bound: the logits differ between images (the net is not degenerate).
    assert float(np.abs(expected - expected[:1]).max()) > 1e-2 * scale
    return worst, path.stat().st_size


def test_cifar_resnet20_shortcut_a(tmp_path, cifar_dir):
    model = build_model("cifar_resnet20")
    assert model.shortcut == "A"
    images, pixel_mean = _cifar_images(cifar_dir, max(BATCHES))
    variables = _random_variables(model, images.shape[1:], seed=0)
    worst, _ = _check_export(tmp_path, model, variables, lambda x: x - pixel_mean, images)
    print(f"cifar_resnet20: max |onnx - flax| = {worst:.2e} of max |logits|")
    assert worst <= BOUND


@pytest.mark.parametrize(
    "name, stride_on_3x3",
    [("resnet18", False), ("resnet50", False), ("resnet50", True)],
    ids=["resnet18", "resnet50-stride-1x1", "resnet50-stride-3x3"],
)
def test_imagenet_resnets(tmp_path, name, stride_on_3x3):
    model = build_model(name, stride_on_3x3=stride_on_3x3)
    images = _imagenet_images(max(BATCHES))
    variables = _random_variables(model, images.shape[1:], seed=1)
    mean, std = np.float32(MEAN_RGB), np.float32(STD_RGB)
    worst, size = _check_export(tmp_path, model, variables, lambda x: (x - mean) / std, images)
    print(
        f"{name} stride_on_3x3={stride_on_3x3}: max |onnx - flax| = {worst:.2e} of max |logits|, {size} bytes"
    )
    assert worst <= BOUND


def test_unsupported_primitive_and_dtype_are_named(tmp_path):
    def apply_fn(variables, x):
        return jnp.cumsum(x, axis=1) * variables["w"]

    def bfloat16_fn(variables, x):
        return (x.astype(jnp.bfloat16) * variables["w"].astype(jnp.bfloat16)).astype(jnp.float32)

    variables = {"w": np.ones(3, np.float32)}
    with pytest.raises(onnx_export.OnnxExportError, match="cumsum"):
        onnx_export.write_onnx(apply_fn, variables, (2, 2, 3), tmp_path / "m.onnx")
    with pytest.raises(onnx_export.OnnxExportError, match="bfloat16.*float32 only"):
        onnx_export.write_onnx(bfloat16_fn, variables, (2, 2, 3), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
