"""Every number the evaluation reports, against a plain-numpy reference from raw logits.

The reference (tests/_eval_reference.py, no resnet_jax code) averages softmax probabilities
over the views, ranks labels with ties to the lower class index, and drops padding rows
(mask False). It is compared with what the code reports for 'center', 'ten_crop' and
'multi_scale':
  (a) `steps.eval_step` itself, on batches whose views carry known logits (a stand-in
      apply_fn reads the logits off the image), padding rows included;
  (b) the trainer's eval record in metrics.jsonl, for a tiny ResNet on 6 of the shared
      ImageNet JPEGs (one run per protocol, one training step from weights whose head puts
      top-1 and top-5 errors strictly between 0 and 1): the reference gets the logits of
      every view of every image by applying the run's checkpointed variables to the views
      the data pipeline makes, then reduces them in numpy;
  (c) scripts/evaluate.py's `evaluate` on each of those runs' workdirs.
Each comparison also checks that its data could tell the right answer from the wrong ones
(padding counted, log-probabilities or logits averaged), so that no test passes vacuously.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import _eval_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _configs import ROOT, load_config
from _configs import tiny_config as cifar_config
from _imagenet import make_image_folder, samples

from resnet_jax.train import steps
from resnet_jax.train.state import TrainState

KEYS = ("loss_sum", "wrong", "wrong5", "count")


def test_the_reference_by_hand():
    """Two views of 3 classes: softmax [1/6, 4/6, 1/6] and [1/2, 1/4, 1/4] average to
    [1/3, 11/24, 5/24], so labels 0, 1, 2 rank 1, 0, 2 and label 0 costs log 3."""
    logits = np.array([[[0.0, np.log(4.0), 0.0], [np.log(2.0), 0.0, 0.0]]] * 3)
    np.testing.assert_allclose(ref.averaged_probabilities([logits])[0], [1 / 3, 11 / 24, 5 / 24], rtol=1e-12)
    ex = ref.per_example([logits], np.array([0, 1, 2]))
    np.testing.assert_allclose(ex["loss"], -np.log([1 / 3, 11 / 24, 5 / 24]), rtol=1e-12)
    np.testing.assert_array_equal(ex["wrong"], [1, 0, 1])
    np.testing.assert_array_equal(ex["wrong5"], [0, 0, 0])
    # The same two views as two groups of one view each (multi-scale style): the same average.
    np.testing.assert_allclose(
        ref.averaged_probabilities([logits[:, :1], logits[:, 1:]]),
        ref.averaged_probabilities([logits]),
        rtol=1e-15,
    )
    assert ref.summary([([logits], np.array([0, 1, 2]), np.array([True, True, False]))]) == pytest.approx(
        {"loss": (np.log(3) - np.log(11 / 24)) / 2, "error": 0.5, "error_top5": 0.0, "count": 2}
    )


# ---------------------------------------------------------------------------------------------
# (a) eval_step on known logits


@functools.cache
def _reader(num_classes: int):
    """A stand-in model: the logits of an image are its first `num_classes` pixel values."""

    def apply_fn(variables, x, train):
        assert not train
        return x.reshape(x.shape[0], -1)[:, :num_classes]

    return apply_fn


def _state(num_classes: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={},
        batch_stats={},
        opt_state=(),
        apply_fn=_reader(num_classes),
        tx=None,
    )


def _as_views(logits: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """[B, V, C] logits -> [B, V, side, side, 1] images whose first C pixels are the logits."""
    b, v, c = logits.shape
    assert side * side >= c
    flat = rng.normal(size=(b, v, side * side)).astype(np.float32) * 100  # junk beyond the logits
    flat[..., :c] = logits
    return flat.reshape(b, v, side, side, 1)


def _batch(rng, *, batch: int, groups: tuple[int, ...], num_classes: int, padding: int, scale: float = 3.0):
    """Known logits for `groups` (views per group), labels, and a mask with `padding` False rows
    at the end. Padding rows get their least likely class as label (wrong, top-5 too, were they counted)."""
    logits = [(rng.normal(size=(batch, v, num_classes)) * scale).astype(np.float32) for v in groups]
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    mask = np.arange(batch) < batch - padding
    labels[~mask] = np.argmin(ref.averaged_probabilities(logits)[~mask], axis=-1)
    sides = [int(np.ceil(np.sqrt(num_classes))) + i for i in range(len(groups))]  # a size per group
    views = tuple(_as_views(lg, s, rng) for lg, s in zip(logits, sides))
    return logits, {"views": views, "label": labels, "mask": mask}


def _check_against_reference(out, logits, batch):
    expected = ref.sums(logits, batch["label"], batch["mask"])
    got = {k: float(out[k]) for k in KEYS}
    assert got["count"] == expected["count"] > 0
    assert got["wrong"] == expected["wrong"] and got["wrong5"] == expected["wrong5"]
    assert got["loss_sum"] == pytest.approx(expected["loss_sum"], rel=1e-5)
    return expected


PROTOCOL_GROUPS = {"center": (1,), "ten_crop": (10,), "multi_scale": (2, 2, 2)}


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_GROUPS))
def test_eval_step_matches_the_reference_on_known_logits(protocol):
    rng = np.random.default_rng(sorted(PROTOCOL_GROUPS).index(protocol))
    logits, batch = _batch(rng, batch=64, groups=PROTOCOL_GROUPS[protocol], num_classes=12, padding=5)
    out = jax.jit(steps.eval_step)(_state(12), batch)
    expected = _check_against_reference(out, logits, batch)
    assert expected["count"] == 59
    # Not vacuous: errors strictly inside (0, count), and the 5 padding rows, all wrong,
    # would have changed the sums had they been counted.
    assert 0 < expected["wrong5"] < expected["wrong"] < expected["count"]
    everything = ref.sums(logits, batch["label"], np.ones(64, bool))
    assert everything["wrong"] == expected["wrong"] + 5 and everything["wrong5"] == expected["wrong5"] + 5
    if protocol != "center":
        # The data tell probability averaging from log-probability and logit averaging.
        top1 = np.argmax(ref.averaged_probabilities(logits), axis=-1)
        assert np.sum(top1 != ref.log_prob_mean_top1(logits)) > 0
        assert np.sum(top1 != ref.logit_mean_top1(logits)) > 0


def test_eval_step_single_image_batch_is_the_one_view_case():
    """'image' [B, H, W, C] (CIFAR's path) is the same as one view of it."""
    rng = np.random.default_rng(7)
    logits, batch = _batch(rng, batch=32, groups=(1,), num_classes=10, padding=3)
    single = {"image": batch["views"][0][:, 0], "label": batch["label"], "mask": batch["mask"]}
    out = steps.eval_step(_state(10), single)
    assert _check_against_reference(out, logits, batch)["count"] == 29


def test_eval_step_summed_over_batches_is_the_dataset_mean():
    """Batches add up exactly; summarize_eval divides by the real examples, not the rows."""
    rng = np.random.default_rng(11)
    parts = [_batch(rng, batch=16, groups=(10,), num_classes=8, padding=p) for p in (0, 0, 9)]
    eval_fn = jax.jit(steps.eval_step)
    total = None
    for _, batch in parts:
        out = eval_fn(_state(8), batch)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    record = steps.summarize_eval(jax.device_get(total))
    expected = ref.summary([(lg, b["label"], b["mask"]) for lg, b in parts])
    assert record["count"] == expected["count"] == 16 + 16 + 7
    assert record["error"] == pytest.approx(expected["error"], abs=1e-12)
    assert record["error_top5"] == pytest.approx(expected["error_top5"], abs=1e-12)
    assert record["loss"] == pytest.approx(expected["loss"], rel=1e-5)


@pytest.mark.parametrize("num_classes", [2, 3, 5, 6])
def test_top5_with_few_classes(num_classes):
    """With <= 5 classes every label is in the top 5; with 6, only the lowest-scored one is out."""
    rng = np.random.default_rng(num_classes)
    logits, batch = _batch(rng, batch=40, groups=(10,), num_classes=num_classes, padding=4)
    out = jax.jit(steps.eval_step)(_state(num_classes), batch)
    expected = _check_against_reference(out, logits, batch)
    if num_classes <= 5:
        assert float(out["wrong5"]) == 0.0
    else:
        assert 0 < expected["wrong5"] < expected["count"]


def test_ties_rank_the_lower_class_index_first():
    """Exact ties (one view, equal logits): the lower class index wins top-1 and top-5 places."""
    logits = np.zeros((8, 1, 7), np.float32)
    logits[:, 0, :] = [1, 1, 1, 1, 1, 1, 1]
    logits[4:, 0, :] = [0, 2, 2, 2, 2, 2, 2]  # classes 1..6 tie for first place
    labels = np.array([0, 1, 4, 5, 1, 2, 5, 6], np.int32)
    mask = np.ones(8, bool)
    views = (logits.reshape(8, 1, 7, 1, 1),)
    out = jax.jit(steps.eval_step)(_state(7), {"views": views, "label": labels, "mask": mask})
    rank = ref.label_rank(ref.averaged_probabilities([logits]), labels)
    np.testing.assert_array_equal(rank, [0, 1, 4, 5, 0, 1, 4, 5])
    assert float(out["wrong"]) == np.sum(rank >= 1) == 6
    assert float(out["wrong5"]) == np.sum(rank >= 5) == 2


# ---------------------------------------------------------------------------------------------
# (b) the trainer's metrics.jsonl and (c) scripts/evaluate.py, on real JPEGs

N_VAL, EVAL_BATCH = 6, 4  # two eval batches, the second with 2 padding rows
# A CIFAR-stem ResNet-8 at half width on 32 px crops of the JPEGs (any model reads any image
# size): a fraction of ResNet-18's compile time. One training step with BN frozen.
TINY = {
    "model.name": "cifar_resnet8",
    "model.width_multiplier": 0.5,
    "model.bn_frozen": True,
    "dataset.name": "image_folder",
    "dataset.image_size": 32,
    "dataset.scale_range": (36, 44),
    "dataset.eval_resize": 36,
    "dataset.eval_scales": (32, 40),
    "batch_size": 8,
    "reference_batch_size": 8,
    "eval_batch_size": EVAL_BATCH,
    "optimizer.learning_rate": 1e-4,
    "schedule.total_steps": 1,
    "schedule.epochs": None,
    "schedule.boundary_epochs": (),
    "steps_per_dispatch": 1,
    "log_every_steps": 1,
    "eval_every_steps": 1,
    "checkpoint_every_steps": 1,
    "tensorboard": False,
}
PROTOCOLS = ("center", "ten_crop", "multi_scale")
HEAD_STD = 0.2  # logits spread by about 2.3 over the classes, 0.06-0.13 over the views
VIEWS = {"center": 1, "ten_crop": 10, "multi_scale": 4}  # multi_scale: 2 views at each of 2 scales


def tiny_config(folder, protocol: str, **extra):
    config = load_config("resnet18", "imagenet.py")
    for dotted, value in {
        **TINY,
        "dataset.data_dir": str(folder),
        "dataset.eval_protocol": protocol,
        **extra,
    }.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _head(params) -> tuple[tuple, tuple]:
    """Paths of the classifier's kernel [features, 1000] and bias [1000]."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    (kernel,) = [p for p, x in leaves if np.ndim(x) == 2 and np.shape(x)[1] == 1000]
    (bias,) = [p for p, x in leaves if np.ndim(x) == 1 and np.shape(x)[0] == 1000]
    return kernel, bias


def _edit(tree, path, fn):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(np.asarray(x)) if p == path else x, tree)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), n_val=N_VAL, n_train=16)


@pytest.fixture(scope="module")
def val_labels(folder):
    """The ILSVRC indices of the val images (make_image_folder's last N_VAL samples)."""
    labels = np.array([int(r["label_index"]) for r in samples()[-N_VAL:]])
    assert len(set(labels.tolist())) == N_VAL
    return labels


def _numpy_init(abstract, head_std: float, seed: int = 0):
    """Variables of the shapes in `abstract` without running the model's init (whose first
    call compiles for seconds): He-normal kernels, the head's with std `head_std`, BN scale 1,
    biases and running means 0, running variances 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            std = head_std if x.shape[-1] == 1000 else np.sqrt(2.0 / np.prod(x.shape[:-1]))
            return (rng.normal(size=x.shape) * std).astype(np.float32)
        return (np.ones if name.endswith(("['scale']", "['var']")) else np.zeros)(x.shape, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope="module")
def start_weights(folder, val_labels, tmp_path_factory):
    """A tiny ResNet whose head makes the errors informative: +24 on one val image's label
    and +13 on three others' make them the 4 best classes of every image, so 4 of the
    6 images have their label in the top 5 and 1 of 6 first, whatever the rest of the
    logits (head std HEAD_STD) say. The runs keep BN frozen: their one training step leaves
    the running statistics as they are here."""
    from resnet_jax.interop import weights
    from resnet_jax.train import config as config_lib

    model = config_lib.build_model(tiny_config(folder, "center"), 1000)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    variables = _numpy_init(abstract, HEAD_STD)
    boost = np.zeros(1000, np.float32)
    boost[val_labels[1:4]] = 13.0
    boost[val_labels[0]] = 24.0
    _, bias = _head(variables["params"])
    params = _edit(variables["params"], bias, lambda b: b + boost)
    record = {"format": 1, "model": "cifar_resnet8", "model_overrides": {"width_multiplier": 0.5}}
    return weights.save_converted(
        tmp_path_factory.mktemp("start") / "weights",
        {"params": params, "batch_stats": variables["batch_stats"]},
        record,
    )


@pytest.fixture(scope="module")
def runs(folder, start_weights, tmp_path_factory):
    """One training step from `start_weights` per protocol; each run evaluates with its protocol."""
    from resnet_jax.interop import weights
    from resnet_jax.train import loop

    out = {}
    for protocol in PROTOCOLS:
        workdir = tmp_path_factory.mktemp(protocol) / "run"
        loop.train_and_evaluate(
            tiny_config(folder, protocol, init_from=str(start_weights)),
            str(workdir),
            load_weights=weights.load_for_init,
        )
        out[protocol] = workdir
    return out


def _reference_from_run(folder, workdir, protocol):
    """The reference metrics: the run's checkpointed variables applied to the pipeline's views,
    then the numpy reduction. Also returns the per-image averaged probabilities and labels."""
    from resnet_jax.data import imagenet
    from resnet_jax.interop import weights
    from resnet_jax.train import config as config_lib
    from resnet_jax.train import sources

    config = tiny_config(folder, protocol)
    d = config.dataset
    variables, _ = weights.load_variables(workdir)
    apply = jax.jit(functools.partial(config_lib.build_model(config, 1000).apply, train=False))
    batches = []
    pipeline = imagenet.eval_batches(
        sources.imagenet_spec(d),
        protocol=protocol,
        per_process_batch=EVAL_BATCH,
        process_index=0,
        process_count=1,
        image_size=d.image_size,
        resize_size=d.eval_resize,
        scales=tuple(d.eval_scales),
    )
    for batch in pipeline:
        groups = [
            np.asarray(apply(variables, g.reshape(-1, *g.shape[2:]))).reshape(*g.shape[:2], -1)
            for g in batch["views"]
        ]
        batches.append((groups, batch["label"], batch["mask"]))
    assert len(batches) == 2 and sum(int(m.sum()) for _, _, m in batches) == N_VAL
    assert sum(g.shape[1] for g in batches[0][0]) == VIEWS[protocol]
    probs = np.concatenate([ref.averaged_probabilities(g)[m] for g, _, m in batches])
    labels = np.concatenate([lb[m] for _, lb, m in batches])
    return ref.summary(batches), batches, probs, labels


def _assert_no_near_ties(probs, labels):
    """The label's place (first? in the top 5?) must not hinge on round-off between the
    pipeline's and this file's forward passes: no competitor within 1e-4 relative of it."""
    own = probs[np.arange(len(labels)), labels]
    others = np.where(np.arange(probs.shape[1])[None] == labels[:, None], -np.inf, probs)
    best = np.sort(others, axis=1)[:, ::-1]
    for k in (0, 4):  # the best competitor (top-1) and the 5th best (top-5)
        assert np.all(np.abs(best[:, k] - own) > 1e-4 * own), "near tie: change the seed in start_weights"


@pytest.fixture(scope="module")
def references(folder, runs):
    return {p: _reference_from_run(folder, runs[p], p) for p in PROTOCOLS}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_trainer_eval_record_matches_the_reference(protocol, runs, references):
    from resnet_jax.train.metrics import read_metrics

    expected, batches, probs, labels = references[protocol]
    _assert_no_near_ties(probs, labels)
    (record,) = [r for r in read_metrics(runs[protocol] / "metrics.jsonl") if r["split"] == "validation"]
    assert record["count"] == expected["count"] == N_VAL
    assert record["error"] == pytest.approx(expected["error"], abs=1e-9)
    assert record["error_top5"] == pytest.approx(expected["error_top5"], abs=1e-9)
    assert record["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    # Informative: errors strictly between 0 and 1, and padding rows (grey images, label 0)
    # are wrong, so counting them would show.
    assert 0 < expected["error_top5"] < expected["error"] < 1
    padded = ref.summary([(g, lb, np.ones_like(m)) for g, lb, m in batches])
    assert padded["count"] == 8 and round(padded["error"] * 8) == round(expected["error"] * 6) + 2
    if protocol != "center":
        # Averaging log-probabilities instead would give a loss well outside the tolerance.
        views = [np.concatenate(g, axis=1)[m] for g, _, m in batches]
        log_mean = np.concatenate([-np.log(ref.softmax(v)).mean(axis=1) for v in views])
        alt = float(np.mean(log_mean[np.arange(N_VAL), labels]))
        assert abs(alt - expected["loss"]) > 1e-4 * expected["loss"]


_EVALUATE = """
import importlib.util, json, sys
sys.path.insert(0, "tests")
from test_eval_reference import tiny_config
spec = importlib.util.spec_from_file_location("evaluate_script", "scripts/evaluate.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
folder, workdirs = sys.argv[1], json.loads(sys.argv[2])
print(json.dumps({p: script.evaluate(tiny_config(folder, p), w) for p, w in workdirs.items()}))
"""


@pytest.fixture(scope="module")
def evaluated(folder, runs):
    """scripts/evaluate.py's `evaluate` on each run's workdir with the run's protocol: one
    subprocess (the script defines absl flags that another test's in-process import of
    resnet_jax.main would clash with)."""
    workdirs = json.dumps({p: str(w) for p, w in runs.items()})
    proc = subprocess.run(
        [sys.executable, "-c", _EVALUATE, str(folder), workdirs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_evaluate_script_matches_the_reference(protocol, evaluated, references):
    expected, _, probs, labels = references[protocol]
    _assert_no_near_ties(probs, labels)
    got = evaluated[protocol]
    assert got["protocol"] == protocol and got["count"] == expected["count"] == N_VAL
    assert got["top1_error"] == pytest.approx(expected["error"], abs=1e-9)
    assert got["top5_error"] == pytest.approx(expected["error_top5"], abs=1e-9)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert 0 < expected["error_top5"] < expected["error"] < 1


# ---------------------------------------------------------------------------------------------
# CIFAR: the trainer's (and scripts/evaluate.py's) on-device evaluation of the test set


def test_cifar_evaluation_matches_the_reference(cifar_dir):
    """CifarSource.evaluate (what the trainer and scripts/evaluate.py call for CIFAR) on 300
    test images in batches of 128: the last batch has 84 padding rows (index 0, mask False)."""
    from resnet_jax import parallel
    from resnet_jax.data import augment
    from resnet_jax.train import config as config_lib
    from resnet_jax.train import sources

    config = cifar_config(cifar_dir, dataset__eval_subset=300, eval_batch_size=128)
    mesh = parallel.make_mesh()
    info = sources.describe(config)
    model = config_lib.build_model(config, info.num_classes)
    shape = (1, *info.image_shape)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    variables = _numpy_init(abstract, head_std=0.5, seed=1)
    source = sources.build(config, mesh, info, steps.train_step, steps.eval_step)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=(),
        apply_fn=model.apply,
        tx=None,
    )
    record = steps.summarize_eval(source.evaluate(jax.device_put(state, parallel.replicated(mesh))))

    images = augment.eval_batch(source.data.test.images, source.data.mean, source.data.std, dtype=jnp.float32)
    logits = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, images))
    labels = np.asarray(source.data.test.labels)
    assert logits.shape == (300, 10) and labels.shape == (300,)
    expected = ref.summary([([logits[:, None]], labels, np.ones(300, bool))])
    _assert_no_near_ties(ref.averaged_probabilities([logits[:, None]]), labels)
    assert record["count"] == expected["count"] == 300
    assert record["error"] == pytest.approx(expected["error"], abs=1e-9)
    assert record["error_top5"] == pytest.approx(expected["error_top5"], abs=1e-9)
    assert record["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert 0 < expected["error_top5"] < expected["error"] < 1
