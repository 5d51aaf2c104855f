"""BN statistics recalibrated after training ("precise BN", resnet_jax/train/recalibrate.py).

The definition checked: weights fixed; the net runs forward in training mode piece by piece,
every BN layer normalising each piece (each ghost group) with its own statistics; a layer's new
mean and variance are those of its inputs over all the images, E[x^2] - E[x]^2 combined exactly
from per-piece sums. The reference is tests/_torch_reference.py's float64 torch network
(written from the papers), with each BN call's input summed in torch.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import flax
import jax
import numpy as np
import pytest
import torch
from _configs import ROOT, tiny_config
from _torch_reference import Reference, nchw, network

from resnet_jax import models
from resnet_jax.data import cifar
from resnet_jax.train import config as config_lib
from resnet_jax.train import recalibrate

NUM_IMAGES, PIECE = 256, 64
RECORD = 1 + 32 * 32 * 3  # CIFAR-10 binary: a label byte, then the image as 3 planes of 32x32


def real_images(cifar_dir: Path, n: int) -> np.ndarray:
    """The first n images of data_batch_1, read here from the file's documented layout,
    scaled to [0, 1] and centred by their own per-channel mean (float64, [n, 32, 32, 3])."""
    raw = np.fromfile(cifar_dir / "data_batch_1.bin", np.uint8, count=n * RECORD).reshape(n, RECORD)
    images = raw[:, 1:].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
    return images - images.mean(axis=(0, 1, 2))


class SummingReference(Reference):
    """The torch reference in training mode, recording per call each BN input's per-channel
    count, sum and sum of squares (float64)."""

    def __init__(self, variables):
        super().__init__(variables, train=True)
        self.sums: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}

    def bn(self, x, path):
        n = x.numel() // x.shape[1]
        s1, s2 = x.sum(dim=(0, 2, 3)).numpy(), (x * x).sum(dim=(0, 2, 3)).numpy()
        self.sums.setdefault("/".join(path), []).append((n, s1, s2))
        return super().bn(x, path)


def random_variables(model, images: np.ndarray, rng: np.random.Generator) -> dict:
    """Weights drawn here in numpy (no compiled init): He-normal kernels, BN scales, biases
    and moving averages away from their initial values, so that the per-piece normalisation
    and the shift of the sums both matter."""
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images[:2])

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        return {
            "scale": lambda: rng.uniform(0.5, 1.5, shape),
            "bias": lambda: rng.normal(0.0, 0.3, shape),
            "mean": lambda: rng.normal(0.0, 1.0, shape),
            "var": lambda: rng.uniform(0.5, 2.0, shape),
        }[name]()

    return jax.tree_util.tree_map_with_path(draw, {k: shapes[k] for k in ("params", "batch_stats")})


@pytest.mark.parametrize("ghost", [None, 16], ids=["global_bn", "ghost_bn_16"])
def test_statistics_equal_torch_computation_of_the_precise_bn_definition(cifar_dir, ghost):
    """float64 on both sides: the recalibrated mean and variance of every BN layer equal the
    torch computation to 1e-9 relative. Float64 rounding over these sums (at most 65,536 values
    per channel and piece, a few layers deep) stays near 1e-13, so 1e-9 is a wide margin, yet
    10^6 times finer than what separates the exact combination from a mean of per-piece
    variances (percents: the spread of the piece means), which the test checks too.

    With ghost BN of 16 images, a piece of 64 is normalised as 4 independent groups; BN is
    the only thing that mixes images, so the reference runs pieces of 16."""
    images = real_images(cifar_dir, NUM_IMAGES)
    with jax.enable_x64(True):
        model = models.build_model("cifar_resnet8", dtype="float64", conv_impl="xla", ghost_batch_size=ghost)
        variables = random_variables(model, images, np.random.default_rng(0))
        pieces = [images[i : i + PIECE] for i in range(0, NUM_IMAGES, PIECE)]
        moments = recalibrate.bn_moments(model, variables, pieces)

    ref = SummingReference(variables)
    group = ghost or PIECE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 convolutions: threads cost more than they save
    try:
        for i in range(0, NUM_IMAGES, group):
            network(ref, nchw(images[i : i + group]), "BasicBlock", (1, 1, 1), (16, 32, 64), "cifar", "A")
    finally:
        torch.set_num_threads(threads)

    assert set(moments) == set(ref.sums) and len(ref.sums) == 7  # stem_bn + 2 per block
    assert all(m.count == NUM_IMAGES * ref.sums[k][0][0] // group for k, m in moments.items())
    largest_gap = 0.0
    for layer, calls in ref.sums.items():
        n = sum(c[0] for c in calls)
        mean = sum(c[1] for c in calls) / n
        var = sum(c[2] for c in calls) / n - mean**2
        got = moments[layer]
        np.testing.assert_allclose(got.mean, mean, rtol=0, atol=1e-9 * np.sqrt(var).max(), err_msg=layer)
        np.testing.assert_allclose(got.var, var, rtol=1e-9, err_msg=layer)
        per_piece = np.mean([c[2] / c[0] - (c[1] / c[0]) ** 2 for c in calls], axis=0)
        largest_gap = max(largest_gap, float(np.max(np.abs(per_piece - var) / var)))
    assert largest_gap > 1e-3, "a mean of per-piece variances would pass as well: the test cannot tell"


def unflat_npz(path) -> dict:
    with np.load(path) as f:
        return flax.traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory, cifar_dir):
    """A 4-step tiny CIFAR run with bn_recalibration over 256 images (8 pieces of 32) on 8
    simulated devices, then scripts/evaluate.py --recalibrate-bn 256 on its workdir, there."""
    root = tmp_path_factory.mktemp("recalibrated")
    overrides = {
        "schedule__total_steps": 4,
        "schedule__boundaries": (3,),
        "eval_every_steps": 4,
        "eval_batch_size": 200,  # divides by 8 devices
        "bn_recalibration__num_images": 256,
    }
    job = {"workdir": str(root / "run"), "data_dir": str(cifar_dir), "overrides": overrides}
    job["out"] = str(root / "evaluate.json")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_recalibrate_worker.py"), json.dumps(job)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    config = tiny_config(cifar_dir, **overrides)
    return config, root / "run", json.loads((root / "evaluate.json").read_text())


def test_a_run_reports_both_errors_and_saves_the_recalibrated_statistics(eight_device_run, cifar_dir):
    """results.json holds the error with the moving averages and with the new statistics; the
    saved weights are the final checkpoint's parameters with the statistics of the first 256
    images of epoch 0's order, un-augmented: computed here again on 1 device from pieces built
    from the raw CIFAR arrays, they equal the 8-device run's to float32 rounding (each piece
    of 32 sharded 4 per device, the sums reduced over the mesh)."""
    config, workdir, report = eight_device_run
    evaluate_json = workdir.parent / "evaluate.json"
    results = json.loads((workdir / "results.json").read_text())
    recal = results["bn_recalibration"]
    assert results["hardware"]["devices"] == 8
    assert recal["error_moving_averages"] == results["final_error"]
    assert recal["num_images"] == 256 and recal["piece_size"] == 32
    assert 0.0 <= recal["error"] <= 1.0 and recal["checkpoint"] == "bn_recalibrated"

    final, saved = (unflat_npz(f"{evaluate_json}.{name}.npz") for name in ("final", "saved"))
    assert report["weights"] == str(workdir)
    jax.tree.map(np.testing.assert_array_equal, saved["params"], final["params"])

    data = cifar.load_cifar10("binary", cifar_dir)
    train = data.train_images[: config.dataset.train_subset]
    mean = train.astype(np.float64).mean(axis=0) / 255.0  # the paper's per-pixel mean
    order = np.random.Generator(np.random.PCG64([config.seed, 0])).permutation(len(train))[:256]
    pieces = [(train[order[i : i + 32]] / 255.0 - mean).astype(np.float32) for i in range(0, 256, 32)]
    model = config_lib.build_model(config, 10)
    expected = recalibrate.recalibrated_batch_stats(model, final, pieces)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), saved["batch_stats"], expected
    )
    # The statistics did change: the moving averages of 4 steps are far from them.
    moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(final))]
    assert max(moved) > 0.01


def test_evaluate_script_reports_both_errors(eight_device_run):
    """scripts/evaluate.py --recalibrate-bn on the run's workdir reports the errors of the run's
    results.json: with the stored moving averages, and with statistics recomputed as the run did."""
    _, workdir, report = eight_device_run
    recal = json.loads((workdir / "results.json").read_text())["bn_recalibration"]
    assert report["top1_error"] == recal["error_moving_averages"]
    assert report["bn_recalibrated"] == {
        "num_images": 256,
        "piece_size": 32,
        "top1_error": recal["error"],
        "top5_error": recal["error_top5"],
        "loss": pytest.approx(recal["loss"], rel=1e-6),
    }


def test_num_images_must_be_whole_batches_of_the_training_set(cifar_dir):
    config = tiny_config(cifar_dir, bn_recalibration__num_images=100)
    with pytest.raises(
        config_lib.ConfigError, match=r"bn_recalibration.num_images = 100 .* multiple of the 32"
    ):
        config_lib.validate(config)
    config.bn_recalibration.num_images = 4096  # the subset holds 2048
    with pytest.raises(config_lib.ConfigError, match="at most the 2048 training images, e.g. 2048"):
        config_lib.validate(config)
