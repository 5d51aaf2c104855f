"""Workdir checks (config changes, writability, free space), atomic JSON, the metrics
file (kills, resume truncation, NaN), TensorBoard output and the progress display."""

from __future__ import annotations

import io
import json
import logging
import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.files import atomic_write_json, flatten_dict, unflatten_dict
from resnet_jax.train import metrics as metrics_lib
from resnet_jax.train.metrics import MetricsWriter, Progress, read_metrics
from resnet_jax.train.workdir import WorkdirError, config_differences, prepare_workdir

CONFIG = {
    "total_steps": 64000,
    "log_every_steps": 100,
    "model": {"depth": 20, "widths": (16, 32, 64)},
    "optimizer": {"lr": 0.1, "momentum": 0.9},
}
IGNORE = {"log_every_steps", "data.dir"}
FLAG = "--config.allow_config_change=True"


def prepare(workdir, config, allow=False, **kwargs):
    return prepare_workdir(
        workdir, config, allow_config_change=allow, ignore_keys=IGNORE, override_hint=FLAG, **kwargs
    )


# ---------------------------------------------------------------- workdir


def test_first_run_writes_config_and_returns_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = prepare("runs/a", CONFIG)
    assert path == tmp_path / "runs" / "a" and path.is_absolute()
    stored = json.loads((path / "config.json").read_text())
    assert stored["model"]["widths"] == [16, 32, 64] and stored["total_steps"] == 64000
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]  # no probe or temp file left


def test_changed_config_is_refused_with_the_differing_keys(tmp_path):
    prepare(tmp_path, CONFIG)
    changed = {**CONFIG, "total_steps": 32000, "optimizer": {"lr": 0.2, "momentum": 0.9}}
    with pytest.raises(WorkdirError) as info:
        prepare(tmp_path, changed)
    message = str(info.value)
    assert "total_steps: 64000 -> 32000" in message
    assert "optimizer.lr: 0.1 -> 0.2" in message
    assert "momentum" not in message and FLAG in message
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 64000


def test_ignored_keys_may_change(tmp_path):
    prepare(tmp_path, {**CONFIG, "data": {"dir": "/a"}})
    prepare(tmp_path, {**CONFIG, "log_every_steps": 7, "data": {"dir": "/b"}})
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["log_every_steps"] == 7 and stored["data"]["dir"] == "/b"
    assert not list(tmp_path.glob("config.*.json"))


def test_allowed_change_keeps_the_old_config(tmp_path, caplog):
    prepare(tmp_path, CONFIG)
    with caplog.at_level(logging.WARNING):
        prepare(tmp_path, {**CONFIG, "total_steps": 10}, allow=True)
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 10
    (backup,) = tmp_path.glob("config.*.json")
    assert json.loads(backup.read_text())["total_steps"] == 64000
    assert "total_steps: 64000 -> 10" in caplog.text


def test_added_and_removed_keys_count_as_differences():
    diffs = config_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"d": 3}}, ignore_keys=set())
    assert diffs == {"b.c": (2, "<absent>"), "b.d": ("<absent>", 3)}
    assert config_differences({"b": {"c": 2}}, {"b": {"c": 5}}, ignore_keys={"b"}) == {}


def test_a_field_added_after_the_run_started_resumes_at_its_default(tmp_path):
    """config.json written before `b.d` existed: resuming with `b.d` at its default is the same
    experiment; at another value it is a change."""
    assert (
        config_differences({"b": {"c": 2}}, {"b": {"c": 2, "d": 3}}, set(), added_defaults={"b": {"d": 3}})
        == {}
    )
    assert config_differences(
        {"b": {"c": 2}}, {"b": {"c": 2, "d": 4}}, set(), added_defaults={"b": {"d": 3}}
    ) == {"b.d": ("<absent>", 4)}
    # A key the old run had is compared as always, default or not.
    assert config_differences({"b": {"d": 4}}, {"b": {"d": 3}}, set(), added_defaults={"b": {"d": 3}}) == {
        "b.d": (4, 3)
    }
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    prepare_workdir(
        tmp_path,
        {"a": 1, "new": "x"},
        allow_config_change=False,
        ignore_keys=set(),
        added_defaults={"new": "x"},
    )
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1, "new": "x"}
    with pytest.raises(WorkdirError, match="new"):
        prepare_workdir(
            tmp_path,
            {"a": 1, "new": "y"},
            allow_config_change=False,
            ignore_keys=set(),
            added_defaults={"new": "x"},
        )


def test_flatten_dict_with_either_separator_and_its_inverse():
    tree = {"a": {"b": 1, "c": {"d": [2]}}, "e": {}, "f": None}
    assert flatten_dict(tree) == {"a.b": 1, "a.c.d": [2], "e": {}, "f": None}
    assert flatten_dict(tree, sep="/", keep_empty=False) == {"a/b": 1, "a/c/d": [2], "f": None}
    assert unflatten_dict(flatten_dict(tree, sep="/", keep_empty=False), sep="/") == {
        "a": {"b": 1, "c": {"d": [2]}},
        "f": None,
    }


def test_unwritable_workdir_is_refused(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(WorkdirError, match=r"file\.txt/sub.*--workdir"):
        prepare(a_file / "sub", CONFIG)


def test_not_enough_free_space_is_refused(tmp_path):
    with pytest.raises(WorkdirError, match=r"GiB free but the run needs"):
        prepare(tmp_path, CONFIG, min_free_bytes=1 << 60)


def test_non_primary_process_writes_nothing(tmp_path):
    path = prepare(tmp_path / "w", CONFIG, is_primary=False)
    assert path.is_dir() and not list(path.iterdir())


def test_atomic_write_json_replaces_whole_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"err": np.float32(0.25), "curve": jnp.arange(3), "bad": math.nan})
    assert json.loads(target.read_text()) == {"err": 0.25, "curve": [0, 1, 2], "bad": "NaN"}
    atomic_write_json(target, {"err": 0.5})
    assert json.loads(target.read_text()) == {"err": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(ValueError, match="object"):
        atomic_write_json(target, {"x": object()})
    assert json.loads(target.read_text()) == {"err": 0.5}  # a failed write leaves the old file


# ---------------------------------------------------------------- metrics


def test_records_are_whole_lines_with_python_values(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(1, "train", {"loss": jnp.float32(2.5), "err": np.float64(0.75), "lr": 0.1})
    writer.write(2, "eval", {"loss": jnp.asarray(math.nan), "err": math.inf, "n": np.int64(10000)})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["split"] == "train" and first["loss"] == 2.5 and first["lr"] == 0.1
    assert json.loads(lines[1])["loss"] == "NaN" and json.loads(lines[1])["err"] == "Infinity"
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(records[1]["loss"]) and records[1]["err"] == math.inf and records[1]["n"] == 10000
    assert records[1]["split"] == "eval" and isinstance(records[1]["time"], float)


def test_reserved_names_are_refused(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="reserved"):
        writer.write(1, "train", {"step": 3})


def test_partial_last_line_is_tolerated_and_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in (10, 20, 30):
        writer.write(step, "train", {"loss": 1.0 / step})
    writer.close()
    with open(path, "ab") as f:  # what a kill in the middle of write() leaves
        f.write(b'{"step": 40, "split": "tr')
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]

    writer = MetricsWriter(tmp_path, tensorboard=False)
    assert writer.truncate_after(20) == 2  # step 30 and the partial line
    writer.write(30, "train", {"loss": 0.5})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(10, 0.1), (20, 0.05), (30, 0.5)]


def test_reopening_after_a_kill_does_not_glue_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "split": "train"}\n{"step": 2, "spl')
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(2, "train", {"loss": 1.0})
    writer.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_damaged_middle_line_is_an_error_for_readers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    assert MetricsWriter(tmp_path, tensorboard=False).truncate_after(5) == 1
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_failed_write_leaves_no_partial_record(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(1, "train", {"loss": 1.0})

    def half_write(fd, data):
        return real_write(fd, data[: len(data) // 2])

    real_write = metrics_lib.os.write
    monkeypatch.setattr(metrics_lib.os, "write", half_write)
    with pytest.raises(OSError, match="short write"):
        writer.write(2, "train", {"loss": 2.0})
    monkeypatch.undo()
    writer.write(3, "train", {"loss": 3.0})
    writer.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 3]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False)
    writer.write(1, "train", {"loss": 1.0})
    assert writer.truncate_after(0) == 0
    writer.close()
    assert not list(tmp_path.iterdir())


def test_tensorboard_event_files(tmp_path):
    tf = pytest.importorskip("tensorflow")
    writer = MetricsWriter(tmp_path)
    writer.write(5, "train", {"loss": 1.25, "note": "text is skipped"})
    writer.write(5, "eval", {"err": 0.125})
    writer.close()
    (event_file,) = (tmp_path / "tensorboard" / "train").iterdir()
    values = {
        (event.step, value.tag): float(tf.make_ndarray(value.tensor))
        for event in tf.compat.v1.train.summary_iterator(str(event_file))
        for value in event.summary.value
    }
    assert values == {(5, "loss"): 1.25}
    assert (tmp_path / "tensorboard" / "eval").is_dir()


def test_without_tensorflow_only_jsonl_is_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    metrics_lib._import_tensorflow.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=metrics_lib.__name__):
            writer = MetricsWriter(tmp_path)
            writer.write(1, "train", {"loss": 1.0})
            writer.close()
    finally:
        metrics_lib._import_tensorflow.cache_clear()
    assert "TensorBoard output is off" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ---------------------------------------------------------------- progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_when_not_a_tty(monkeypatch):
    stream = io.StringIO()
    clock = iter([100.0, 101.0, 110.0, 140.0])
    monkeypatch.setattr(metrics_lib.time, "monotonic", lambda: next(clock))
    progress = Progress(total=1000, initial=100, stream=stream, log_every_s=30)
    progress.update(100, {"loss": 2.0}, images_per_sec=1000)  # printed: first update
    progress.update(110, {"loss": 1.9})  # 1 s later: quiet
    progress.update(200, {"loss": 1.5})  # 10 s later: quiet
    progress.update(400, {"loss": jnp.float32(1.25), "err": 0.5}, images_per_sec=1234.5)  # 40 s: printed
    progress.log("evaluated")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("step 100/1000 (10.0%) loss 2 img/s 1,000 eta ?")
    # 300 steps in 40 s -> 600 steps left take 80 s.
    assert lines[1] == "step 400/1000 (40.0%) loss 1.25 err 0.5 img/s 1,234 eta 01:20"
    assert lines[2] == "evaluated" and len(lines) == 3


def test_progress_bar_on_a_tty():
    stream = FakeTTY()
    progress = Progress(total=50, initial=10, stream=stream)
    progress.update(20, {"loss": 0.5}, images_per_sec=99.0)
    progress.log("hello")
    progress.close()
    text = stream.getvalue()
    assert "20/50" in text and "loss=0.5" in text and "img/s=99" in text and "hello" in text


def test_progress_disabled_prints_nothing():
    stream = FakeTTY()
    progress = Progress(total=5, enabled=False, stream=stream)
    progress.update(3, {"loss": 1.0})
    progress.log("x")
    progress.close()
    assert stream.getvalue() == ""


def _event_steps(tf, directory):
    """(step, tag, value) of every scalar in a split's event files, in file order."""
    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            out += [(event.step, v.tag, float(tf.make_ndarray(v.tensor))) for v in event.summary.value]
    return out


def test_resume_trims_tensorboard_like_metrics_jsonl(tmp_path):
    import tensorflow as tf  # installed in CI: this test must run there

    writer = MetricsWriter(tmp_path)
    for step in (5, 10, 15, 20):
        writer.write(step, "train", {"loss": float(step)})
    writer.write(10, "test", {"error": 0.5})
    writer.write(20, "test", {"error": 0.25})
    writer.close()
    # Event file names begin with the second they were made, and TensorBoard reads a folder's
    # files in name order. The killed run's files are dated an hour back (a rerun always starts
    # later), so the resumed run's new file sorts after them without waiting for the clock.
    for path in (tmp_path / "tensorboard").glob("*/events.out.tfevents.*"):
        stamp, rest = path.name.removeprefix("events.out.tfevents.").split(".", 1)
        path.rename(path.with_name(f"events.out.tfevents.{int(stamp) - 3600}.{rest}"))
    (train_file,) = (tmp_path / "tensorboard" / "train").iterdir()
    with open(train_file, "ab") as f:  # a record torn by the kill
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00partial")
    resumed = MetricsWriter(tmp_path)
    assert resumed.truncate_after(10) == 3  # metrics.jsonl: train 15, 20 and test 20
    assert _event_steps(tf, tmp_path / "tensorboard" / "train") == [(5, "loss", 5.0), (10, "loss", 10.0)]
    assert _event_steps(tf, tmp_path / "tensorboard" / "test") == [(10, "error", 0.5)]
    for step in (15, 20):
        resumed.write(step, "train", {"loss": step + 0.5})
    resumed.close()
    steps = _event_steps(tf, tmp_path / "tensorboard" / "train")
    assert steps == [(5, "loss", 5.0), (10, "loss", 10.0), (15, "loss", 15.5), (20, "loss", 20.5)]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"] == [
        5,
        10,
        15,
        20,
    ]


def test_every_process_raises_the_error_of_the_first_failed_one(tmp_path, monkeypatch):
    """Two processes simulated in one: process 0 (elsewhere) refused the config, this one
    (process 1) passed its own checks; it must raise process 0's error, not go on."""
    import jax
    from jax.experimental import multihost_utils

    from resnet_jax.train import workdir as workdir_lib

    message = "config.json was written by a run with a different config; ... é"
    theirs = message.encode("utf-8")
    calls = []

    def allgather(x):  # row 0: the other process's verdict, row 1: ours
        x = np.asarray(x)
        calls.append(x.copy())
        if len(calls) == 1:
            return np.stack([np.array([1, len(theirs)], np.int32), x])
        other = np.zeros_like(x)
        other[: len(theirs)] = np.frombuffer(theirs, np.uint8)
        return np.stack([other, x])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        workdir_lib.prepare_workdir(tmp_path / "w", {"a": 1}, allow_config_change=False, ignore_keys=set())
    assert str(error.value) == message
    assert calls[0].tolist() == [0, 0] and len(calls) == 2  # we had no error of our own
    assert not (tmp_path / "w" / "config.json").exists()  # process 1 never writes it

    # Nobody failed: one exchange of verdicts, no second one, and no error.
    calls.clear()
    monkeypatch.setattr(
        multihost_utils, "process_allgather", lambda x: calls.append(x) or np.stack([np.asarray(x)] * 2)
    )
    assert (
        workdir_lib.prepare_workdir(tmp_path / "w", {"a": 1}, allow_config_change=False, ignore_keys=set())
        == tmp_path / "w"
    )
    assert len(calls) == 1
