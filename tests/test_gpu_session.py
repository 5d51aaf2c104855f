"""scripts/gpu_session.sh, the one-run GPU script, still runs end to end (SMOKE=1, on CPU).

The device runs are rare and short; a script broken by a config or CLI change would waste one.
Two runs here take every branch with tiny settings: the benchmarks with and without their
same-process baseline, the peers (a stand-in peers script, one of whose sections fails), the
deadline that skips a training run, a training run that fails and one that succeeds. A failed
step never stops the rest, and the script then exits 1 naming each failed step.
"""

import json
import os
import subprocess
import sys

from _configs import ROOT

FAKE_PEERS = """
import json, sys
section = sys.argv[1]
if section == "flax_rn50":
    sys.exit("peer stand-in: this section fails")
print(json.dumps({"peer": section, "img_per_s": 1.0}))
"""


def run_session(tmp_path, cifar_dir, part, **env):
    env = {
        **os.environ,
        "SMOKE": "1",
        "OUT": str(tmp_path / "out"),
        "RUNS": str(tmp_path / "runs"),
        "PYTHON": sys.executable,
        "CIFAR10_DIR": str(cifar_dir),
        "JAX_PLATFORMS": "cpu",
        **env,
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_session.sh"), part],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = tmp_path / "out"
    lines = (
        [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
        if (out / "bench.jsonl").exists()
        else []
    )
    return proc, out, lines


def test_speed_part_benchmarks_with_baseline_runs_peers_and_names_the_failed_one(tmp_path, cifar_dir):
    (tmp_path / "peers.py").write_text(FAKE_PEERS)
    proc, out, lines = run_session(
        tmp_path, cifar_dir, "all", PEERS=str(tmp_path / "peers.py"), DEADLINE_S="1", NETS="resnet8"
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-2:] == [
        "gpu_session.sh: 1 step(s) failed:",
        "  peer flax_rn50 (see stderr.txt)",
    ]
    stderr_txt = (out / "stderr.txt").read_text()
    benches = [r for r in lines if r.get("bench") == "resnet_jax"]
    assert [(r["model"], r["batch"]) for r in benches] == [("cifar_resnet8", 8), ("resnet18", 2)], stderr_txt[
        -3000:
    ]
    (base,) = [r for r in lines if r.get("bench") == "baseline"]  # the CIFAR spec's baseline
    assert base["model"] == "cifar_resnet8" and "ratio_vs_baseline" not in benches[1]
    assert benches[0]["ratio_vs_baseline"] == benches[0]["img_per_s"] / base["img_per_s"]
    peers = [json.loads(line) for line in (out / "peers.jsonl").read_text().splitlines()]
    assert peers == [
        {"peer": "flax_cifar", "img_per_s": 1.0},
        {"peer": "flax_rn50", "failed": True},
        {"peer": "torch_rn50", "img_per_s": 1.0},
    ]
    # The benchmarks took more than the 1 s deadline, so the training run was skipped.
    (skip,) = [r for r in lines if "skipped" in r]
    assert skip["skipped"] == "resnet8" and skip["reason"] == "deadline" and skip["elapsed_s"] >= 1
    assert not [r for r in lines if "train" in r]


def test_cifar_part_goes_on_after_a_failed_run_and_names_it(tmp_path, cifar_dir):
    proc, out, lines = run_session(
        tmp_path, cifar_dir, "cifar", PEERS=str(tmp_path / "absent.py"), NETS="nosuchnet resnet8"
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-2:] == [
        "gpu_session.sh: 1 step(s) failed:",
        "  train nosuchnet (exit 2, see nosuchnet.log)",
    ]
    trains = {r["train"]: r for r in lines if "train" in r}
    assert list(trains) == ["nosuchnet", "resnet8"] and trains["nosuchnet"]["rc"] == 2
    assert "nosuchnet" in (out / "nosuchnet.log").read_text()
    assert trains["resnet8"]["rc"] == 0, (out / "resnet8.log").read_text()[-3000:]
    results = json.loads((out / "resnet8" / "results.json").read_text())
    assert (
        results["steps"] == 4 and results["model"] == "cifar_resnet8" and 0.0 <= results["final_error"] <= 1.0
    )
    assert not (out / "peers.jsonl").exists() and not [r for r in lines if "bench" in r]


# A PYTHON stand-in whose ResNet-18 benchmark fails; every other command runs as it would.
FAILING_BENCHMARK = """#!/bin/sh
case "$*" in
  *scripts/benchmark.py*"--model resnet18"*) echo "benchmark stand-in: this one fails" >&2; exit 1 ;;
esac
exec "{python}" "$@"
"""


def test_a_failed_benchmark_is_named_and_the_others_still_run(tmp_path, cifar_dir):
    stand_in = tmp_path / "python"
    stand_in.write_text(FAILING_BENCHMARK.format(python=sys.executable))
    stand_in.chmod(0o755)
    proc, out, lines = run_session(
        tmp_path, cifar_dir, "speed", PYTHON=str(stand_in), PEERS=str(tmp_path / "absent.py")
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-2:] == [
        "gpu_session.sh: 1 step(s) failed:",
        "  benchmark resnet18 batch 2 (see stderr.txt)",
    ]
    assert "benchmark stand-in: this one fails" in (out / "stderr.txt").read_text()
    benches = [(r["bench"], r["model"]) for r in lines if "bench" in r]
    assert benches == [("resnet_jax", "cifar_resnet8"), ("baseline", "cifar_resnet8")]


def test_an_unknown_part_is_a_usage_error(tmp_path, cifar_dir):
    proc, out, _ = run_session(tmp_path, cifar_dir, "everything")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: "), proc.stderr
    assert not out.exists()
