"""`python -m resnet_jax.experiments seeds`: one config under several seeds, resumable, and its
table of best (mean ± std) of the final test error.

A tiny sweep (ResNet-8, 8 steps, 3 seeds) is killed in the middle of the second seed, after
its step-4 checkpoint, and rerun: the rerun trains only the two unfinished seeds and resumes
the killed one from its checkpoint. The table's figures are checked against numpy over the
three results.json files; the paper's column against Table 6 on workdirs written by hand.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from _configs import ROOT

from resnet_jax import experiments
from resnet_jax.analysis import seeds
from resnet_jax.train import loop

CIFAR_CONFIG = str(ROOT / "configs" / "cifar10.py")


def _argv(root, cifar_dir, steps=8):
    return [
        "seeds",
        "--config",
        f"{CIFAR_CONFIG}:resnet8",
        "--seeds",
        "3",
        "--steps",
        str(steps),
        "--batch",
        "32",
        "--train-subset",
        "256",
        "--eval-subset",
        "100",
        "--eval-every",
        "4",
        "--log-every",
        "4",
        "--data-dir",
        str(cifar_dir),
        "--workdir",
        str(root / "runs"),
        "--out",
        str(root / "out"),
        "--config.optimizer.momentum=0.85",  # an override passes through to every seed
        "--no-record-command",
    ]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cifar_dir):
    """The sweep killed after seed 1's step-4 checkpoint (seed 0 done, seed 2 not started), rerun."""
    root = tmp_path_factory.mktemp("seeds")
    argv = _argv(root, cifar_dir)
    real_train, real_checkpoint = loop.train_and_evaluate, loop._Run.maybe_checkpoint
    calls = []

    def recording(config, workdir):
        calls.append(workdir.rsplit("/", 1)[-1])
        return real_train(config, workdir)

    def killed_in_seed1(run, force=False):
        real_checkpoint(run, force)
        if run.workdir.name == "seed1" and run.step == 4:
            raise KeyboardInterrupt  # as a kill would land, with the step-4 checkpoint on disk

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train_and_evaluate", recording)
        mp.setattr(loop._Run, "maybe_checkpoint", killed_in_seed1)
        with pytest.raises(KeyboardInterrupt):
            experiments.main(argv)
        first = list(calls)
        runs = root / "runs"
        state_after_kill = {
            name: (runs / name / "results.json").exists() for name in ("seed0", "seed1", "seed2")
        }
        seed0_results = (runs / "seed0" / "results.json").read_bytes()
        calls.clear()
        mp.setattr(loop._Run, "maybe_checkpoint", real_checkpoint)
        rc = experiments.main(argv)
        second = list(calls)
        calls.clear()
        rc_again = experiments.main(argv)  # everything done: nothing trains, the table is rewritten
    return {
        "root": root,
        "argv": argv,
        "first": first,
        "second": second,
        "third": list(calls),
        "rc": (rc, rc_again),
        "state_after_kill": state_after_kill,
        "seed0_results": seed0_results,
    }


def _results(root):
    return [json.loads((root / "runs" / f"seed{k}" / "results.json").read_text()) for k in range(3)]


def test_killed_sweep_reruns_only_what_is_missing(sweep):
    assert sweep["first"] == ["seed0", "seed1"]
    assert sweep["state_after_kill"] == {"seed0": True, "seed1": False, "seed2": False}
    assert sweep["second"] == ["seed1", "seed2"]  # seed 0 not trained again
    assert sweep["third"] == []
    assert sweep["rc"] == (0, 0)
    runs = sweep["root"] / "runs"
    assert (runs / "seed0" / "results.json").read_bytes() == sweep["seed0_results"]
    results = _results(sweep["root"])
    assert [r["resumed_from"] for r in results] == [0, 4, 0]  # seed 1 resumed, not restarted
    assert all(r["steps"] == 8 for r in results)
    configs = [json.loads((runs / f"seed{k}" / "config.json").read_text()) for k in range(3)]
    assert [c["seed"] for c in configs] == [0, 1, 2]
    assert all(c["optimizer"]["momentum"] == 0.85 for c in configs)
    # The seed really changes the run (initialisation and data order).
    assert len({r["final_error"] for r in results}) > 1 or len({r["best_error"] for r in results}) > 1


def test_table_equals_what_the_results_files_give(sweep):
    out = sweep["root"] / "out"
    results = _results(sweep["root"])
    final = np.array([r["final_error"] for r in results])
    best, mean, std = final.min(), final.mean(), final.std(ddof=1)
    data = json.loads((out / "seeds.json").read_text())
    s = data["summary"]
    assert s["n"] == 3
    np.testing.assert_allclose([s["best"], s["mean"], s["std"]], [best, mean, std], rtol=1e-12)
    lowest = np.array([r["best_error"] for r in results])  # the test-set-selected contrast
    np.testing.assert_allclose(data["summary_if_selected_on_test"]["mean"], lowest.mean(), rtol=1e-12)
    md = (out / "seeds.md").read_text()
    here = f"{100 * best:.2f} ({100 * mean:.2f} ± {100 * std:.2f})"
    assert f"| cifar_resnet8 | 3 of 3 | 8 | {here} | not reported |" in md, md
    for k, r in enumerate(results):
        assert f"| {k} | {100 * r['final_error']:.2f} | {100 * r['best_error']:.2f} | 8 |" in md
        run = data["runs"][f"seed{k}"]
        assert run["final_error"] == r["final_error"]
        assert [step for step, _ in run["test"]] == [4, 8]
        assert run["test"][-1][1] == r["final_error"]  # the curve ends at the reported figure
    assert "first 100 test images" in md
    assert (out / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_seed_of_another_config_is_refused(sweep, cifar_dir, monkeypatch, capsys):
    """Skipping a finished seed of another config would put another experiment in the table."""
    calls = []
    monkeypatch.setattr(loop, "train_and_evaluate", lambda config, workdir: calls.append(workdir))
    assert experiments.main(_argv(sweep["root"], cifar_dir, steps=12)) == 2
    err = capsys.readouterr().err
    assert "seed0 holds a finished run of a different config" in err and "schedule.total_steps: 8" in err, err
    assert calls == []


def _write_fake_seed(workdir, seed, final_error, steps=64_000):
    """A finished CIFAR-10 ResNet-110 workdir as the trainer leaves it, with made-up numbers."""
    config = experiments.load_config_file(CIFAR_CONFIG, "resnet110")
    config.seed = seed
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    records = [
        {"step": 32_000, "split": "test", "error": final_error - 0.002},
        {"step": steps, "split": "test", "error": final_error},
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = {"final_error": final_error, "best_error": final_error - 0.002, "steps": steps}
    (workdir / "results.json").write_text(json.dumps({**results, "wall_clock_s": 1.0, "hardware": None}))


def test_resnet110_table_sits_beside_the_papers_figure(tmp_path):
    errors = [0.0655, 0.0671, 0.0648, 0.0690, 0.0662]
    for k, e in enumerate(errors):
        _write_fake_seed(tmp_path / f"seed{k}", k, e)
    argv = ["seeds", "--config", f"{CIFAR_CONFIG}:resnet110", "--seeds", "5", "--workdir", str(tmp_path)]
    assert experiments.main([*argv, "--plot-only", "--no-record-command"]) == 0
    md = (tmp_path / "seeds.md").read_text()
    e = 100 * np.array(errors)
    here = f"{e.min():.2f} ({e.mean():.2f} ± {e.std(ddof=1):.2f})"
    assert f"| cifar_resnet110 | 5 of 5 | 64000 | {here} | 6.43 (6.61 ± 0.16) |" in md, md
    assert "not comparable" not in md  # the paper's schedule: the columns compare
    assert seeds.paper_figure("cifar_resnet20", "cifar10")["best"] == 8.75
    assert seeds.paper_figure("cifar_resnet110", "cifar100") is None


def test_unfinished_seeds_stay_out_of_the_statistics(tmp_path):
    _write_fake_seed(tmp_path / "seed0", 0, 0.0700)
    _write_fake_seed(tmp_path / "seed1", 1, 0.0660)
    _write_fake_seed(tmp_path / "seed2", 2, 0.0500)
    (tmp_path / "seed2" / "results.json").unlink()  # killed: metrics but no results
    argv = ["seeds", "--config", f"{CIFAR_CONFIG}:resnet110", "--seeds", "4", "--workdir", str(tmp_path)]
    assert experiments.main([*argv, "--plot-only", "--no-record-command"]) == 0
    md = (tmp_path / "seeds.md").read_text()
    assert "| cifar_resnet110 | 2 of 4 | 64000 | 6.60 (6.80 ± 0.28) | 6.43 (6.61 ± 0.16) |" in md, md
    assert "| 2 | unfinished | - | - |" in md and "| 3 | not started | - | - |" in md


def test_statistics_of_one_seed_has_no_spread():
    s = seeds.statistics([0.25])
    assert (s["best"], s["mean"], s["std"]) == (0.25, 0.25, None)
    assert seeds.best_mean_std(s) == "25.00 (one seed: no spread)"


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_a_bad_seed_count_is_one_line_and_status_2(tmp_path):
    """Through a real process: argparse's usage lines become the one error line."""
    argv = ["seeds", "--config", f"{CIFAR_CONFIG}:resnet8", "--workdir", str(tmp_path / "w"), "--seeds", "0"]
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_jax.experiments", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and all(w in line for w in ("--seeds", "'0'", "integer >= 1")), line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--seeds", "x"], ["--seeds", "'x'"]),
        (["--seeds", "3", "--config.seed=4"], ["--config.seed", "--first-seed"]),
        (["--seeds", "3", "--config.optimizer.momentun=0.5"], ["momentun", "did you mean 'momentum'"]),
        (["--seeds", "3", "--config.batch_size"], ["--config.batch_size", "FIELD=VALUE"]),
        (["--seeds", "3", "--steps", "2"], ["steps=2", ">= 4"]),
    ],
    ids=["not-a-number", "seed-override", "misspelt-override", "override-without-value", "too-few-steps"],
)
def test_a_mistake_is_one_line_and_status_2(args, words, tmp_path, capsys):
    argv = ["seeds", "--config", f"{CIFAR_CONFIG}:resnet8", "--workdir", str(tmp_path / "w"), *args]
    try:
        rc = experiments.main(argv)
    except SystemExit as e:  # argparse's mistakes exit from inside the parser
        rc = e.code
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and all(w in line for w in words), line
    assert not (tmp_path / "w").exists()


def test_the_recorded_cpu_sweep_is_consistent():
    """docs/figures/cpu/seeds.*: the summary is numpy's over the recorded final errors, and the
    markdown is what the code writes from the JSON."""
    figures = ROOT / "docs" / "figures" / "cpu"
    data = json.loads((figures / "seeds.json").read_text())
    final = np.array([run["final_error"] for run in data["runs"].values()])
    s = data["summary"]
    np.testing.assert_allclose(
        [s["best"], s["mean"], s["std"]], [final.min(), final.mean(), final.std(ddof=1)]
    )
    assert (figures / "seeds.md").read_text() == seeds.markdown_table(data)
    assert "/path/to/cifar-10-batches-bin" in data["command"]


def test_seeds_share_one_compiled_train_step():
    """The seed reaches the compiled step as an argument: two seeds lower to the same program,
    so a sweep compiles the train step once (the persistent cache serves the other seeds)."""
    import jax
    import optax

    from resnet_jax import models, parallel
    from resnet_jax.train import feeding, steps
    from resnet_jax.train.state import create_train_state

    mesh = parallel.make_mesh()
    model = models.build_model("cifar_resnet8")
    state = jax.eval_shape(
        lambda: create_train_state(model, optax.sgd(0.1), jax.random.key(0), (32, 32, 3), mesh)
    )
    split = feeding.DeviceSplit(
        jax.ShapeDtypeStruct((64, 32, 32, 3), np.uint8), jax.ShapeDtypeStruct((64,), np.int32)
    )
    image = jax.ShapeDtypeStruct((32, 32, 3), np.float32)
    data = feeding.DeviceData(train=split, test=split, mean=image, std=image)
    idx = jax.ShapeDtypeStruct((8,), np.int32)
    texts = []
    for seed in (0, 1):
        chunk = feeding.TrainChunk(steps.train_step, mesh, seed=seed, pad=4, flip=True, fuse=False)
        texts.append(chunk._step.lower(state, data, idx, chunk._aug_root).as_text())
    assert texts[0] == texts[1]
