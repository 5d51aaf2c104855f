"""Pretrained weights in and out: torchvision/timm parity on real JPEGs, files, safety, NNX.

Every torchvision ResNet depth and every supported timm model gets random weights and
randomised BN statistics (so that a swapped mean/var, a missing transpose or a wrong
stride position shows up), is converted, and must give torch's eval-mode logits on real
ImageNet JPEGs (2 images at 96 px to keep ResNet-152 cheap on 2 cores); exported back,
torch must load it with strict=True and give the same logits again. torchvision's
IMAGENET1K_V1 and V2 weights are files for these same builders (checked below through their
published parameter counts), so random weights test both layouts; nothing is downloaded.
"""

import builtins
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
from _workdirs import final_arrays
from PIL import Image

import resnet_jax
from resnet_jax import convert, models
from resnet_jax.interop import layout, torch_files, weights
from resnet_jax.interop.layout import ConversionError
from resnet_jax.interop.nnx import to_nnx
from resnet_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "datasets" / "imagenet-samples"
SIZE = 96
TV_DEPTHS = (18, 34, 50, 101, 152)
TIMM_DEPTHS = (18, 26, 34, 50, 101, 152)
_JITTED: dict = {}  # depth -> jitted eval apply, shared by the torchvision and timm tests


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Two real ImageNet JPEGs, resized to SIZE x SIZE, ImageNet-normalised, NHWC float32."""
    with open(SAMPLES / "manifest.csv", newline="") as f:
        names = [row["filename"] for row in csv.DictReader(f)][:2]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = [
        (
            np.asarray(
                Image.open(SAMPLES / n).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32
            )
            / 255
            - mean
        )
        / std
        for n in names
    ]
    return np.stack(out).astype(np.float32)


def randomise(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BN affine and running statistics (a fresh net has mean 0, var 1, scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(7)
    return net.eval()


def torch_logits(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()


def jax_logits(depth: int, variables, x: np.ndarray) -> np.ndarray:
    if depth not in _JITTED:
        model = layout.build_target(f"timm:resnet{depth}" if depth == 26 else f"resnet{depth}")
        _JITTED[depth] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return np.asarray(_JITTED[depth](variables, x))


def numpy_sd(net: torch.nn.Module) -> dict:
    return {k: v.numpy() for k, v in net.state_dict().items()}


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    scale = np.abs(reference).max()
    assert scale > 1.0, "logits too small to test anything"
    assert np.abs(ours - reference).max() <= 1e-4 * scale


def check_round_trip(
    net: torch.nn.Module, fresh: torch.nn.Module, arch: str, depth: int, x: np.ndarray
) -> None:
    reference = torch_logits(net, x)
    variables = layout.from_state_dict(numpy_sd(net), arch)
    assert_close(jax_logits(depth, variables, x), reference)
    back = layout.to_state_dict(variables, arch)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    np.testing.assert_array_equal(torch_logits(fresh.eval(), x), reference)


@pytest.mark.parametrize("depth", TV_DEPTHS)
def test_torchvision_logits_equal_and_export_loads_strict(depth, images):
    torch.manual_seed(depth)
    net = randomise(getattr(torchvision.models, f"resnet{depth}")(), depth)
    fresh = getattr(torchvision.models, f"resnet{depth}")()
    check_round_trip(net, fresh, f"resnet{depth}", depth, images)


@pytest.mark.parametrize("depth", TIMM_DEPTHS)
def test_timm_logits_equal_and_export_loads_strict(depth, images):
    torch.manual_seed(100 + depth)
    net = randomise(timm.create_model(f"resnet{depth}", pretrained=False), 100 + depth)
    fresh = timm.create_model(f"resnet{depth}", pretrained=False)
    check_round_trip(net, fresh, f"timm:resnet{depth}", depth, images)


@pytest.mark.parametrize("depth", TV_DEPTHS)
def test_v1_and_v2_weights_have_the_converted_layout(depth):
    """The published weight files' parameter counts equal the converted layout's."""
    enum = torchvision.models.get_model_weights(f"resnet{depth}")
    tags = {w.name for w in enum}
    assert "IMAGENET1K_V1" in tags and (depth < 50 or "IMAGENET1K_V2" in tags)
    shapes = layout.expected_shapes(f"resnet{depth}", 1000)
    count = sum(
        int(np.prod(s))
        for k, s in shapes.items()
        if not k.endswith("num_batches_tracked") and "running" not in k
    )
    assert {w.meta["num_params"] for w in enum} == {count}


def test_features_equal_torchvision_stages(images):
    """features() on converted weights: stem and stage outputs of a detection backbone."""
    net = randomise(torchvision.models.resnet18(), 5)
    variables = layout.from_state_dict(numpy_sd(net), "resnet18")
    model = layout.build_target("resnet18")
    ours = model.apply(variables, images, method="features")
    taken = {}
    hooks = [
        getattr(net, f"layer{i}").register_forward_hook(
            lambda m, i_, o, i=i: taken.__setitem__(f"stage{i}", o)
        )
        for i in range(1, 5)
    ]
    hooks.append(net.relu.register_forward_hook(lambda m, i_, o: taken.__setitem__("stem", o)))
    torch_logits(net, images)
    for h in hooks:
        h.remove()
    assert set(ours) == set(taken)
    for name, value in taken.items():
        ref = value.permute(0, 2, 3, 1).numpy()
        assert ours[name].shape == ref.shape
        assert np.abs(np.asarray(ours[name]) - ref).max() <= 1e-4 * np.abs(ref).max(), name


# --------------------------------------------------------------------------- files and CLI
@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A randomised torchvision ResNet-18 (1000 classes) saved as a .pth."""
    torch.manual_seed(18)  # the same weights whichever tests ran before
    net = randomise(torchvision.models.resnet18(), 18)
    path = tmp_path_factory.mktemp("r18") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_cli_pth_to_checkpoint_and_back(r18, images, tmp_path, capsys):
    net, pth = r18
    assert convert.main([str(pth), str(tmp_path / "conv")]) == 0
    record = json.loads((tmp_path / "conv" / "pretrained.json").read_text())
    assert record["model"] == "resnet18" and record["arch"] == "torchvision:resnet18"
    assert record["source"]["file"] == "resnet18.pth" and len(record["source"]["sha256"]) == 64
    # torchvision's weights expect ImageNet's per-channel mean and std (0..255 units), as recorded
    norm = record["normalization"]
    assert (
        norm["mode"] == "channel_std" and norm["value_range"] == [0, 255] and norm["image_size"] == [224, 224]
    )
    assert norm["mean"] == [123.675, 116.28, 103.53] and norm["std"] == [58.395, 57.12, 57.375]
    model, variables = resnet_jax.pretrained(tmp_path / "conv")  # the documented one-liner
    assert_close(np.asarray(model.apply(variables, images, train=False)), torch_logits(net, images))
    assert convert.main([str(tmp_path / "conv"), str(tmp_path / "back.pth")]) == 0
    fresh = torchvision.models.resnet18()
    fresh.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
    np.testing.assert_array_equal(torch_logits(fresh.eval(), images), torch_logits(net, images))


def test_pretrained_one_liner_on_a_pth_and_nnx_wrapper(r18, images):
    net, pth = r18
    model, variables = resnet_jax.pretrained(pth)
    linen = np.asarray(model.apply(variables, images, train=False))
    assert_close(linen, torch_logits(net, images))
    nnx_model = to_nnx(model, variables)
    np.testing.assert_allclose(
        np.asarray(nnx_model(jnp.asarray(images), train=False)), linen, rtol=1e-6, atol=1e-5
    )
    del variables["batch_stats"]["stem_bn"]
    with pytest.raises(ConversionError, match="batch_stats/stem_bn/mean"):
        to_nnx(model, variables)


def test_truncated_file_is_refused(r18, tmp_path):
    data = r18[1].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"cut\.pth.*truncated"):
        weights.convert_file(cut)
    assert convert.main([str(cut), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_resnet34_file_given_as_resnet50_names_the_first_key(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(ConversionError) as err:
        weights.convert_file(path, "resnet50")
    message = str(err.value)
    assert "'layer1.0.conv1.weight' has shape (64, 64, 3, 3); resnet50 needs (64, 64, 1, 1)" in message
    assert "looks like resnet34" in message


def test_extra_and_missing_keys_are_named(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    extra = dict(sd, **{"layer4.1.se.fc.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ConversionError, match=r"'layer4\.1\.se\.fc\.weight'.*not part of resnet18"):
        weights.convert_file(tmp_path / "extra.pth", "resnet18")
    with pytest.raises(ConversionError, match=r"not a supported ResNet.*layer4\.1\.se\.fc\.weight"):
        weights.convert_file(tmp_path / "extra.pth")  # detection fails: names the key too
    missing = {k: v for k, v in sd.items() if k != "layer2.0.downsample.1.running_var"}
    with pytest.raises(ConversionError, match=r"'layer2\.0\.downsample\.1\.running_var'.*missing"):
        layout.from_state_dict({k: v.numpy() for k, v in missing.items()}, "resnet18")


class _Payload:
    """Unpickling this would create MARK: the kind of code a hostile .pth can carry."""

    mark = ""

    def __reduce__(self):
        return (builtins.open, (self.mark, "w"))


def test_a_pickle_carrying_code_is_refused_without_running_it(tmp_path):
    _Payload.mark = str(tmp_path / "MARK")
    torch.save({"conv1.weight": torch.zeros(1), "evil": _Payload()}, tmp_path / "evil.pth")
    assert not (tmp_path / "MARK").exists()
    with pytest.raises(ConversionError, match=r"refusing .*evil\.pth.*could run code"):
        weights.convert_file(tmp_path / "evil.pth")
    assert not (tmp_path / "MARK").exists()


def test_timm_resnet26_file_round_trips_through_a_checkpoint(tmp_path):
    """ResNet-26 is not in the depth table: the record rebuilds it from resnet50's family."""
    net = timm.create_model("resnet26")
    torch.save(net.state_dict(), tmp_path / "r26.pth")
    assert convert.main([str(tmp_path / "r26.pth"), str(tmp_path / "conv")]) == 0
    model, variables = resnet_jax.pretrained(tmp_path / "conv")
    assert tuple(model.stage_sizes) == (2, 2, 2, 2) and model.stride_on_3x3
    assert "stage4_block3" not in variables["params"] and "conv3" in variables["params"]["stage4_block2"]
    assert convert.main([str(tmp_path / "conv"), str(tmp_path / "back.safetensors")]) == 0
    from safetensors.torch import load_file

    timm.create_model("resnet26").load_state_dict(load_file(tmp_path / "back.safetensors"), strict=True)


def test_timm_deep_stem_variants_are_refused_by_name(tmp_path):
    with pytest.raises(ConversionError, match=r"'resnet50d'.*'d'.*deep stem"):
        layout.parse_arch("timm:resnet50d")
    torch.save(timm.create_model("resnet18d").state_dict(), tmp_path / "r18d.pth")
    with pytest.raises(ConversionError, match=r"not a supported ResNet.*'conv1\.weight'.*missing"):
        weights.convert_file(tmp_path / "r18d.pth")


@pytest.mark.parametrize(
    "name,suffix", [("resnet50c", "c"), ("resnet50s", "s"), ("resnet26t", "t"), ("resnet101d", "d")]
)
def test_every_timm_variant_suffix_is_refused_by_name(name, suffix):
    with pytest.raises(ConversionError, match=rf"'{name}'.*'{suffix}'.*deep stem"):
        layout.parse_arch(f"timm:{name}")


def test_safetensors_file_imports_with_torchvision_logits(r18, images, tmp_path):
    from safetensors.torch import save_file

    net, _ = r18
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    model, variables, record = weights.convert_file(path)
    assert record["arch"] == "torchvision:resnet18"
    assert_close(jax_logits(18, variables, images), torch_logits(net, images))


def test_importing_the_package_and_converting_safetensors_never_imports_torch(r18, tmp_path):
    """A fresh interpreter: the package, the converter on a .safetensors file and the export back
    to .safetensors run, and torch is not in sys.modules afterwards (nor torchvision)."""
    from safetensors.torch import save_file

    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in r18[0].state_dict().items()}, str(path))
    code = (
        "import sys, resnet_jax\n"
        "from resnet_jax import convert\n"
        f"assert convert.main([{str(path)!r}, {str(tmp_path / 'conv')!r}]) == 0\n"
        f"assert convert.main([{str(tmp_path / 'conv')!r}, {str(tmp_path / 'back.safetensors')!r}]) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "back.safetensors").stat().st_size > 40_000_000  # 11.7M float32 weights


def test_export_refuses_another_bn_epsilon(tmp_path):
    """torchvision's BN has epsilon 1e-5: weights trained with another one mean something else."""
    model = models.build_model("resnet18", num_classes=3, stride_on_3x3=True, bn_epsilon=1e-3)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    record = {
        "model": "resnet18",
        "model_overrides": {"num_classes": 3, "stride_on_3x3": True, "bn_epsilon": 1e-3},
    }
    weights.save_converted(tmp_path / "eps", variables, record)
    with pytest.raises(ConversionError, match=r"bn_epsilon=0\.001.*bn_epsilon=1e-05"):
        weights.export_state_dict(tmp_path / "eps", "resnet18")
    record["model_overrides"]["bn_epsilon"] = 1e-5  # the same weights with torchvision's epsilon go
    weights.save_converted(tmp_path / "ok", variables, record)
    state_dict, arch = weights.export_state_dict(tmp_path / "ok", "resnet18")
    assert arch == "resnet18" and state_dict["fc.weight"].shape == (3, 512)


def test_weights_of_another_meaning_are_refused(tmp_path):
    """Same shapes, different meaning: the paper's ResNet-50 has its stride on the 1x1."""
    model = models.build_model("resnet50", num_classes=3)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    record = {"model": "resnet50", "model_overrides": {"num_classes": 3}}
    weights.save_converted(tmp_path / "paper50", variables, record)
    with pytest.raises(ConversionError, match="stride_on_3x3=False.*stride_on_3x3=True"):
        weights.export_state_dict(tmp_path / "paper50", "resnet50")
    v15 = models.build_model("resnet50", num_classes=3, stride_on_3x3=True)
    with pytest.raises(ConversionError, match="stride_on_3x3=False.*stride_on_3x3=True"):
        weights.init_variables_from(tmp_path / "paper50", variables, model=v15)
    same = weights.init_variables_from(tmp_path / "paper50", variables, model=model)
    assert jax.tree.structure(same) == jax.tree.structure(variables)


def test_torch_is_imported_only_by_the_converter(monkeypatch, r18, tmp_path):
    package = Path(resnet_jax.__file__).parent
    importers = sorted(
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if re.search(r"^\s*(import\s+torch|from\s+torch\S*\s+import)", p.read_text(), re.M)
    )
    assert importers == ["interop/torch_files.py"]
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    sd, _ = torch_files.load_state_dict(r18[1])  # reading a .pth needs no torch (interop/pth.py)
    np.testing.assert_array_equal(sd["conv1.weight"], r18[0].conv1.weight.detach().numpy())
    with pytest.raises(ConversionError, match="writing .pth files needs PyTorch.*pip install torch"):
        torch_files.save_state_dict(sd, tmp_path / "back.pth")  # writing one does


# --------------------------------------------------------------------------- fine-tuning
def test_init_from_keeps_a_fresh_head_and_refuses_other_mismatches(r18):
    net, pth = r18
    target_model = models.build_model("resnet18", num_classes=10)
    target = target_model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)), train=False)
    lines = []
    got = weights.init_variables_from(pth, target, log=lines.append)
    assert any("params/head/kernel (512, 1000) -> (512, 10)" in line for line in lines)
    np.testing.assert_array_equal(got["params"]["head"]["kernel"], target["params"]["head"]["kernel"])
    np.testing.assert_array_equal(
        got["params"]["stem_conv"]["kernel"], net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        got["batch_stats"]["stage4_block2"]["bn2"]["var"], net.layer4[1].bn2.running_var.numpy()
    )
    assert jax.tree.structure(got) == jax.tree.structure(target)
    other = models.build_model("resnet34", num_classes=10)
    other_vars = jax.eval_shape(lambda: other.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    with pytest.raises(ConversionError, match="stage1_block3/.* missing"):
        weights.init_variables_from(pth, other_vars, log=lines.append)


def test_bn_frozen_uses_and_keeps_running_statistics():
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) * 3 + 1
    frozen = models.build_model("cifar_resnet8", bn_frozen=True)
    variables = frozen.init(jax.random.key(1), x, train=False)
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda a: a + 0.3, variables["batch_stats"]),
    }
    out, updated = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(out, frozen.apply(variables, x, train=False))
    jax.tree.map(np.testing.assert_array_equal, updated["batch_stats"], variables["batch_stats"])
    live = models.build_model("cifar_resnet8")
    out_live, moved = live.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(out_live, out)
    assert not np.allclose(
        moved["batch_stats"]["stem_bn"]["mean"], variables["batch_stats"]["stem_bn"]["mean"]
    )

    # Scale and bias still train: their gradients are those of BN with fixed statistics.
    def loss(params):
        logits, _ = frozen.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(logits * jnp.arange(logits.shape[-1]))

    grads = jax.grad(loss)(variables["params"])
    bn = [
        g
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
        if path[-2].key.startswith(("bn", "stem_bn")) and path[-1].key in ("scale", "bias")
    ]
    assert len(bn) == 2 * 7 and all(float(jnp.abs(g).max()) > 0 for g in bn)
    with pytest.raises(ValueError, match="bn_frozen"):
        models.build_model("cifar_resnet8", bn_frozen=1)


def test_converted_model_fine_tunes_on_cifar10_through_the_command_line(r18, cifar_dir, tmp_path):
    """configs/finetune_cifar10.py with init_from: fresh 10-way head, loss falls, exports back."""
    net, pth = r18
    assert convert.main([str(pth), str(tmp_path / "conv")]) == 0
    workdir = tmp_path / "ft"
    flags = {
        "init_from": tmp_path / "conv",
        "dataset.data_dir": cifar_dir,
        "dataset.source": "binary",
        "dataset.train_subset": 1024,
        "dataset.eval_subset": 100,
        "batch_size": 32,
        "reference_batch_size": 32,
        "eval_batch_size": 100,
        "optimizer.learning_rate": 0.02,
        "schedule.total_steps": 40,
        "steps_per_dispatch": 10,
        "log_every_steps": 10,
        "eval_every_steps": 40,
        "checkpoint_every_steps": 40,
        "tensorboard": False,
    }
    cmd = [
        sys.executable,
        "-m",
        "resnet_jax.main",
        f"--config={ROOT / 'configs' / 'finetune_cifar10.py'}:resnet18",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in flags.items()),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "params/head/kernel (512, 1000) -> (512, 10)" in run.stderr
    losses = [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    # 3.27, 3.53, 2.91, 2.43 on CPU: the fresh head's first steps are noisy, then it learns.
    assert len(losses) == 4 and losses[-1] < 0.85 * losses[0], losses
    # It started from the converted weights: after 40 steps the stem still correlates with
    # them (r was 0.23 here; an independent He initialisation gives |r| ~ 1/sqrt(9408) = 0.01).
    _, items = final_arrays(workdir)
    start = net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0).ravel()
    assert np.corrcoef(items["params"]["stem_conv"]["kernel"].ravel(), start)[0, 1] > 0.1
    # And the fine-tuned run goes back to torchvision.
    assert convert.main([str(workdir), str(tmp_path / "ft.pth")]) == 0
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(torch.load(tmp_path / "ft.pth", weights_only=True), strict=True)


def test_input_size_resizes_inside_the_model():
    small = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    model = models.build_model("resnet18", num_classes=4, input_size=64)
    variables = model.init(jax.random.key(1), small, train=False)
    feats = model.apply(variables, small, method="features")
    assert feats["stage4"].shape == (2, 2, 2, 512)  # 64 / 32, not 32 / 32
    # The resize computed outside the model and outside JAX: torch's bilinear upsampling
    # (half-pixel centres, edge clamping), which is what 'bilinear' means for upsampling.
    big = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(small)).permute(0, 3, 1, 2),
        size=(64, 64),
        mode="bilinear",
        align_corners=False,
    )
    big = jnp.asarray(big.permute(0, 2, 3, 1).numpy())
    assert float(jnp.abs(big - jax.image.resize(small, big.shape, "bilinear")).max()) < 1e-6
    plain = models.build_model("resnet18", num_classes=4)
    np.testing.assert_allclose(
        model.apply(variables, small, train=False),
        plain.apply(variables, big, train=False),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="input_size"):
        models.build_model("resnet18", input_size=0)
