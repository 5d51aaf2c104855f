#!/usr/bin/env bash
# The GPU checks of issue 3 in one device run (see ../shared/gpu/README.md for staging):
#   bash ../shared/gpu/stage.sh, then the three staging runs, the third running
#   `source .gpu/tools/device-env.sh && bash scripts/gpu_session.sh`
# Writes JSON lines and the run's results under $OUT:
#   bench.jsonl  resnet_jax vs the plain per-step jit loop (same process), ResNet-20/56
#   peers.jsonl  the Flax-example-design and torch peers (peers.py flax_cifar), same machine, same run
#   r20/         the paper's full ResNet-20 schedule (64k steps), bf16: results.json + metrics.jsonl
set -uo pipefail
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
for spec in "cifar_resnet20 128" "cifar_resnet20 1024" "cifar_resnet56 128"; do
  set -- $spec
  timeout 120 python3 scripts/benchmark.py --model "$1" --batch "$2" --dtype bfloat16 --steps-per-dispatch 200 \
    >> "$out/bench.jsonl" 2>> "$out/stderr.txt"
done
timeout 150 python3 .gpu/tools/peers.py flax_cifar >> "$out/peers.jsonl" 2>> "$out/stderr.txt"
start=$(date +%s)
timeout 240 python3 -m resnet_jax.main --config configs/cifar10.py:resnet20 --workdir /tmp/r20 \
  --config.model.dtype=bfloat16 --config.tensorboard=False --config.steps_per_dispatch=500 \
  --config.log_every_steps=2000 --config.eval_every_steps=16000 --config.checkpoint_every_steps=16000 \
  > "$out/r20.log" 2>&1
echo "{\"r20_command_wall_s\": $(( $(date +%s) - start ))}" >> "$out/bench.jsonl"
mkdir -p "$out/r20" && cp /tmp/r20/results.json /tmp/r20/metrics.jsonl "$out/r20/" 2>/dev/null
tail -c 3000 "$out/r20.log"
cat "$out/bench.jsonl" "$out/peers.jsonl"
