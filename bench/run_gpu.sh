#!/usr/bin/env bash
# One lent-GPU session in a single call: device correctness tests, then the benchmarks.
# Every step has its own time limit; logs are gathered into $OUT/log.txt and benchmark
# JSONs into $OUT, so a step that runs out of time costs only its own results.
# Usage: OUT=/some/dir bash bench/run_gpu.sh [steps...]
#   steps (default all but sanity and profile): candidates (every mfn_stack autotune
#   candidate vs the reference, ~3 min), tests (the device test module, first configs, and
#   the trainer's sync-free steps),
#   sanity (two of those), mfn, compile, project, epoch (bench/epoch_speed.py), accuracy
#   (bench/accuracy.py), profile (bench/profile_mfn.py, 3D), host (a training step's host
#   cost with the Triton launches no-op'd), paper (the paper preset's epoch, ~7 min: a call
#   of its own). A call may run 600 s at most:
#   the step limits below add up to ~390 s for "candidates tests mfn" and ~400 s for
#   "project accuracy epoch", so split a session's work like that.
# The device has no mrcfile/starfile/gemmi and no network: run `bash bench/gpu_wheels.sh`
# here first and name `.whl` in the call's `carry` (the `paper` step and the example need them).
# The paper preset itself, across calls: bench/paper_run.sh.
set -u
cd "$(dirname "$0")/.."
source bench/device_env.sh  # PYTHONPATH, the carried wheels, has_modules, versions
OUT=${OUT:-/tmp/fieldkern_gpu}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
steps=${*:-candidates tests mfn project accuracy epoch compile}
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; flush_logs; }
# logs gathered into one file after every step: a run cut short still returns them
flush_logs() { for f in "$LOGS"/*.log; do [ -e "$f" ] && { echo "=== $f"; grep -v "^\s*$" "$f" | tail -n 60; }; done > "$OUT/log.txt"; }
has() { [[ " $steps " == *" $1 "* ]]; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  versions; }

# 1. compile every mfn_stack autotune candidate of the benchmark networks in parallel (fills
#    Triton's disk cache; autotuning would compile them one after the other) while the
#    device tests run
stamp "warm-up + device tests"
if has candidates || has mfn || has compile || has profile; then  # steps that autotune the stacks
  for p in 2d_h256_s4 3d_h128_s3; do for prec in float32 mixed; do for i in 0 1 2 3 4 5; do
    echo "$p $prec $i"; done; done; done |
    timeout 150 xargs -P 12 -n 3 python bench/warm_kernels.py > "$LOGS/warm.log" 2>&1 &
fi
t() { FIELDKERN_AUTOTUNE=0 timeout 150 python -m pytest -q -p no:cacheprovider -rf \
      tests/kernels/test_kernels_gpu.py -k "$1" > "$LOGS/tests_$2.log" 2>&1; }
if has candidates; then
  t "every and (fwd0 or fwd1 or fwd2)" 1 & t "every and (fwd3 or fwd4 or fwd5)" 2 &
  t "every and (bwd0 or bwd1 or rows0 or rows1)" 3 & t "every and (bwd2 or bwd3 or rows2)" 4 &
  t "every and (sum0 or sum1 or sum2 or sum3 or sum4)" 5 & t "every and project" 6 &
  t "every and (layer0 or layer1 or layer2 or layer3 or layer4 or layer5 or backward_candidate)" 10 &
fi
if has sanity; then  # two of the device tests (wide 2D and 3D ReLU nets), first configs
  t "not every and mfn_stack and (case0 or case1)" 9 &
fi
if has tests; then
  # the second group alone outran 150 s on an H100 (sixth session): split
  late="backward_products or project_volume_deterministic or gradient_variants or forward_variants"
  t "not every and (mfn_stack and (case0 or case1))" 7 &
  t "not every and not (mfn_stack and (case0 or case1)) and not ($late)" 8 & t "not every and ($late)" 11 &
  # the trainer's steps under torch.cuda.set_sync_debug_mode("error"), and replayed from CUDA graphs
  timeout 150 python -m pytest -q -p no:cacheprovider -rf tests/cryoem/test_sync_free.py \
    tests/cryoem/test_step_graphs.py -k cuda > "$LOGS/tests_trainer.log" 2>&1 &
fi
wait
if [ -e "$LOGS/warm.log" ]; then
  stamp "warm-ups done: $(grep -c '^warm' "$LOGS/warm.log")"
  grep -v "^warm" "$LOGS/warm.log" | grep -E "Error|error" | sort | uniq -c | head -5
fi
for f in "$LOGS"/tests_*.log; do [ -e "$f" ] && { echo "== $f"; grep -E "^(FAILED|ERROR)|passed|failed" "$f" | cut -c1-300; }; done

bench() {  # name, time limit, pytest args...
  local name=$1 limit=$2; shift 2
  stamp "bench $name"
  timeout "$limit" python -m pytest -q -p no:cacheprovider --benchmark-only -rf \
    --benchmark-json="$OUT/$name.json" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$LOGS/$name.log" | cut -c1-300
  return $rc
}
if has mfn; then
  bench mfn 240 bench/test_bench_mfn_stack.py -k "not compile"
fi
has project && bench project 100 bench/test_bench_project_volume.py -k "triton or reference or fourier"
if has epoch; then
  stamp "epoch speed"
  # 180 s: on a fresh machine its Triton cases compile every candidate of the 3D ReLU-head
  # stack first (the warm-up above does not run for this step, nor build ReLU heads)
  timeout 180 python bench/epoch_speed.py > "$OUT/epoch_speed.txt" 2>&1; tail -n 8 "$OUT/epoch_speed.txt"
fi
has host && bench host 120 bench/test_bench_host_cost.py
# the paper preset's epoch (synthetic data: simulation ~1.3 GB written, then 3 cases of an
# untimed and 2 timed epochs each); FIELDKERN_BENCH_PARTICLES=10000 if a session is short
if has paper; then
  if has_modules mrcfile starfile; then bench paper 420 bench/test_bench_paper_epoch.py
  else stamp "paper: skipped, no mrcfile/starfile here (run bench/gpu_wheels.sh and carry .whl)"; fi
fi
has compile && bench mfn_compile 150 bench/test_bench_mfn_stack.py -k "(64x64x64 or 512x512) and compile"
if has accuracy; then  # the device's errors against the reference, every mfn_stack path
  stamp "accuracy"
  FIELDKERN_AUTOTUNE=0 timeout 120 python bench/accuracy.py > "$OUT/accuracy.txt" 2>&1; tail -n 10 "$OUT/accuracy.txt"
fi
if has profile; then
  stamp "profile"
  timeout 60 python bench/profile_mfn.py 3d_h128_s3 > "$OUT/profile.txt" 2>&1; grep -E "^(memory|###|n=)" "$OUT/profile.txt"
fi
stamp "done"
python bench/summarize.py "$OUT"/*.json
flush_logs
