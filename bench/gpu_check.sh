#!/usr/bin/env bash
# The GPU checks of this project, prepared for a lent GPU machine (the device tool:
# one H100/H200, python 3.12, torch 2.11, triton 3.6, nvcc, no network). A session has
# 15 device-minutes in all (the machine's start included), so the main stage is one
# call of about 8 minutes, each step under its own time cap:
#
#   bash bench/gpu_check.sh all      # build, the GPU tests, the issue-3 benchmarks
#
# run through the device tool with timeout_s=600. The separate stages, for a rerun of
# one part: `tests` (every test, ~9 min) and `bench` (the benchmarks, ~8 min).
#
# Results: $OUT/gpu_check_<stage>.tar.gz (all logs, JSON and PNG) and the logs beside
# it ($OUT defaults to bench/results/gpu-check). Commit the JSON/PNG results under
# bench/results/ with the env file's device and version lines.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_check.sh all|tests|bench}
# Everything is written to $work; on exit it is packed into one archive in $OUT (the
# device tool brings back at most 8 files), with the env file and the logs beside it.
final=${OUT:-bench/results/gpu-check}
work=$(mktemp -d)
out=$work
mkdir -p "$final"
pack() {
  tar -czf "$final/gpu_check_$stage.tar.gz" -C "$work" .
  cp "$work"/env.txt "$work"/*.log "$final"/ 2>/dev/null
  ls -la "$final"
}
trap pack EXIT
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
py=${PYTHON:-python3}
par=(); "$py" -c "import xdist" 2>/dev/null && par=(-n 8)  # spreads Triton's JIT compilations

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# The extension with its CUDA kernels (in place: an editable install needs no network).
# A failed or slow build is logged and the run goes on: the Triton checks need no build.
if [ -z "${SKIP_BUILD:-}" ] && ! "$py" -c "import fused_margin._ext as e; assert e.has_cuda_kernels()" 2>/dev/null; then
  start=$SECONDS
  if ! FORCE_CUDA=1 timeout "${BUILD_TIMEOUT:-120}" "$py" -m pip install -q -e . --no-build-isolation --no-deps \
      > "$out/build.log" 2>&1; then
    # The package itself must be installed (fused_margin.triton_kernels is mapped by the
    # install): without the extension, the cpu/cuda backends report themselves unavailable.
    echo "BUILD FAILED, see build.log; installing without the extension (the cuda backend's tests will skip)"
    FUSED_MARGIN_NO_EXT=1 "$py" -m pip install -q -e . --no-build-isolation --no-deps >> "$out/build.log" 2>&1
  fi
  echo "build: $((SECONDS - start)) s"
fi

# B=1024, D=512, bf16, CosFace and CS-Softmax: issue 3's targets, against eager,
# torch.compile and the three-GEMM floor.
bench_args=(--device cuda --heads cosface,cs_softmax --batch 1024 --dim 512 --dtype bfloat16 --out "$out"
            --no-progress)

run_tests() {  # $1: log name; $2: time cap (s); $3...: pytest selection
  local log=$1 cap=$2; shift 2
  timeout "$cap" "$py" -m pytest "$@" -q -p no:cacheprovider --durations=10 "${par[@]}" 2>&1 \
    | tee "$out/$log.log" | tail -n 40
}

# Each run stops starting measurements at 3/4 of its cap (--time-budget), so that it
# still writes its results; the cap (timeout) only catches a hang.
bench_default() {  # $1: time cap; $2: classes
  timeout "$1" "$py" bench/bench_loss.py "${bench_args[@]}" --classes "$2" --time-budget $(( $1 * 3 / 4 )) \
    --note "bench/gpu_check.sh $stage: default backward (gemm)" 2>&1 | tee "$out/bench-gpu.log" | tail -n 30
}

bench_modes() {  # $1: time cap; $2: classes. The three Triton backwards side by side, with the floor.
  timeout "$1" "$py" bench/bench_loss.py "${bench_args[@]}" --classes "$2" --time-budget $(( $1 * 3 / 4 )) \
    --backends triton,triton:recompute,triton:atomic,floor --note "bench/gpu_check.sh $stage: backward modes" \
    2>&1 | tee "$out/bench-gpu-modes.log" | tail -n 16
}

case "$stage" in
  all)
    # The Triton and CUDA backends on the GPU: every value test (compiled kernels at the
    # tests' odd shapes) and the GPU-only ones (bf16/fp16 at B=1024 C=131072 three-way,
    # tf32 modes, peak memory at C=262144, bitwise reproducibility).
    bench_args+=(--compile-max-classes 262144 --backends triton,cuda,eager,compile,floor)
    # The GPU-only tests first (large shapes, memory, reproducibility), then the rest.
    run_tests pytest-gpu-marked 100 -m gpu tests/test_triton.py tests/test_cuda.py
    run_tests pytest-gpu-values 90 -m "not gpu" tests/test_triton.py tests/test_cuda.py tests/test_ops.py
    bench_default 180 262144,1048576
    bench_modes 80 262144
    ;;
  tests)
    run_tests pytest-gpu 540 tests
    ;;
  bench)
    bench_default 330 262144,1048576
    bench_modes 200 262144,1048576
    ;;
  *)
    echo "unknown stage $stage (all | tests | bench)" >&2
    exit 2
    ;;
esac
