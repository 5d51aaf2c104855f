"""The exponential moving average of the weights (config `ema.decay`, resnet_jax/train/ema.py):
the closed form of the decay on recorded weights, no host transfer in the compiled step, exact
resume, and the averaged weights picked by evaluation and export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cli import cli_command
from _configs import ROOT, tiny_config
from _workdirs import final_arrays

from resnet_jax import convert, models, parallel
from resnet_jax.interop import layout, weights
from resnet_jax.interop.layout import ConversionError
from resnet_jax.train import ema as ema_lib
from resnet_jax.train import loop, steps
from resnet_jax.train.checkpoint import Checkpointer
from resnet_jax.train.config import ConfigError
from resnet_jax.train.metrics import read_metrics
from resnet_jax.train.state import create_train_state

DECAY = 0.9  # small, so that the warm-up (1 + t) / (10 + t) < 0.9 holds for every step here
NUM_STEPS = 5
SHAPE = (8, 8, 3)

# --- The update inside the compiled step ----------------------------------------------------------


def _tiny_step(settings):
    """(initial state, batches, the train step lowered with a donated state) of a tiny net."""
    model = models.build_model(
        "cifar_resnet8", stage_sizes=(1,), stage_widths=(8,)
    )  # one block: compiles fast
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(model, tx, jax.random.key(0), SHAPE, parallel.make_mesh(), settings)
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": jnp.asarray(rng.standard_normal((4, *SHAPE), np.float32)),
            "label": jnp.asarray(rng.integers(0, 10, 4), jnp.int32),
        }
        for _ in range(NUM_STEPS)
    ]
    lowered = jax.jit(steps.train_step, donate_argnums=(0,)).lower(state, batches[0])
    return state, batches, lowered


def _as_float64(tree):
    return jax.tree.map(lambda x: np.array(x, np.float64), tree)  # a copy: the next step donates


@pytest.fixture(scope="module")
def stepped():
    """The step with an EMA (decay 0.9, warm-up) compiled and run NUM_STEPS times: the weights
    {'params', 'batch_stats'} before and after each step, the average after each; the lowered
    text of the step with and without the EMA, and the compiled text with it."""
    state, batches, lowered = _tiny_step(ema_lib.EmaSettings(DECAY, warmup=True))
    compiled = lowered.compile()
    weights_seen, averages = [_as_float64(state.variables)], []
    for batch in batches:
        state, _ = compiled(state, batch)
        weights_seen.append(_as_float64(state.variables))
        averages.append(_as_float64(state.ema))
    return {
        "weights": weights_seen,
        "averages": averages,
        "lowered": lowered.as_text(),
        "lowered_off": _tiny_step(None)[2].as_text(),
        "compiled": compiled.as_text(),
    }


def _closed_form(decays: list[float], w: list[np.ndarray]) -> np.ndarray:
    """ema_k = (prod_j d_j) w_0 + sum_i (1 - d_i) (prod_{j > i} d_j) w_{i+1}, the recursion
    ema <- d_t ema + (1 - d_t) w_{t+1} (ema_0 = w_0) written out."""
    k = len(decays)
    total = np.prod(decays) * w[0]
    for i in range(k):
        total = total + (1 - decays[i]) * np.prod(decays[i + 1 :]) * w[i + 1]
    return total


def test_decay_schedule_with_and_without_warm_up():
    t = np.arange(200)
    got = np.asarray(jax.vmap(lambda s: ema_lib.decay_at(ema_lib.EmaSettings(0.99, warmup=True), s))(t))
    np.testing.assert_allclose(got, np.minimum(0.99, (1 + t) / (10 + t)), rtol=1e-6)
    assert float(ema_lib.decay_at(ema_lib.EmaSettings(0.99), 7)) == np.float32(0.99)


def test_average_after_k_steps_equals_the_closed_form_on_the_recorded_weights(stepped):
    decays = [min(DECAY, (1 + t) / (10 + t)) for t in range(NUM_STEPS)]
    assert decays[0] == pytest.approx(0.1) and decays[-1] < DECAY  # the warm-up matters here
    for k in range(1, NUM_STEPS + 1):
        expected = jax.tree.map(
            lambda *w, k=k: _closed_form(decays[:k], list(w)), *stepped["weights"][: k + 1]
        )
        got = stepped["averages"][k - 1]
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        assert jax.tree.leaves(got["batch_stats"]), "BN statistics are averaged too"
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6), got, expected)
    # The average really lags: it is not the last weights.
    last = jax.tree.leaves(stepped["weights"][-1]["params"])
    assert (
        max(np.abs(a - w).max() for a, w in zip(jax.tree.leaves(stepped["averages"][-1]["params"]), last))
        > 1e-4
    )


# Ops that move data between host and device, in HLO text (`send(`) or StableHLO (`stablehlo.send`),
# and custom calls into the host (Python callbacks, host offloading).
_HOST_OPS = re.compile(
    r"(?<![\w%.-])(?:stablehlo\.)?(infeed|outfeed|send-done|recv-done|send|recv)(?=[\s(\"])"
)
_TARGETS = re.compile(
    r'custom_call_target="([^"]+)"|stablehlo\.custom_call @([\w.]+)|call_target_name = "([^"]+)"'
)


def _host_transfers(text: str) -> list[str]:
    calls = ["".join(m) for m in _TARGETS.findall(text)]
    return _HOST_OPS.findall(text) + [c for c in calls if "callback" in c or "host" in c.lower()]


def test_step_with_ema_has_no_extra_host_transfer(stepped):
    # The detector sees a host callback, lowered and compiled, when there is one.
    with_callback = jax.jit(lambda x: (jax.debug.callback(lambda v: None, x), x * 2)[1]).lower(jnp.ones(3))
    assert _host_transfers(with_callback.as_text()) and _host_transfers(with_callback.compile().as_text())
    assert stepped["lowered"] != stepped["lowered_off"]  # the average is in the step
    assert _host_transfers(stepped["lowered"]) == _host_transfers(stepped["lowered_off"]) == []
    assert _host_transfers(stepped["compiled"]) == []


# --- A training run: metrics, results, exact resume, evaluation, export -------------------------


@pytest.fixture(scope="module")
def ema_run(cifar_dir, tmp_path_factory):
    """tiny_config with an EMA (decay 0.9 and the warm-up), trained without interruption."""
    workdir = tmp_path_factory.mktemp("ema_run")
    config = tiny_config(cifar_dir, ema__decay=DECAY, ema__warmup=True)
    results = loop.train_and_evaluate(config, str(workdir))
    return workdir, results


def test_eval_records_and_results_carry_the_average(ema_run):
    workdir, results = ema_run
    tests = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"]
    assert [r["step"] for r in tests] == [8, 16]
    for r in tests:
        assert {"ema_loss", "ema_error", "ema_error_top5"} <= set(r)
        assert 0 <= r["ema_error"] <= 1 and np.isfinite(r["ema_loss"])
    assert results["ema_final_error"] == tests[-1]["ema_error"]
    assert results["final_error"] == tests[-1]["error"]
    best = min(tests, key=lambda r: r["ema_error"])
    assert (results["ema_best_step"], results["ema_best_error"]) == (best["step"], best["ema_error"])
    assert json.loads((workdir / "results.json").read_text())["ema_final_error"] == results["ema_final_error"]
    step, items = final_arrays(workdir)
    assert step == 16 and set(items["ema"]) == {"params", "batch_stats"}


def test_run_killed_after_a_checkpoint_and_rerun_ends_bit_identical(ema_run, tmp_path, cifar_dir):
    """The workdir as a kill just after the step-8 save leaves it (later steps never written),
    then the same command again: the same final weights, optimizer state and average."""
    reference, _ = ema_run
    workdir = tmp_path / "killed"
    shutil.copytree(reference, workdir)
    for step in (12, 16):
        shutil.rmtree(workdir / "checkpoints" / str(step))
        (workdir / "checkpoints" / "manifests" / f"{step}.json").unlink(missing_ok=True)
    (workdir / "results.json").unlink()
    results = loop.train_and_evaluate(
        tiny_config(cifar_dir, ema__decay=DECAY, ema__warmup=True), str(workdir)
    )
    assert results["resumed_from"] == 8
    step_a, items_a = final_arrays(reference)
    step_b, items_b = final_arrays(workdir)
    assert step_a == step_b == 16 and "ema" in items_b
    assert jax.tree.structure(items_a) == jax.tree.structure(items_b)
    jax.tree.map(np.testing.assert_array_equal, items_a, items_b)


def test_switching_the_average_off_in_a_resumed_run_is_refused_before_the_workdir_changes(
    ema_run, tmp_path, cifar_dir
):
    reference, _ = ema_run
    workdir = tmp_path / "switched"
    shutil.copytree(reference, workdir)
    before = (workdir / "config.json").read_bytes()
    config = tiny_config(cifar_dir, allow_config_change=True, schedule__total_steps=20)
    with pytest.raises(ConfigError, match=r"ema.decay = None: the checkpoints in .* written with a moving"):
        loop.train_and_evaluate(config, str(workdir))
    assert (workdir / "config.json").read_bytes() == before


def test_warmup_without_a_decay_is_refused(cifar_dir, tmp_path):
    with pytest.raises(ConfigError, match="ema.warmup"):
        loop.train_and_evaluate(tiny_config(cifar_dir, ema__warmup=True), str(tmp_path / "w"))


def test_evaluate_script_with_ema_scores_the_averaged_weights(ema_run, cifar_dir):
    """scripts/evaluate.py --ema on the run's workdir gives the run's own EMA figures."""
    workdir, _ = ema_run
    flags = cli_command(workdir, cifar_dir, ema__decay=DECAY, ema__warmup=True)[3:]
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate.py", *flags, "--ema", "--output", str(workdir / "eval_ema.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((workdir / "eval_ema.json").read_text())
    final = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "test"][-1]
    assert got["ema"] is True and got["count"] == final["count"] == 500
    assert got["top1_error"] == final["ema_error"]
    assert got["loss"] == pytest.approx(final["ema_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def resnet18_with_ema(tmp_path_factory):
    """A checkpoint directory of a torchvision-shaped ResNet-18 holding raw weights and an
    average (raw + 1, so the two cannot be mistaken), with its pretrained.json."""
    model = layout.build_target("resnet18", 10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(0)
    raw = {
        k: jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.01 + 1, shapes[k])
        for k in ("params", "batch_stats")
    }
    average = jax.tree.map(lambda x: x + 1, raw)
    directory = tmp_path_factory.mktemp("r18_ema")
    record = {
        "format": weights.FORMAT,
        "model": layout.model_name("resnet18"),
        "model_overrides": weights._overrides(model),
        "arch": "resnet18",
        "source": {"test": "ema"},
    }
    with Checkpointer(directory / "checkpoints", max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(0, {"step": np.zeros((), np.int32), **raw, "ema": average}, metadata=record)
    (directory / weights.META_FILE).write_text(json.dumps(record))
    return directory, raw, average


def test_convert_with_ema_exports_the_averaged_weights(resnet18_with_ema, tmp_path):
    from safetensors.numpy import load_file

    directory, raw, average = resnet18_with_ema
    for flag, expected in (([], raw), (["--ema"], average)):
        out = tmp_path / f"out{len(flag)}.safetensors"
        assert convert.main([str(directory), str(out), *flag]) == 0
        want = layout.to_state_dict(expected, "resnet18")
        got = load_file(out)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # The library default (None) takes the average when there is one.
    variables, record = weights.load_variables(directory)
    assert record["weights"] == "ema"
    np.testing.assert_array_equal(variables["params"]["head"]["bias"], average["params"]["head"]["bias"])


def test_asking_for_an_average_a_checkpoint_lacks_names_it(resnet18_with_ema, tmp_path, capsys):
    directory, raw, _ = resnet18_with_ema
    plain = tmp_path / "plain"
    weights.save_converted(plain, raw, {"format": weights.FORMAT, "model": "resnet18", "arch": "resnet18"})
    variables, record = weights.load_variables(plain)  # None: the raw ones, as there is no average
    assert record["weights"] == "raw"
    with pytest.raises(ConversionError, match=f"{re.escape(str(plain))}.*no EMA weights"):
        weights.load_variables(plain, ema=True)
    assert convert.main([str(plain), str(tmp_path / "x.safetensors"), "--ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
