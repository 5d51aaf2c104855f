#!/usr/bin/env bash
# The GPU checks in as few device runs as possible, from the repository root of a machine whose
# environment has this package installed:
#   bash scripts/gpu_session.sh [speed|cifar|all]
# PYTHON names the interpreter (default python3); PEERS names an optional peer-baseline script
# run in the same session (none by default; skipped when unset or when the file is absent);
# CIFAR10_DIR names the CIFAR-10 binary files (else the download cache, see docs/cifar.md).
# `speed` (about 5 min): the train-step benchmarks and the peers of the same run;
# `cifar`: the paper's full ResNet-20 schedule, then as many of ResNet-32/44/56/110 and
# plain-20/56 as fit before $DEADLINE_S seconds (default 540).
# Writes under $OUT (default /tmp/gpu_out), one JSON object per line:
#   bench.jsonl  resnet_jax vs the plain per-step jit loop (same process): ResNet-20 b128/b1024,
#                ResNet-56 b128, ResNet-50 b256 (bf16, synthetic data), and each training
#                command's wall-clock seconds
#   peers.jsonl  the Flax-example-design and torch peers (peers.py), same machine, same run
#   <model>/     results.json + metrics.jsonl of each CIFAR run; <model>.log its console
# NETS overrides the list of CIFAR nets (e.g. NETS="resnet20 resnet110").
# SMOKE=1 runs every step with tiny settings on any machine (tests/test_gpu_session.py does, on
# CPU): tiny nets and batches, a few training steps on a subset, peers only where present.
# A failed step does not stop the script: the rest still runs, and it then exits 1, naming on
# stderr every step that failed.
set -uo pipefail
part=${1:-all}
case "$part" in speed|cifar|all) ;; *) echo "usage: $0 [speed|cifar|all]" >&2; exit 2 ;; esac
out=${OUT:-/tmp/gpu_out}
runs=${RUNS:-/tmp/gpu_runs}
peers=${PEERS:-}
python=${PYTHON:-python3}
smoke=${SMOKE:-0}
deadline=${DEADLINE_S:-540}
mkdir -p "$out" "$runs"
start=$(date +%s)

if [ "$smoke" = 1 ]; then
  bench_specs=("cifar_resnet8 8 --image-size 32")
  rn50_spec="resnet18 2 --image-size 32"
  bench_sizes="--steps-per-dispatch 2 --dispatches 1 --repeats 1"
  rn50_sizes="$bench_sizes --no-baseline"
  train_args="--config.schedule.total_steps=4 --config.schedule.boundaries=(3,) --config.dataset.train_subset=256 --config.dataset.eval_subset=200 --config.batch_size=8 --config.reference_batch_size=8 --config.eval_batch_size=100 --config.steps_per_dispatch=2 --config.log_every_steps=2 --config.eval_every_steps=4 --config.checkpoint_every_steps=4"
  cifar_nets=${NETS:-resnet8}
  dtype=float32
  # A loaded CPU compiles slowly: generous limits, so a smoke run fails on errors, not on time.
  bench_timeout=600
  rn50_timeout=600
else
  bench_specs=("cifar_resnet20 128" "cifar_resnet20 1024" "cifar_resnet56 128")
  rn50_spec="resnet50 256"
  bench_sizes="--steps-per-dispatch 200"
  rn50_sizes="--steps-per-dispatch 20"
  train_args="--config.steps_per_dispatch=500 --config.log_every_steps=2000 --config.eval_every_steps=16000 --config.checkpoint_every_steps=16000"
  cifar_nets=${NETS:-resnet20 resnet32 resnet44 resnet56 plain20 plain56 resnet110}
  dtype=bfloat16
  bench_timeout=120
  rn50_timeout=180
fi
failed=()

bench() {  # bench TIMEOUT_S "MODEL BATCH [EXTRA ARGS]" SIZES: one scripts/benchmark.py run
  local model batch extra
  read -r model batch extra <<< "$2"
  # shellcheck disable=SC2086
  timeout "$1" "$python" scripts/benchmark.py --model "$model" --batch "$batch" $extra --dtype "$dtype" $3 \
    >> "$out/bench.jsonl" 2>> "$out/stderr.txt" || failed+=("benchmark $model batch $batch (see stderr.txt)")
}

peer() {  # peer SECTION: one peers.py section, when the peers are staged here
  if [ -n "$peers" ] && [ -f "$peers" ]; then
    if ! timeout 150 "$python" "$peers" "$1" >> "$out/peers.jsonl" 2>> "$out/stderr.txt"; then
      echo "{\"peer\": \"$1\", \"failed\": true}" >> "$out/peers.jsonl"
      failed+=("peer $1 (see stderr.txt)")
    fi
  fi
}

if [ "$part" != cifar ]; then
  for spec in "${bench_specs[@]}"; do
    bench "$bench_timeout" "$spec" "$bench_sizes"
  done
  peer flax_cifar
  bench "$rn50_timeout" "$rn50_spec" "$rn50_sizes"
  peer flax_rn50
  peer torch_rn50
fi

if [ "$part" != speed ]; then
  for net in $cifar_nets; do
    elapsed=$(( $(date +%s) - start ))
    if [ "$elapsed" -ge "$deadline" ]; then
      echo "{\"skipped\": \"$net\", \"reason\": \"deadline\", \"elapsed_s\": $elapsed}" >> "$out/bench.jsonl"
      continue
    fi
    t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout $(( deadline + 60 - elapsed )) "$python" -m resnet_jax.main --config "configs/cifar10.py:$net" \
      --workdir "$runs/$net" --config.model.dtype="$dtype" --config.tensorboard=False $train_args \
      > "$out/$net.log" 2>&1
    rc=$?
    echo "{\"train\": \"$net\", \"rc\": $rc, \"command_wall_s\": $(( $(date +%s) - t0 ))}" >> "$out/bench.jsonl"
    [ "$rc" = 0 ] || failed+=("train $net (exit $rc, see $net.log)")
    mkdir -p "$out/$net" && cp "$runs/$net/results.json" "$runs/$net/metrics.jsonl" "$out/$net/" 2>/dev/null
  done
fi
if [ -f "$out/bench.jsonl" ]; then cat "$out/bench.jsonl"; fi
if [ -f "$out/peers.jsonl" ]; then cat "$out/peers.jsonl"; fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_session.sh: ${#failed[@]} step(s) failed:" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
