"""ImageNet through the trainer: the command line on a folder of real JPEGs, exact resume.

ResNet-18 at 64 px (scale augmentation [72, 96], the paper's transform scaled down) on the
100 shared ImageNet samples: seconds a step on 2 CPU cores instead of minutes.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from _configs import ROOT, load_config
from _imagenet import make_image_folder, samples
from _workdirs import final_arrays

from resnet_jax.train import loop, sources
from resnet_jax.train.metrics import read_metrics

OVERRIDES = {
    "dataset.name": "image_folder",
    "dataset.image_size": 64,
    "dataset.scale_range": (72, 96),
    "dataset.eval_resize": 72,
    "dataset.eval_protocol": "ten_crop",
    "batch_size": 16,
    "reference_batch_size": 16,
    "eval_batch_size": 8,
    # 100 images, 6 steps an epoch: 24 steps, the rate divided by 10 at step 18.
    "schedule.epochs": 4.0,
    "schedule.boundary_epochs": (3.0,),
    "steps_per_dispatch": 4,
    "log_every_steps": 4,
    "eval_every_steps": 24,
    "checkpoint_every_steps": 8,
    "tensorboard": False,
}


def small_config(root, **extra):
    config = load_config("resnet18", "imagenet.py")
    for dotted, value in {**OVERRIDES, "dataset.data_dir": str(root), **extra}.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), n_val=12)


@pytest.fixture(scope="module")
def cli_run(folder, tmp_path_factory):
    """The README's command line, with small overrides."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    flags = [
        f"--config.{k}={v}"
        for k, v in {**OVERRIDES, "dataset.data_dir": folder}.items()
        if not isinstance(v, tuple)
    ]
    flags += ["--config.dataset.scale_range=(72,96)", "--config.schedule.boundary_epochs=(3.0,)"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_jax.main",
            "--config",
            "configs/imagenet.py:resnet18",
            "--workdir",
            str(workdir),
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_resnet18_trains_on_a_folder_from_the_command_line(cli_run):
    workdir, _ = cli_run
    records = read_metrics(workdir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
    # From ln(1000) = 6.9 at initialisation towards the 100 labels the folder holds.
    assert np.mean([r["loss"] for r in train[-2:]]) < 0.85 * train[0]["loss"]
    (ev,) = [r for r in records if r["split"] == "validation"]
    assert ev["step"] == 24 and ev["count"] == 12  # every val image once, last batch padded
    assert 0.0 <= ev["error_top5"] <= ev["error"] <= 1.0
    results = json.loads((workdir / "results.json").read_text())
    assert results["dataset"] == "image_folder" and results["steps"] == 24
    assert results["params"] == 11_689_512  # ResNet-18 with its 1000-way head
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "16",
        "24",
        "8",
    ]


def test_folder_dataset_is_described_before_anything_compiles(folder):
    info = sources.describe(small_config(folder))
    assert (info.num_train, info.num_eval, info.num_classes, info.image_shape) == (100, 12, 1000, (64, 64, 3))


def test_resume_after_a_crash_sees_the_same_examples(folder, tmp_path, monkeypatch, cli_run):
    straight, _ = cli_run
    seen: list[tuple[int, list[int]]] = []
    original = sources.ImageNetSource._train_batches

    def recording(self, step):
        # Labels of each step's batch as the pipeline hands it out.
        for i, batch in enumerate(original(self, step)):
            seen.append((step + i, np.asarray(batch["label"]).tolist()))
            yield batch

    calls = {"n": 0}
    train = sources.ImageNetSource.train

    def crash_on_fourth_chunk(self, state, step, n):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash after the checkpoint at step 8")
        return train(self, state, step, n)

    monkeypatch.setattr(sources.ImageNetSource, "_train_batches", recording)
    monkeypatch.setattr(sources.ImageNetSource, "train", crash_on_fourth_chunk)
    config = small_config(folder)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(sources.ImageNetSource, "train", train)
    results = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert results["resumed_from"] == 8 and results["steps"] == 24

    # The resumed run trained on exactly what the uninterrupted one did from step 8 on.
    step_a, a = final_arrays(straight)
    step_b, b = final_arrays(tmp_path / "resumed")
    assert step_a == step_b == 24
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    by_step: dict[int, list[list[int]]] = {}
    for step, labels in seen:
        by_step.setdefault(step, []).append(labels)
    # Steps 8..11 were read before the crash and again after it: the same labels both times.
    replayed = {s: v for s, v in by_step.items() if 8 <= s < 12}
    assert sorted(replayed) == [8, 9, 10, 11]
    assert all(len(v) == 2 and v[0] == v[1] for v in replayed.values())
    records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [4, 8, 12, 16, 20, 24]
    losses = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl") if r["split"] == "train"}
    assert [losses[r["step"]] for r in records if r["split"] == "train"] == [
        r["loss"] for r in records if r["split"] == "train"
    ]


def test_evaluate_script_reproduces_the_runs_evaluation_and_runs_other_protocols(cli_run, folder, tmp_path):
    workdir, _ = cli_run
    (ev,) = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "validation"]
    base = [
        sys.executable,
        "scripts/evaluate.py",
        "--config",
        "configs/imagenet.py:resnet18",
        "--workdir",
        str(workdir),
        "--config.dataset.name=image_folder",
        f"--config.dataset.data_dir={folder}",
        "--config.dataset.image_size=64",
        "--config.dataset.scale_range=(72,96)",
        "--config.dataset.eval_resize=72",
        "--config.eval_batch_size=8",
    ]
    out = {}
    for protocol in ("ten_crop", "center"):
        proc = subprocess.run(
            base + [f"--protocol={protocol}"], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[protocol] = json.loads((workdir / f"eval_{protocol}.json").read_text())
        assert json.loads(proc.stdout) == out[protocol]
    assert out["ten_crop"]["count"] == out["center"]["count"] == 12
    # Same weights, same protocol, same images: the trainer's own evaluation, to round-off.
    assert out["ten_crop"]["top1_error"] == ev["error"]
    assert out["ten_crop"]["loss"] == pytest.approx(ev["loss"], rel=1e-5)
    bad = subprocess.run(
        base[:4] + ["--checkpoint", str(tmp_path / "nothing")] + base[6:],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "nothing" in bad.stderr


def test_two_processes_read_halves_that_make_the_one_process_batch(folder, tmp_path):
    """Two gloo processes, each reading its own half of every global batch, make the same
    global batches as one process reading everything; the evaluation covers each image once."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT / "tests"),
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "_imagenet_worker.py"),
                json.dumps(
                    {
                        "port": port,
                        "process_id": i,
                        "num_processes": 2,
                        "folder": str(folder),
                        "out": str(tmp_path / "two.npz"),
                    }
                ),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    two = np.load(tmp_path / "two.npz")

    from resnet_jax.data import imagenet

    config = small_config(folder)
    spec = sources.imagenet_spec(config.dataset)
    d = config.dataset
    one = imagenet.train_batches(
        spec,
        seed=config.seed,
        start_step=3,
        global_batch=config.batch_size,
        process_index=0,
        process_count=1,
        image_size=d.image_size,
        transform=d.train_transform,
        scale_range=tuple(d.scale_range),
        pca_std=d.pca_std,
    )
    for i in range(2):
        batch = next(one)
        np.testing.assert_array_equal(two[f"label{i}"], batch["label"])
        np.testing.assert_allclose(two[f"image{i}"], batch["image"], atol=1e-6)
    labels = two["eval_label"][two["eval_mask"]]
    assert labels.size == 12
    expected = [int(r["label_index"]) for r in samples()[-12:]]
    assert sorted(labels.tolist()) == sorted(expected)
