"""Tests of resnet_jax.models: parameter counts, shapes, dtypes, block numerics, ghost BN, errors.

Large nets are only traced with jax.eval_shape; real forward passes use CIFAR-sized nets.
"""

import dataclasses
import functools
import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax.models import (
    IMAGENET_DEPTHS,
    MODEL_NAMES,
    BasicBlock,
    Block,
    Bottleneck,
    GhostBatchNorm,
    PlainBlock,
    PlainBottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    ResNet,
    build_model,
    cifar_preact_resnet,
    cifar_resnet,
    count_params,
    list_models,
    pad_shortcut,
    resnet,
)

# 'rbg' keys compile about 4x faster than threefry on CPU, which dominates init time here.
KEY = jax.random.key(0, impl="rbg")


def abstract_variables(model, size, batch=1):
    x = jnp.zeros((batch, size, size, 3))
    return jax.eval_shape(lambda: model.init(KEY, x, train=False))


def n_params(model, size=32):
    return count_params(abstract_variables(model, size))


# --------------------------------------------------------------------------- closed forms
def conv(k, cin, cout):
    return k * k * cin * cout


def expected_params(kind, sizes, widths, stem, shortcut, num_classes, residual=True, preact=False):
    """Parameter count derived by hand from the papers' layer tables."""
    expansion = 4 if kind == "bottleneck" else 1
    stem_k = 7 if stem == "imagenet" else 3
    total = conv(stem_k, 3, widths[0]) + 2 * widths[0]  # conv + BN (2016: the first unit's)
    cin = widths[0]
    for stage, (n, f) in enumerate(zip(sizes, widths)):
        for j in range(n):
            cout = f * expansion
            if kind == "basic":
                total += conv(3, cin, f) + conv(3, f, f)
                # post-activation: a BN after each conv; pre-activation: a BN before each
                # conv, the first block's first one being the stem's (counted above).
                total += (2 * cin + 2 * f) if preact else (2 * f + 2 * f)
            else:
                total += conv(1, cin, f) + conv(3, f, f) + conv(1, f, cout)
                total += (2 * cin + 2 * f + 2 * f) if preact else (2 * f + 2 * f + 2 * cout)
            if preact and stage == 0 and j == 0:
                total -= 2 * cin
            stride = 2 if stage > 0 and j == 0 else 1
            shape_changes = stride != 1 or cin != cout
            if residual and (shortcut == "C" or (shortcut == "B" and shape_changes)):
                total += conv(1, cin, cout) + (0 if preact else 2 * cout)
            cin = cout
    if preact:
        total += 2 * cin
    return total + cin * num_classes + num_classes


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize(
    "depth,count",
    [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160), (152, 60_192_808)],
)
def test_imagenet_param_counts_equal_torchvision(depth, count):
    assert n_params(resnet(depth, stride_on_3x3=True), 224) == count


@pytest.mark.parametrize(
    "depth,count",
    [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962), (1202, 19_421_274)],
)
def test_cifar_option_a_param_counts(depth, count):
    assert n_params(cifar_resnet(depth)) == count


# A plain net is its ResNet without the shortcuts' parameters: torchvision's count less its
# `downsample` projections (ImageNet); the option-A CIFAR ResNet, whose shortcuts have none.
PLAIN_COUNTS = {
    "plain18": 11_515_688,
    "plain34": 21_623_848,
    "plain50": 22_780_456,
    "cifar_plain20": 269_722,
    "cifar_plain56": 853_018,
}


@pytest.mark.parametrize("name", sorted(PLAIN_COUNTS))
def test_plain_param_counts(name):
    model = build_model(name)
    kind = "bottleneck" if name == "plain50" else "basic"
    expected = expected_params(
        kind, model.stage_sizes, model.stage_widths, model.stem, "B", model.num_classes, residual=False
    )
    got = n_params(model, 224 if model.stem == "imagenet" else 32)
    assert got == expected == PLAIN_COUNTS[name]


def test_plain_counts_are_torchvision_without_its_projections():
    import torchvision  # noqa: PLC0415 (only this test needs it)

    for name in ("plain18", "plain34", "plain50"):
        net = getattr(torchvision.models, name.replace("plain", "resnet"))(weights=None)
        count = sum(p.numel() for k, p in net.named_parameters() if "downsample" not in k)
        assert count == PLAIN_COUNTS[name], name
    assert PLAIN_COUNTS["cifar_plain56"] == n_params(cifar_resnet(56))  # option A: no parameters


@pytest.mark.parametrize("depth,n,paper_millions", [(164, 18, 1.7), (1001, 111, 10.2)])
def test_preact_bottleneck_counts(depth, n, paper_millions):
    model = cifar_preact_resnet(depth)
    assert model.stage_sizes == (n, n, n) and model.block_cls is PreActBottleneck
    expected = expected_params("bottleneck", (n,) * 3, (16, 32, 64), "cifar", "B", 10, preact=True)
    got = n_params(model)
    assert got == expected
    assert abs(got / 1e6 - paper_millions) / paper_millions < 0.03


@pytest.mark.parametrize(
    "name,shortcut",
    [
        ("cifar_resnet20", "A"),
        ("cifar_resnet20", "B"),
        ("cifar_resnet20", "C"),
        ("resnet50", "C"),
        ("preact_resnet18", "B"),
        ("cifar_preact_resnet20", "C"),
    ],
)
def test_param_counts_match_closed_form_per_shortcut(name, shortcut):
    model = build_model(name, shortcut=shortcut)
    kind = "basic" if model.block_cls.expansion == 1 else "bottleneck"
    expected = expected_params(
        kind,
        model.stage_sizes,
        model.stage_widths,
        model.stem,
        shortcut,
        model.num_classes,
        preact=model.block_cls.preact,
    )
    assert n_params(model, 224 if model.stem == "imagenet" else 32) == expected


def test_shortcut_options_order_params():
    a, b, c = (n_params(cifar_resnet(20, shortcut=s)) for s in "ABC")
    assert a == n_params(build_model("cifar_plain20"))  # option A is parameter-free
    # B: two 1x1 projections + BN (16->32, 32->64); C: a projection in all nine blocks.
    assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert c - b == 3 * (16 * 16 + 32) + 2 * (32 * 32 + 64) + 2 * (64 * 64 + 128)


def test_width_multiplier_scales_every_width():
    model = cifar_resnet(20, width_multiplier=0.5)
    assert n_params(model) == expected_params("basic", (3, 3, 3), (8, 16, 32), "cifar", "A", 10)
    feats = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=ResNet.features),
        abstract_variables(model, 32),
        jnp.zeros((1, 32, 32, 3)),
    )
    assert feats["stem"].shape[-1] == 8 and feats["stage3"].shape[-1] == 32


def test_count_params_accepts_variables_or_params():
    variables = abstract_variables(cifar_resnet(8), 32)
    assert count_params(variables) == count_params(variables["params"])
    assert count_params(variables) == expected_params("basic", (1, 1, 1), (16, 32, 64), "cifar", "A", 10)


# --------------------------------------------------------------------------- shapes and dtypes
CIFAR_CASES = [
    ("cifar_resnet8", {}),
    ("cifar_plain8", {}),
    ("cifar_preact_resnet8", {}),
    ("cifar_preact_resnet11", {"block": "bottleneck"}),
    ("cifar_resnet8", {"shortcut": "B"}),
    ("cifar_resnet8", {"shortcut": "C"}),
    ("cifar_preact_resnet8", {"shortcut": "C"}),
]
# ImageNet nets cost more to trace: one dtype each, rotating.
IMAGENET_CASES = [
    ("resnet18", {}, "bfloat16"),
    ("resnet50", {"shortcut": "A"}, "float16"),
    ("plain50", {}, "float32"),
    ("preact_resnet50", {"shortcut": "C"}, "bfloat16"),
    ("resnet50", {"stride_on_3x3": True}, "float32"),
    ("preact_resnet18", {}, "float16"),
]
SHAPE_CASES = [
    (name, kw, dtype) for name, kw in CIFAR_CASES for dtype in ("float32", "bfloat16", "float16")
] + IMAGENET_CASES


@pytest.mark.parametrize("name,kw,dtype", SHAPE_CASES)
def test_shapes_and_dtypes(name, kw, dtype):
    model = build_model(name, dtype=dtype, num_classes=7, **kw)
    size = 64 if model.stem == "imagenet" else 16
    x = jnp.zeros((2, size, size, 3))
    variables = abstract_variables(model, size, batch=2)
    logits, updates = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables
    )
    feats = jax.eval_shape(lambda v: model.apply(v, x, method=ResNet.features), variables)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert {a.dtype for a in jax.tree.leaves(variables["params"])} == {jnp.dtype("float32")}
    assert {a.dtype for a in jax.tree.leaves(updates)} == {jnp.dtype("float32")}
    assert feats["stage1"].dtype == jnp.dtype(dtype)
    width = model.stage_widths[-1] * model.block_cls.expansion
    assert feats[f"stage{len(model.stage_sizes)}"].shape[-1] == width


@pytest.mark.parametrize("size", [160, 224, 320, 97])
def test_imagenet_features_strides(size):
    model = build_model("resnet50")
    variables = abstract_variables(model, 224)
    x = jnp.zeros((1, size, size, 3))
    feats = jax.eval_shape(lambda v: model.apply(v, x, method=ResNet.features), variables)
    logits = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    assert logits.shape == (1, 1000)
    assert feats["stem"].shape == (1, -(-size // 2), -(-size // 2), 64)
    for i, (stride, ch) in enumerate(zip((4, 8, 16, 32), (256, 512, 1024, 2048))):
        side = -(-size // stride)  # ceil: every stride-2 layer pads symmetrically by k // 2
        assert feats[f"stage{i + 1}"].shape == (1, side, side, ch)


def test_features_share_parameter_names_with_call():
    model = build_model("preact_resnet18")
    full = abstract_variables(model, 64)
    backbone = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 64, 64, 3)), method=ResNet.features))
    assert set(full["params"]) - set(backbone["params"]) == {"final_bn", "head"}
    # Pre-activation nets activate the stem once (2016: "the first activation right after
    # conv1 and before splitting into two paths"): stem_bn, and no bn1 in the first block.
    for net in (full, abstract_variables(build_model("cifar_preact_resnet110"), 32)):
        assert "stem_bn" in net["params"]
        assert "bn1" not in net["params"]["stage1_block1"]
        assert "bn1" in net["params"]["stage1_block2"] and "bn1" in net["params"]["stage2_block1"]


# --------------------------------------------------------------------------- block numerics
def bound_layers(train):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(GhostBatchNorm, use_running_average=not train)
    return dict(conv=conv, norm=norm, act=nn.relu)


def run_block(block, x, train, variables=None):
    """(output, variables); jitted, since op-by-op dispatch is slower than compiling."""
    variables = variables or jax.jit(block.init)(KEY, x)
    out = jax.jit(lambda v: block.apply(v, x, mutable=["batch_stats"] if train else False))(variables)
    return (out[0] if train else out), variables


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cls,channels", [(PreActBasicBlock, 8), (PreActBottleneck, 16)])
def test_preact_block_is_identity_with_zero_init(cls, channels, train):
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, channels))
    block = cls(filters=channels // cls.expansion, strides=1, zero_init_last=True, **bound_layers(train))
    y, _ = run_block(block, x, train)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cls,channels", [(BasicBlock, 8), (Bottleneck, 16)])
def test_postact_block_is_relu_with_zero_init(cls, channels, train):
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, channels))
    block = cls(filters=channels // cls.expansion, strides=1, zero_init_last=True, **bound_layers(train))
    y, _ = run_block(block, x, train)
    np.testing.assert_array_equal(np.asarray(y), np.maximum(np.asarray(x), 0))
    assert np.any(np.asarray(x) < 0)


def test_every_preact_block_of_a_network_is_its_shortcut_at_init():
    model = cifar_preact_resnet(20, zero_init_last=True)  # option A: no parameters either
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))

    strides = []  # filled while tracing

    def block_io(variables):
        calls = []

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, PreActBasicBlock):
                calls.append((args[0], out))
                strides.append(context.module.strides)
            return out

        with nn.intercept_methods(record):
            model.apply(variables, x, train=True, mutable=["batch_stats"])
        return calls

    variables = jax.jit(functools.partial(model.init, train=False))(KEY, x)
    io = jax.jit(block_io)(variables)
    assert len(io) == 9 and strides.count(2) == 2
    for (inputs, out), stride in zip(io, strides):
        expected = numpy_option_a(np.asarray(inputs), out.shape[-1], stride)
        np.testing.assert_array_equal(np.asarray(out), expected)


def numpy_option_a(x, out_channels, stride):
    sub = x[:, ::stride, ::stride, :]
    zeros = np.zeros(sub.shape[:-1] + (out_channels - sub.shape[-1],), sub.dtype)
    return np.concatenate([sub, zeros], axis=-1)


@pytest.mark.parametrize(
    "shape,out,stride", [((2, 8, 8, 4), 8, 2), ((1, 7, 7, 3), 3, 1), ((3, 7, 5, 2), 6, 2)]
)
def test_option_a_matches_numpy(shape, out, stride):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(pad_shortcut(jnp.asarray(x), out, stride)), numpy_option_a(x, out, stride)
    )


def test_option_a_block_downsampling_is_relu_of_padded_input():
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    block = BasicBlock(filters=8, strides=2, shortcut="A", zero_init_last=True, **bound_layers(True))
    y, variables = run_block(block, x, True)
    assert not any("proj" in k for k in variables["params"])
    np.testing.assert_array_equal(np.asarray(y), np.maximum(numpy_option_a(np.asarray(x), 8, 2), 0))


def ref_conv(x, kernel, stride, pad):
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )


def ref_bn(x, p, stats, train, eps=1e-5):
    x = np.asarray(x, np.float64)
    if train:
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    else:
        mean, var = np.asarray(stats["mean"]), np.asarray(stats["var"])
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def randomise(variables, seed):
    """Random BN scales/biases/statistics so the reference check is not trivial."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree,
        [
            leaf + 0.3 * jax.random.uniform(k, leaf.shape) if leaf.ndim == 1 else leaf
            for leaf, k in zip(leaves, keys)
        ],
    )


@pytest.mark.parametrize("train", [True, False])
def test_basic_block_matches_hand_written_reference(train):
    x = jax.random.normal(jax.random.key(4), (3, 8, 8, 4))
    block = BasicBlock(filters=6, strides=2, shortcut="B", **bound_layers(train))
    variables = randomise(block.init(KEY, x), 5)
    y, _ = run_block(block, x, train, variables)
    p, s = variables["params"], variables["batch_stats"]
    h = np.maximum(ref_bn(ref_conv(x, p["conv1"]["kernel"], 2, 1), p["bn1"], s["bn1"], train), 0)
    h = ref_bn(ref_conv(jnp.asarray(h, jnp.float32), p["conv2"]["kernel"], 1, 1), p["bn2"], s["bn2"], train)
    sc = ref_bn(ref_conv(x, p["proj_conv"]["kernel"], 2, 0), p["proj_bn"], s["proj_bn"], train)
    np.testing.assert_allclose(np.asarray(y), np.maximum(h + sc, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride_on_3x3", [False, True])
def test_bottleneck_matches_hand_written_reference(stride_on_3x3):
    x = jax.random.normal(jax.random.key(6), (2, 8, 8, 8))
    block = Bottleneck(filters=4, strides=2, stride_on_3x3=stride_on_3x3, **bound_layers(False))
    variables = randomise(block.init(KEY, x), 7)
    y, _ = run_block(block, x, False, variables)
    p, s = variables["params"], variables["batch_stats"]
    s1, s3 = (1, 2) if stride_on_3x3 else (2, 1)

    def conv_bn(h, i, stride, pad):
        out = ref_conv(jnp.asarray(h, jnp.float32), p[f"conv{i}"]["kernel"], stride, pad)
        return ref_bn(out, p[f"bn{i}"], s[f"bn{i}"], False)

    h = np.maximum(conv_bn(x, 1, s1, 0), 0)
    h = np.maximum(conv_bn(h, 2, s3, 1), 0)
    h = conv_bn(h, 3, 1, 0)
    sc = ref_bn(ref_conv(x, p["proj_conv"]["kernel"], 2, 0), p["proj_bn"], s["proj_bn"], False)
    np.testing.assert_allclose(np.asarray(y), np.maximum(h + sc, 0), rtol=1e-4, atol=1e-4)


def test_preact_projection_reads_preactivated_input():
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 4))
    block = PreActBasicBlock(filters=8, strides=2, shortcut="B", **bound_layers(False))
    variables = randomise(block.init(KEY, x), 9)
    y, _ = run_block(block, x, False, variables)
    p, s = variables["params"], variables["batch_stats"]
    pre = jnp.asarray(np.maximum(ref_bn(x, p["bn1"], s["bn1"], False), 0), jnp.float32)
    h = np.maximum(ref_bn(ref_conv(pre, p["conv1"]["kernel"], 2, 1), p["bn2"], s["bn2"], False), 0)
    h = ref_conv(jnp.asarray(h, jnp.float32), p["conv2"]["kernel"], 1, 1)
    sc = ref_conv(pre, p["proj_conv"]["kernel"], 2, 0)
    assert set(p) == {"bn1", "conv1", "bn2", "conv2", "proj_conv"}
    np.testing.assert_allclose(np.asarray(y), np.asarray(h + sc), rtol=1e-4, atol=1e-4)


def test_plain_blocks_have_no_shortcut_and_reject_zero_init():
    x = jax.random.normal(jax.random.key(10), (2, 6, 6, 8))
    for cls in (PlainBlock, PlainBottleneck):
        block = cls(filters=8 // cls.expansion, strides=1, shortcut="C", **bound_layers(False))
        assert not any("proj" in k for k in block.init(KEY, x)["params"])
        with pytest.raises(ValueError, match="zero_init_last"):
            cls(filters=2, strides=1, zero_init_last=True, **bound_layers(False)).init(KEY, x)


def test_zero_init_last_targets_last_bn_scale_or_last_conv():
    post = build_model("cifar_resnet8", zero_init_last=True)
    p = jax.jit(lambda: post.init(KEY, jnp.zeros((1, 8, 8, 3)), train=False))()["params"]
    assert not np.any(p["stage2_block1"]["bn2"]["scale"])
    assert np.all(p["stage2_block1"]["bn1"]["scale"] == 1)
    pre = build_model("cifar_preact_resnet11", block="bottleneck", zero_init_last=True)
    p = jax.jit(lambda: pre.init(KEY, jnp.zeros((1, 8, 8, 3)), train=False))()["params"]
    assert not np.any(p["stage2_block1"]["conv3"]["kernel"])
    assert np.any(p["stage2_block1"]["conv2"]["kernel"])


@pytest.mark.parametrize("mode,fan", [("fan_in", 3 * 3 * 16), ("fan_out", 3 * 3 * 32)])
def test_he_init_std(mode, fan):
    model = cifar_resnet(8, kernel_init=mode)
    p = jax.jit(lambda: model.init(KEY, jnp.zeros((1, 8, 8, 3)), train=False))()["params"]
    kernel = np.asarray(p["stage2_block1"]["conv1"]["kernel"])  # 3x3, 16 -> 32
    assert kernel.shape == (3, 3, 16, 32)
    assert abs(kernel.std() / np.sqrt(2.0 / fan) - 1) < 0.05


def test_small_network_trains_in_bfloat16_and_updates_stats():
    model = build_model("cifar_resnet8", dtype="bfloat16")
    x = jax.random.normal(jax.random.key(11), (4, 16, 16, 3))
    variables = model.init(KEY, x, train=False)
    logits, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
    old = variables["batch_stats"]["stem_bn"]["mean"]
    new = updates["batch_stats"]["stem_bn"]["mean"]
    assert new.dtype == jnp.float32 and not np.allclose(np.asarray(old), np.asarray(new))


# --------------------------------------------------------------------------- ghost batch norm
def ghost_input(batch=8):
    return jax.random.normal(jax.random.key(12), (batch, 3, 3, 5)) * 2.0 + 1.0


def test_ghost_bn_with_whole_batch_equals_flax_batchnorm():
    x = ghost_input()
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    ghost = GhostBatchNorm(ghost_batch_size=8)
    vf, vg = flax_bn.init(KEY, x), ghost.init(KEY, x)
    assert jax.tree.map(jnp.shape, vf) == jax.tree.map(jnp.shape, vg)
    yf, sf = flax_bn.apply(vf, x, mutable=["batch_stats"])
    yg, sg = ghost.apply(vg, x, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(yg), np.asarray(yf), atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), sg, sf)
    eval_flax = nn.BatchNorm(use_running_average=True).apply(sf | vf, x)  # running stats
    eval_ghost = GhostBatchNorm(use_running_average=True, ghost_batch_size=4).apply(sg | vg, x)
    np.testing.assert_allclose(np.asarray(eval_ghost), np.asarray(eval_flax), atol=1e-6)


def test_ghost_bn_normalises_each_group_and_averages_statistics():
    x = ghost_input()
    ghost = GhostBatchNorm(ghost_batch_size=2, momentum=0.8)
    variables = ghost.init(KEY, x)
    variables = {
        "params": {"scale": jnp.full((5,), 1.5), "bias": jnp.full((5,), -0.5)},
        "batch_stats": {"mean": jnp.full((5,), 0.25), "var": jnp.full((5,), 2.0)},
    }
    y, state = ghost.apply(variables, x, mutable=["batch_stats"])
    groups = np.asarray(x, np.float64).reshape(4, 2, 3, 3, 5)
    mean = groups.mean(axis=(1, 2, 3), keepdims=True)
    var = groups.var(axis=(1, 2, 3), keepdims=True)
    expected = ((groups - mean) / np.sqrt(var + 1e-5) * 1.5 - 0.5).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)
    whole = (np.asarray(x) - np.asarray(x).mean((0, 1, 2))) / np.asarray(x).std((0, 1, 2))
    assert np.abs(np.asarray(y) - (whole * 1.5 - 0.5)).max() > 0.05  # groups really differ
    np.testing.assert_allclose(
        np.asarray(state["batch_stats"]["mean"]), 0.8 * 0.25 + 0.2 * mean.mean(axis=0).ravel(), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(state["batch_stats"]["var"]), 0.8 * 2.0 + 0.2 * var.mean(axis=0).ravel(), atol=1e-5
    )


def test_ghost_bn_rejects_non_dividing_group():
    with pytest.raises(ValueError, match="ghost_batch_size=3.*batch size 8"):
        GhostBatchNorm(ghost_batch_size=3).init(KEY, ghost_input())
    model = build_model("cifar_resnet8", ghost_batch_size=3)
    variables = model.init(KEY, jnp.zeros((1, 8, 8, 3)), train=False)  # eval: no groups
    with pytest.raises(ValueError, match="ghost_batch_size"):
        model.apply(variables, jnp.zeros((4, 8, 8, 3)), train=True, mutable=["batch_stats"])


# --------------------------------------------------------------------------- registry, errors
def test_registry_builds_every_listed_model_with_family_defaults():
    assert list_models() == sorted(MODEL_NAMES)
    for name in MODEL_NAMES:
        assert isinstance(build_model(name), ResNet)
    r50 = build_model("resnet50")
    assert (r50.shortcut, r50.stride_on_3x3, r50.num_classes, r50.stem) == ("B", False, 1000, "imagenet")
    assert r50.stage_sizes == IMAGENET_DEPTHS[50][1]
    c = build_model("cifar_resnet110")
    assert (c.shortcut, c.num_classes, c.stage_sizes, c.stem) == ("A", 10, (18, 18, 18), "cifar")
    assert build_model("cifar_preact_resnet110").block_cls is PreActBasicBlock
    assert build_model("cifar_preact_resnet1001").stage_sizes == (111,) * 3
    forced = build_model("cifar_preact_resnet164", block="basic", shortcut="A")
    assert forced.stage_sizes == (27,) * 3 and forced.block_cls is PreActBasicBlock
    assert build_model("resnet18", num_classes=5, shortcut="C").num_classes == 5
    assert build_model("plain34").block_cls is PlainBlock


@pytest.mark.parametrize(
    "name,kw,pattern",
    [
        ("cifar_resnet21", {}, r"depth 21 is not 6n\+2"),
        ("cifar_plain2", {}, r"depth 2 is not 6n\+2"),
        ("cifar_preact_resnet32", {"block": "bottleneck"}, r"depth 32 is not 9n\+2"),
        ("cifar_preact_resnet20", {"block": "wide"}, r"block='wide' is not one of \('basic', 'bottleneck'\)"),
        ("resnet19", {}, r"depth 19 .*\[18, 34, 50, 101, 152, 200\]"),
        ("vgg16", {}, r"unknown model name 'vgg16'.*cifar_resnet\{6n\+2\}"),
        ("resnet", {}, r"unknown model name"),
        ("resnet50", {"shortcut": "D"}, r"shortcut='D' is not one of \('A', 'B', 'C'\)"),
        ("resnet50", {"width_multiplier": 0}, r"width_multiplier=0 must be a positive"),
        ("resnet50", {"stage_widths": (64, 0, 256, 512)}, r"stage_widths=.*positive ints"),
        ("resnet50", {"stage_widths": (64, 128)}, r"one width per stage"),
        ("resnet50", {"stage_sizes": ()}, r"stage_sizes=\(\) must be a non-empty"),
        ("resnet50", {"stem": "tiny"}, r"stem='tiny' is not one of \('imagenet', 'cifar'\)"),
        (
            "resnet50",
            {"dtype": "int8"},
            r"dtype='int8' is not one of \('float32', 'bfloat16', 'float16', 'float64'\)",
        ),
        ("resnet50", {"kernel_init": "xavier"}, r"kernel_init='xavier' is not one of"),
        ("resnet50", {"ghost_batch_size": 0}, r"ghost_batch_size=0 must be None or a positive int"),
        ("resnet50", {"num_classes": 0}, r"num_classes=0"),
        ("resnet50", {"bn_momentum": 1.0}, r"bn_momentum=1.0 must be in \[0, 1\)"),
        ("resnet50", {"conv_impl": "cudnn"}, r"conv_impl='cudnn' is not one of \('xla', 'im2col'\)"),
        ("resnet50", {"shorcut": "A"}, r"unknown override\(s\) \['shorcut'\]; allowed keys: .*'shortcut'"),
        ("resnet50", {"block": "basic"}, r"unknown override\(s\) \['block'\]"),
        ("plain18", {"zero_init_last": True}, r"zero_init_last=True is not allowed with PlainBlock"),
    ],
)
def test_bad_configs_raise_clear_errors(name, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_model(name, **kw)


def test_direct_construction_validates_eagerly():
    with pytest.raises(ValueError, match=r"shortcut='E'"):
        ResNet(stage_sizes=(1,), stage_widths=(8,), block_cls=BasicBlock, shortcut="E")
    with pytest.raises(ValueError, match="block_cls"):
        ResNet(stage_sizes=(1,), stage_widths=(8,), block_cls=nn.Dense)
    with pytest.raises(ValueError, match=r"conv_impl='auto' is not one of \('xla', 'im2col'\)"):
        ResNet(stage_sizes=(1,), stage_widths=(8,), block_cls=BasicBlock, conv_impl="auto")
    partial_block = functools.partial(Bottleneck, stride_on_3x3=True)
    model = ResNet(stage_sizes=(1,), stage_widths=(8,), block_cls=partial_block)
    assert n_params(model) == expected_params("bottleneck", (1,), (8,), "imagenet", "B", 1000)


# --------------------------------------------------------------------------- checkpoint structure
# sha256 of the sorted 'path shape dtype' lines of each net's init variables (params and
# batch_stats), recorded from the code before the blocks got a shared base class and the
# convolution became a ResNet field (commit 3000e50): checkpoints and the weight converters rely
# on these names, shapes and dtypes, so a refactoring must leave them exactly as they were.
STRUCTURE_SHA256 = [
    ("cifar_resnet20", {}, "f775faf405791db03366dda7246750904781c620a02c605a4752e0539a7956c0"),
    ("resnet50", {}, "fabe612012ec902e4348ca0b437bb4c56e53ac1dc4dbe45e677be0475a4073eb"),
    ("plain18", {}, "a6847f070042e2865ca444d7ddae9ffaa93fb5d34ecb95303ab1d656ed764f35"),
    ("plain50", {}, "a630d44e5ce26a3bb93fd8a1288720668d7e6c027b50238c4262bb5652018f02"),
    ("preact_resnet18", {}, "bb0d1603738d1f1c51416edc80ae30bced5d0301e6405d6e2907bff0a540d616"),
    (
        "cifar_preact_resnet11",
        {"block": "bottleneck"},
        "d36ec474eefbab99ee34cc0f04722defe76b4f501ad2dded562523c981209bf9",
    ),
    (
        "resnet18",
        {"shortcut": "C", "zero_init_last": True},
        "b673b98c73d1448ee53d3a922e8afc4941909323c7d4b4ffb6ad785ad9564610",
    ),
]


def structure_lines(variables):
    return sorted(
        f"{'/'.join(k.key for k in path)} {tuple(leaf.shape)} {leaf.dtype}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
    )


@pytest.mark.parametrize("name,kw,digest", STRUCTURE_SHA256)
def test_variable_structure_is_the_recorded_one(name, kw, digest):
    lines = structure_lines(abstract_variables(build_model(name, **kw), 32))
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest, lines[:8]


def test_conv_impl_adds_no_variables():
    xla, im2col = (abstract_variables(cifar_resnet(8, conv_impl=c), 32) for c in ("xla", "im2col"))
    assert structure_lines(xla) == structure_lines(im2col)


def test_blocks_share_the_base_fields_in_order():
    shared = ["filters", "strides", "conv", "norm", "act", "shortcut", "zero_init_last"]
    own = {
        Bottleneck: ["stride_on_3x3"],
        PlainBottleneck: ["stride_on_3x3"],
        PreActBasicBlock: ["preactivate_input"],
        PreActBottleneck: ["stride_on_3x3", "preactivate_input"],
    }
    kinds = {
        PlainBlock: (1, False, False),
        BasicBlock: (1, True, False),
        Bottleneck: (4, True, False),
        PlainBottleneck: (4, False, False),
        PreActBasicBlock: (1, True, True),
        PreActBottleneck: (4, True, True),
    }
    for cls, (expansion, residual, preact) in kinds.items():
        assert issubclass(cls, Block)
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
        assert names == shared + own.get(cls, []), cls
        assert (cls.expansion, cls.residual, cls.preact) == (expansion, residual, preact), cls
