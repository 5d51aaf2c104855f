"""scripts/benchmark.py runs and reports what it promises (tiny sizes; no timing asserted)."""

import importlib.util
import json

import pytest

from _configs import ROOT


def test_benchmark_reports_both_measurements_as_json(capsys):
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = benchmark.main(["--model", "cifar_resnet8", "--batch", "8", "--steps-per-dispatch", "2",
                          "--dispatches", "1", "--repeats", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == json.loads(json.dumps(out))
    ours, base = lines
    assert (ours["bench"], base["bench"]) == ("resnet_jax", "baseline")
    assert ours["params"] == 75_290 and ours["image_size"] == 32 and ours["fused"] is False
    for record in lines:
        assert record["img_per_s"] > 0 and record["compile_s"] > 0 and len(record["img_per_s_all"]) == 2
    assert ours["ratio_vs_baseline"] == ours["img_per_s"] / base["img_per_s"]


def test_cpu_vs_torch_benchmark_compares_the_same_network(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_cpu_vs_torch",
                                                  ROOT / "scripts" / "benchmark_cpu_vs_torch.py")
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
    assert ratio["torch_eager_over_jax"] == pytest.approx(steps["jax"]["ms_per_step"] / steps["torch_eager"]["ms_per_step"])
