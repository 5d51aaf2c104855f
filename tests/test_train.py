"""End to end on real CIFAR-10: the loss falls, the net beats chance, resume is exact."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from _configs import ROOT, tiny_config
from _workdirs import final_arrays

from resnet_jax.data import augment, cifar
from resnet_jax.interop import weights
from resnet_jax.train import config as config_lib
from resnet_jax.train import feeding, loop
from resnet_jax.train.checkpoint import Checkpointer
from resnet_jax.train.config import ConfigError
from resnet_jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def trained(cifar_dir, tmp_path_factory):
    """300 steps of ResNet-8 on 2,048 real training images, evaluated on 500 test images in
    batches of 96, so that the last batch is padded (20 real images, 76 masked)."""
    workdir = tmp_path_factory.mktemp("trained")
    config = tiny_config(
        cifar_dir,
        schedule__total_steps=300,
        schedule__boundaries=(250,),
        steps_per_dispatch=25,
        log_every_steps=25,
        eval_every_steps=150,
        checkpoint_every_steps=150,
        optimizer__learning_rate=0.1,
        eval_batch_size=96,
    )
    results = loop.train_and_evaluate(config, str(workdir))
    return workdir, results


def test_loss_falls_and_test_error_beats_chance(trained):
    workdir, results = trained
    train = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(25, 301, 25))
    assert np.mean([r["loss"] for r in train[-3:]]) < 0.8 * train[0]["loss"]
    evals = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"]
    assert [r["step"] for r in evals] == [150, 300] and all(r["count"] == 500 for r in evals)
    # Chance is 90% error; 500 images put a binomial std of ~1.3% on the estimate.
    assert results["final_error"] < 0.7
    assert results["final_error"] == evals[-1]["error"]


def test_workdir_holds_what_a_run_needs_to_be_judged(trained):
    workdir, results = trained
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["final_error"] == results["final_error"] and on_disk["steps"] == 300
    assert on_disk["params"] == 75_290  # CIFAR ResNet-8, option A (16-32-64, one block a stage)
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "cifar_resnet8"
    with Checkpointer(workdir / "checkpoints", max_to_keep=3) as ckpt:
        assert ckpt.all_steps() == [150, 300]


def test_rerunning_a_finished_run_trains_no_further(trained, cifar_dir):
    workdir, results = trained
    config = tiny_config(
        cifar_dir,
        schedule__total_steps=300,
        schedule__boundaries=(250,),
        steps_per_dispatch=25,
        log_every_steps=25,
        eval_every_steps=150,
        checkpoint_every_steps=150,
        optimizer__learning_rate=0.1,
        eval_batch_size=96,
    )
    again = loop.train_and_evaluate(config, str(workdir))
    assert again["steps_this_run"] == 0 and again["resumed_from"] == 300
    assert again["final_error"] == results["final_error"]


def test_padded_eval_batches_count_each_test_image_once(trained, cifar_dir):
    """The recorded test loss and error equal a direct computation over the 500 images at once."""
    workdir, results = trained
    step, items = final_arrays(workdir)
    config = tiny_config(cifar_dir)
    data = cifar.load_cifar10("binary", str(cifar_dir), validation_size=0)
    mean, std = augment.normalization_stats(data.train_images[:2048], config.dataset.normalization)
    images = (data.test_images[:500].astype(np.float64) / 255.0 - mean) / std  # as augment.normalize
    model = config_lib.build_model(config, 10)
    logits = np.asarray(
        model.apply(
            {"params": items["params"], "batch_stats": items["batch_stats"]},
            images.astype(np.float32),
            train=False,
        ),
        np.float64,
    )
    labels = np.asarray(data.test_labels[:500])
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    loss = -np.mean(log_probs[np.arange(500), labels])
    wrong = int(np.sum(logits.argmax(axis=1) != labels))

    record = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"][-1]
    assert step == record["step"] == 300 and record["count"] == 500
    # Batches of 96 and one of 500 round differently; an argmax could flip only on a near tie.
    assert abs(record["error"] * 500 - wrong) <= 1
    assert abs(record["loss"] - loss) < 1e-4 * loss
    assert results["final_error"] == record["error"]


def test_the_run_records_its_input_normalisation_with_its_checkpoints(trained, cifar_dir):
    """The per-pixel mean computed from the training images at start-up is stored with the
    checkpoints, so evaluating, converting or exporting the run needs no training data."""
    workdir, _ = trained
    raw = np.fromfile(cifar_dir / "data_batch_1.bin", np.uint8, count=2048 * 3073).reshape(2048, 3073)
    pixels = raw[:, 1:].reshape(2048, 3, 32, 32).transpose(0, 2, 3, 1)  # the 2,048 images trained on
    mean = pixels.astype(np.float64).mean(axis=0) / 255.0
    stored = json.loads((workdir / "checkpoints" / "normalization.json").read_text())
    assert stored["mode"] == "pixel_mean" and stored["layout"] == "NHWC"
    assert stored["image_size"] == [32, 32] and stored["value_range"] == [0, 1] and stored["std"] == [1, 1, 1]
    # Stored as float32 (its shortest decimal): the float64 mean rounded, give or take a tie.
    np.testing.assert_array_max_ulp(np.asarray(stored["mean"], np.float32), mean.astype(np.float32), maxulp=1)
    _, record = weights.load_variables(workdir)
    assert record["normalization"] == stored


# scripts/evaluate.py defines absl flags ('config', 'workdir') that resnet_jax.main defines too,
# so it runs in a process of its own: here, after whichever test imported main.
_EVALUATE = """
import importlib.util, json, sys
sys.path.insert(0, "tests")
from _configs import tiny_config
spec = importlib.util.spec_from_file_location("evaluate_script", "scripts/evaluate.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
data_dir, workdir = sys.argv[1], sys.argv[2]
config = tiny_config(data_dir, eval_batch_size=96)  # the run's evaluation: 500 images, batches of 96
try:
    print(json.dumps({"report": script.evaluate(config, workdir)}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def _evaluate(data_dir, workdir) -> tuple[dict, str]:
    """(what evaluate() returned or raised, as JSON; the process's stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", _EVALUATE, str(data_dir), str(workdir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_evaluate_script_needs_only_the_test_file_with_the_stored_normalisation(trained, cifar_dir, tmp_path):
    """scripts/evaluate.py on the run's workdir, with a data dir holding only the test file,
    scores the run's own final test error and loss; without the stored record it must compute
    the mean from the training images, and says in one line which file is missing."""
    workdir, results = trained
    test_only = tmp_path / "cifar"
    test_only.mkdir()
    for name in ("test_batch.bin", "batches.meta.txt"):
        shutil.copy(cifar_dir / name, test_only / name)
    out, _ = _evaluate(test_only, workdir)
    report = out["report"]
    record = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"][-1]
    assert report["count"] == record["count"] == 500
    assert report["top1_error"] == record["error"] == results["final_error"]
    assert report["loss"] == record["loss"]

    old_run = tmp_path / "old_run"
    shutil.copytree(workdir, old_run)
    (old_run / "checkpoints" / "normalization.json").unlink()
    out, stderr = _evaluate(test_only, old_run)
    assert out.get("error") == "DataError", out
    message = out["message"]
    assert "\n" not in message and "normalization.json" in message
    assert str(test_only / "data_batch_1.bin") in message
    assert "records no input normalisation" in stderr


def test_resume_after_a_crash_ends_bit_identical(cifar_dir, tmp_path, monkeypatch):
    config = tiny_config(cifar_dir)
    loop.train_and_evaluate(config, str(tmp_path / "straight"))

    calls = {"n": 0}
    original = feeding.TrainChunk.__call__

    def crash_on_third_chunk(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash after the checkpoint at step 8")
        return original(self, *args)

    monkeypatch.setattr(feeding.TrainChunk, "__call__", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(feeding.TrainChunk, "__call__", original)
    results = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert results["resumed_from"] == 8 and results["steps"] == 16

    step_a, a = final_arrays(tmp_path / "straight")
    step_b, b = final_arrays(tmp_path / "resumed")
    assert step_a == step_b == 16
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # The resumed run's metrics continue the first run's without duplicates.
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [4, 8, 12, 16]


def test_train_records_after_a_resume_between_two_records_equal_the_uninterrupted_ones(
    cifar_dir, tmp_path, monkeypatch
):
    """A record every 8 steps, checkpoints every 4, a crash after the checkpoint at step 4: the
    record at step 8 of the resumed run averages steps 1-8 (the steps before the crash come
    back from the checkpoint), exactly as the uninterrupted run's does."""
    config = tiny_config(cifar_dir, log_every_steps=8, checkpoint_every_steps=4, eval_every_steps=16)
    loop.train_and_evaluate(config, str(tmp_path / "straight"))
    original = feeding.TrainChunk.__call__
    calls = {"n": 0}

    def crash_on_second_chunk(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash after the checkpoint at step 4")
        return original(self, *args)

    monkeypatch.setattr(feeding.TrainChunk, "__call__", crash_on_second_chunk)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(feeding.TrainChunk, "__call__", original)
    assert loop.train_and_evaluate(config, str(tmp_path / "resumed"))["resumed_from"] == 4

    def train_records(workdir):
        return [
            {k: v for k, v in r.items() if k not in ("images_per_sec", "time")}
            for r in read_metrics(workdir / "metrics.jsonl")
            if r["split"] == "train"
        ]

    straight, resumed = train_records(tmp_path / "straight"), train_records(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [8, 16]
    assert resumed == straight


def test_bad_config_is_refused_before_anything_runs(cifar_dir, tmp_path):
    config = tiny_config(cifar_dir, schedule__boundaries=(12, 4))
    with pytest.raises(ConfigError, match="schedule.boundaries"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_init_from_without_a_weight_loader_is_refused_before_anything_runs(cifar_dir, tmp_path):
    """The trainer reads no weight files itself: the command line hands it the loader."""
    with pytest.raises(ConfigError, match="init_from.*no weight loader.*load_for_init"):
        loop.train_and_evaluate(
            tiny_config(cifar_dir, init_from=str(tmp_path / "weights")), str(tmp_path / "w")
        )
    assert not (tmp_path / "w").exists()


def test_fused_scan_equals_step_by_step_dispatch(cifar_dir):
    """The lax.scan path (GPU/TPU) computes what the one-step-per-dispatch path (CPU) does."""
    from resnet_jax import models, parallel
    from resnet_jax.data import batching, cifar
    from resnet_jax.train import config as config_lib
    from resnet_jax.train import steps
    from resnet_jax.train.state import create_train_state

    config = tiny_config(cifar_dir, batch_size=8, reference_batch_size=8)
    derived = config_lib.validate(config)
    mesh = parallel.make_mesh()
    data = feeding.put_on_devices(
        cifar.load_cifar10("binary", cifar_dir), mesh, "pixel_mean", train_subset=256, eval_subset=8
    )
    model = models.build_model("cifar_resnet8")
    tx, _ = loop.build_optimizer(config, derived)
    idx = parallel.host_to_global(batching.train_indices(0, 0, 3, 8, 256), parallel.batch_sharded(mesh, 1))
    results = []
    for fuse in (True, False):
        state = create_train_state(model, tx, jax.random.key(0), (32, 32, 3), mesh)
        chunk = feeding.TrainChunk(steps.train_step, mesh, seed=0, pad=4, flip=True, fuse=fuse)
        state, metrics = chunk(state, data, idx)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p_scan, m_scan), (p_loop, m_loop) = results
    assert m_scan["loss"].shape == m_loop["loss"].shape == (3,)
    np.testing.assert_allclose(m_scan["loss"], m_loop["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p_scan, p_loop)


_NO_TF_SCRIPT = """
import json, sys
sys.modules["tensorflow"] = None  # `import tensorflow` now raises ImportError, as on the GPU machine
sys.modules["tensorflow_datasets"] = None
sys.path.insert(0, {tests!r})
from _configs import tiny_config
from _workdirs import final_arrays
from resnet_jax.train import loop
config = tiny_config({data!r}, dataset__source="auto", tensorboard=True, schedule__total_steps=4,
                     schedule__boundaries=(2,))
results = loop.train_and_evaluate(config, {workdir!r})
tf = "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None
print(json.dumps({{"steps": results["steps"], "tf": tf}}))
"""


def test_trains_without_tensorflow(cifar_dir, tmp_path):
    """The GPU machine has neither TensorFlow nor tfds: CIFAR training must not need them."""
    import subprocess
    import sys
    from pathlib import Path

    script = _NO_TF_SCRIPT.format(
        tests=str(Path(__file__).parent), data=str(cifar_dir), workdir=str(tmp_path / "w")
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"steps": 4, "tf": False}
    assert (tmp_path / "w" / "results.json").exists() and not (tmp_path / "w" / "tensorboard").exists()
