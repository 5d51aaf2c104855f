"""scripts/benchmark.py runs and reports what it promises (tiny sizes; no timing asserted)."""

import importlib.util
import json

import pytest
from _configs import ROOT
from _imagenet import SAMPLES_DIR


def test_benchmark_reports_both_measurements_as_json(capsys):
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = benchmark.main(
        [
            "--model",
            "cifar_resnet8",
            "--batch",
            "8",
            "--steps-per-dispatch",
            "2",
            "--dispatches",
            "1",
            "--repeats",
            "2",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == json.loads(json.dumps(out))
    ours, base = lines
    assert (ours["bench"], base["bench"]) == ("resnet_jax", "baseline")
    assert ours["params"] == 75_290 and ours["image_size"] == 32 and ours["fused"] is False
    for record in lines:
        assert record["img_per_s"] > 0 and record["compile_s"] > 0 and len(record["img_per_s_all"]) == 2
    assert ours["ratio_vs_baseline"] == ours["img_per_s"] / base["img_per_s"]


def test_cpu_vs_torch_benchmark_compares_the_same_network(capsys):
    spec = importlib.util.spec_from_file_location(
        "benchmark_cpu_vs_torch", ROOT / "scripts" / "benchmark_cpu_vs_torch.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--batch", "4", "--depth", "8", "--steps", "1", "--repeats", "1", "--no-convs"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == json.loads(json.dumps(out))
    steps = {r["impl"]: r for r in lines if r["bench"] == "step"}
    # torch is installed in CI
    assert set(steps) == {"jax", "jax_xla_conv", "torch_eager", "torch_channels_last"}
    assert {r["params"] for r in steps.values()} == {75_290}  # the script asserts torch's count equals ours
    (ratio,) = [r for r in lines if r["bench"] == "ratio"]
    assert ratio["torch_eager_over_jax"] == pytest.approx(
        steps["jax"]["ms_per_step"] / steps["torch_eager"]["ms_per_step"]
    )


def test_input_benchmark_times_ours_and_the_peer_on_the_same_files(capsys):
    """scripts/benchmark_input.py (issue 8's speed goal) runs: all five pipelines, ratios of medians."""
    spec = importlib.util.spec_from_file_location("benchmark_input", ROOT / "scripts" / "benchmark_input.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    peer = ROOT.parent / "shared" / "peers" / "flax_input_pipeline.py"  # the development folder's
    out = bench.main(
        [
            "--images",
            str(SAMPLES_DIR),
            "--peer",
            str(peer),
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--batches",
            "2",
            "--repeat",
            "1",
            "--batch",
            "4",
        ]
    )
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == json.loads(json.dumps(out))
    names = {"inception", "paper", "eval_center", "peer_train", "peer_eval"}
    assert set(out["images_per_s"]) == set(out["images_per_cpu_s"]) == names
    assert all(v > 0 for v in out["images_per_s"].values()) and out["files"] == 100
    rates = out["images_per_s"]
    assert out["ratio_inception_vs_peer_train"] == pytest.approx(
        rates["inception"] / rates["peer_train"], rel=1e-2
    )
    assert out["ratio_eval_center_vs_peer_eval"] == pytest.approx(
        rates["eval_center"] / rates["peer_eval"], rel=1e-2
    )
