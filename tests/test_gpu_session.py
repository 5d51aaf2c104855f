"""scripts/gpu_session.sh, the GPU issue's one-run script, still runs end to end (SMOKE=1, on CPU).

The device runs are rare and short; a script broken by a config or CLI change would waste one.
Here every step runs with tiny settings: the benchmarks print their JSON, each training
command writes results.json, and the peers are skipped when not staged (they are shared/'s).
"""

import json
import os
import subprocess
import sys

from _configs import ROOT


def test_gpu_session_script_runs_every_step(tmp_path, cifar_dir):
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"),
               PEERS=str(tmp_path / "no_peers.py"), PYTHON=sys.executable, CIFAR10_DIR=str(cifar_dir),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    benches = [r for r in lines if r.get("bench") == "resnet_jax"]
    assert [(r["model"], r["batch"]) for r in benches] == [("cifar_resnet8", 8), ("resnet18", 2)], \
        (out / "stderr.txt").read_text()[-3000:]
    trains = {r["train"]: r for r in lines if "train" in r}
    assert set(trains) == {"resnet8"}
    for net, record in trains.items():
        assert record["rc"] == 0, (out / f"{net}.log").read_text()[-3000:]
        results = json.loads((out / net / "results.json").read_text())
        assert results["steps"] == 4 and results["model"] == f"cifar_{net}" and 0.0 <= results["final_error"] <= 1.0
    assert not (out / "peers.jsonl").exists()  # not staged here: skipped, not failed
