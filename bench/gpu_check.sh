#!/usr/bin/env bash
# The GPU checks of this project, prepared for a lent GPU machine (the device tool:
# one H100/H200, python 3.12, torch 2.11, triton 3.6, nvcc, no network), in two calls
# that each end well inside the tool's 10-minute limit:
#
#   bash bench/gpu_check.sh tests    # build with CUDA, then every test on the GPU
#   bash bench/gpu_check.sh bench    # build if needed, then the GPU benchmarks
#
# Logs and result files go to $OUT (the device tool brings them back; at most 8 files),
# else to bench/results/gpu-check. Commit the JSON/PNG results under bench/results/ with
# the logs' device and version lines.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_check.sh tests|bench}
out=${OUT:-bench/results/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
py=${PYTHON:-python3}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
} > "$out/env-$stage.txt" 2>&1

# The extension with its CUDA kernels (in place: an editable install needs no network).
if ! "$py" -c "import fused_margin._ext as e; assert e.has_cuda_kernels()" 2>/dev/null; then
  FORCE_CUDA=1 "$py" -m pip install -q -e . --no-build-isolation --no-deps > /tmp/build.log 2>&1 \
    || { cp /tmp/build.log "$out/build-$stage.log"; tail -n 40 /tmp/build.log; exit 1; }
fi

case "$stage" in
  tests)
    # Every test, compiled Triton kernels and the CUDA backend on the GPU; the GPU-only
    # ones (bf16/fp16 at B=1024 C=131072, peak memory, tf32 modes) included.
    # pytest-xdist (on the device image) spreads the Triton JIT compilations over cores.
    par=(); "$py" -c "import xdist" 2>/dev/null && par=(-n 6)
    timeout 540 "$py" -m pytest tests -q -p no:cacheprovider --durations=15 "${par[@]}" \
      2>&1 | tee "$out/pytest-gpu.log" | tail -n 60
    ;;
  bench)
    # Issue 3's and 4's targets: B=1024, D=512, bf16, CosFace and CS-Softmax, against
    # eager, torch.compile and the three-GEMM floor.
    args=(--device cuda --heads cosface,cs_softmax --batch 1024 --dim 512 --dtype bfloat16
          --classes 262144,1048576 --out "$out" --no-progress)
    timeout 330 "$py" bench/bench_loss.py "${args[@]}" --note "bench/gpu_check.sh bench: default backward (gemm)" \
      2>&1 | tee "$out/bench-gpu.log" | tail -n 40
    # the other two Triton backwards, same shapes, beside the same GEMM floor
    for mode in recompute atomic; do
      FUSED_MARGIN_TRITON_BACKWARD=$mode timeout 110 "$py" bench/bench_loss.py "${args[@]}" --backends triton,floor \
        --note "bench/gpu_check.sh bench: FUSED_MARGIN_TRITON_BACKWARD=$mode" \
        2>&1 | tee "$out/bench-gpu-$mode.log" | tail -n 20
    done
    ;;
  *)
    echo "unknown stage $stage (tests | bench)" >&2
    exit 2
    ;;
esac
