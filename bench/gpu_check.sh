#!/usr/bin/env bash
# The GPU checks of this project, prepared for a GPU machine (one H100/H200,
# python 3.12, torch 2.11, triton 3.6, nvcc, no network, maybe no pytest plugins). Such
# a machine may be available for about 15 minutes, its start included, and one call runs
# at most 600 s and is then killed (SIGKILL): so the script holds one deadline (GPU_CHECK_DEADLINE,
# 580 s from its start), runs its stages in the order of their value, each under
# min(its own cap, the time left), and writes every result into $OUT as it is produced:
# a run cut off at any point leaves its logs and what it measured.
#
#   bash bench/gpu_check.sh            # on the GPU machine, under a 600 s limit
#
# Stages, in this order (the cap in seconds):
#    0 versions   every module the run imports, with its version, or MISSING and what
#                 needs it (the first second names a missing package)                 15
#    1 install    the package without the extension (no compiler)                     60
#    2 smoke      bench/gpu_smoke.py: every backward mode's values in bf16/fp16/fp32
#                 (ieee, tf32), their times against the floor at C=262144, and
#                 torch.compile(fullgraph=True) of a training step                    150
#    3 gpu-triton the GPU-marked Triton tests                                          90
#    4 build      the CUDA extension, for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0)        150
#    5 bench-triton  CosFace bf16 B=1024 D=512, Triton against the floor, C=262144,1048576   75
#    6 bench-modes   the three Triton backward modes side by side, C=262144             60
#    7 gpu-cuda   the CUDA backend's tests                                              60
#    8 bench-cs   CS-Softmax: Triton, CUDA and the floor, C=262144,1048576              60
#    9 values     the remaining Triton value tests on compiled kernels (every core)     150
#   10 bench-eager   the eager baseline (bf16 GEMMs, fp32 softmax), C=262144            45
#   11 bench-compile torch.compile of the eager baseline, C=262144                      60
#
# Files in $OUT (default bench/results/gpu-check), at most 8, all written as they grow:
#   env.txt          device and versions
#   stages.jsonl     one line per stage: cap, limit, exit status, seconds
#   smoke.jsonl      one line per smoke result
#   tests.log        the pytest stages (-v -rfE), their summaries included
#   build.log        the CUDA build
#   bench.log        the benchmark stages
#   bench_live.json  the running benchmark's result, rewritten after every measured row
#   bench.tar.gz     every finished benchmark's JSON and PNG (re-packed after each)
#
# GPU_CHECK_STUB=1 replaces the GPU stages by short stand-ins on the CPU (the bench
# stages run the real bench_loss.py at tiny sizes): tests/test_gpu_check.py rehearses the
# deadline and the cut-off with it. GPU_CHECK_STAGES=a,b,... runs only those stages.
set -uo pipefail
cd "$(dirname "$0")/.."
script=bench/gpu_check.sh
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
py=${PYTHON:-python3}
stub=${GPU_CHECK_STUB:-}
out=${OUT:-bench/results/gpu-check}

# ---- stage commands (each runs as `bash gpu_check.sh __run NAME ARGS...` under timeout) ----

# pytest, verbose (a cut-off run still names every test it finished) with its summary
# of failures and errors; FUSED_MARGIN_TEST_TIMEOUT fails a single test past its limit
# (tests/conftest.py: no plugin needed).
pytest_cmd() {
  FUSED_MARGIN_TEST_TIMEOUT=${TEST_TIMEOUT:-60} "$py" -m pytest -v -rfE -p no:cacheprovider --durations=10 "$@"
}

# The same pytest selection over every core: pytest-xdist when installed, else one pytest
# per shard (FUSED_MARGIN_TEST_SHARD, tests/conftest.py), lines prefixed by the shard.
# SIGINT reaches every shard (timeout signals its process group); the prefixing sed
# ignores it so that the shards' summaries still reach the log.
pytest_parallel() {
  local n=$1; shift
  if "$py" -c "import xdist" 2>/dev/null; then
    pytest_cmd -n "$n" "$@"
    return
  fi
  local i pid rc=0 pids=()
  trap ':' INT  # this shell waits for the shards' summaries; its children keep default INT
  for (( i = 0; i < n; i++ )); do
    FUSED_MARGIN_TEST_SHARD="$i/$n" pytest_cmd "$@" 2>&1 | (trap '' INT; exec sed -u "s/^/[$i] /") &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    while true; do
      wait "$pid"
      local r=$?
      # > 128 with the shard still alive: the wait was interrupted by the signal
      if [ "$r" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
      [ "$r" -ne 0 ] && rc=$r
      break
    done
  done
  return $rc
}

bench_args() {
  if [ -n "$stub" ]; then
    echo --device cpu --batch 8 --dim 16 --repeat 2 --warmup 1 --min-time 0 --no-progress
  else
    # B=1024, D=512, bf16: the benchmark's targets, against the three-GEMM floor
    echo --device cuda --batch 1024 --dim 512 --dtype bfloat16 --no-progress --repeat 10 --warmup 2 \
      --min-time 0.5 --worker-timeout 120
  fi
}

# bench_loss.py (as the module bench.bench_loss) with a time budget of 3/4 of the stage's
# limit (it then starts no new measurement and writes its results); its rows live in
# $out/bench_live.json.
bench() {
  local note=$1; shift
  # shellcheck disable=SC2046
  "$py" -m bench.bench_loss $(bench_args) --time-budget "$(( STAGE_LIMIT * 3 / 4 ))" --out "$GPU_CHECK_WORK/bench" \
    --live-json "$out/bench_live.json" --note "bench/gpu_check.sh: $note" "$@"
}

smoke() {  # JSON lines to smoke.jsonl as they come; messages to the stage's log
  if [ -n "$stub" ]; then
    "$py" -c "import json, time
for i in range(3):
    print(json.dumps({'check': 'stub', 'i': i}), flush=True)
    time.sleep(0.1)" >> "$out/smoke.jsonl"
  else
    "$py" -m bench.gpu_smoke >> "$out/smoke.jsonl"
  fi
}

# Every module the stages import, with what needs it: its version, or MISSING. Exit
# status 1 when a module every stage needs is missing (the optional ones cost only their
# tests or features: hypothesis the property-based tests, tqdm the progress bars, ...).
versions() {
  "$py" - <<'PYTHON'
import importlib
import sys

print("python", sys.version.split()[0])
MODULES = [  # (module, needed by, needed by every stage)
    ("torch", "everything", True),
    ("triton", "the Triton backend, its tests and benchmarks", True),
    ("numpy", "torch, the benchmarks", True),
    ("pytest", "the test stages", True),
    ("setuptools", "install, build", True),
    ("ninja", "build (the CUDA extension; without it a slow serial build)", False),
    ("xdist", "the values stage over every core (else one pytest per shard)", False),
    ("hypothesis", "the property-based tests (they skip without it)", False),
    ("tqdm", "the benchmarks' progress bars (off here: --no-progress)", False),
    ("matplotlib", "the benchmarks' plots", False),
    ("pytorch_metric_learning", "the pytorch-metric-learning cross-checks and benchmark rows", False),
    ("liger_kernel", "a benchmark row (Liger's fused linear cross-entropy)", False),
    ("cut_cross_entropy", "a benchmark row (cut-cross-entropy)", False),
]
missing = []
for name, needed_by, required in MODULES:
    try:
        module = importlib.import_module(name)
    except Exception as error:  # ImportError, or a broken install
        print(f"{name}: MISSING ({type(error).__name__}: {error}); needed by {needed_by}", flush=True)
        if required:
            missing.append(name)
        continue
    print(f"{name}: {getattr(module, '__version__', 'installed (no __version__)')}", flush=True)
if missing:
    print("gpu_check: required module(s) missing: " + ", ".join(missing), flush=True)
    sys.exit(1)
PYTHON
}

stub_pytest() {  # a stand-in for a pytest stage: prints $1 lines (0.2 s apart), then ends
  "$py" -c "
import sys, time
for i in range(int(sys.argv[1])):
    print('stub test', i, 'PASSED', flush=True)
    time.sleep(0.2)
print('stub stage done', flush=True)" "$@"
}

if [ "${1:-}" = __run ]; then
  shift
  "$@"
  exit $?
fi

# ---- the run ------------------------------------------------------------------------

t0=$SECONDS
deadline=$(( t0 + ${GPU_CHECK_DEADLINE:-580} ))
only=${GPU_CHECK_STAGES:-}
cores=$(nproc 2>/dev/null || echo 4)
mkdir -p "$out"
rm -f "$out"/{env.txt,stages.jsonl,smoke.jsonl,tests.log,build.log,bench.log,bench_live.json,bench.tar.gz}
GPU_CHECK_WORK=$(mktemp -d)  # complete benchmark results, packed into bench.tar.gz after each stage
export GPU_CHECK_WORK OUT=$out
mkdir -p "$GPU_CHECK_WORK/bench"
for f in stages.jsonl smoke.jsonl tests.log build.log bench.log; do : > "$out/$f"; done

pack_bench() {
  # write-then-rename: a kill during the packing leaves the previous archive whole
  tar -czf "$out/.bench.tar.gz.tmp" -C "$GPU_CHECK_WORK/bench" . 2>/dev/null \
    && mv -f "$out/.bench.tar.gz.tmp" "$out/bench.tar.gz"
}
finish() {
  pack_bench
  rm -rf "$GPU_CHECK_WORK"
  echo "gpu_check: $((SECONDS - t0)) s; files in $out:"
  ls -la "$out"
}
trap finish EXIT

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4
  "$py" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$py" -c "import xdist" 2>/dev/null && echo "pytest-xdist: yes" || echo "pytest-xdist: no"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  echo "cores: $cores; deadline: ${GPU_CHECK_DEADLINE:-580} s${stub:+; STUB stages}"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# run_stage NAME CAP LOG CMD...: CMD under min(CAP, time left), stopped by SIGINT (pytest
# and bench_loss.py then print their summaries and write what they have), SIGKILL 5 s
# later; one line in stages.jsonl, the stage's last lines on the console.
run_stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( deadline - SECONDS - 5 )) limit status rc start offset
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then
    return 0
  fi
  limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 5 ]; then
    printf '{"stage": "%s", "cap_s": %d, "limit_s": 0, "status": "skipped", "reason": "deadline"}\n' \
      "$name" "$cap" >> "$out/stages.jsonl"
    echo "== $name: skipped (deadline)"
    return 0
  fi
  echo "== $name (limit ${limit} s of cap ${cap} s, $(( deadline - SECONDS )) s left)"
  offset=$(stat -c %s "$out/$log")
  echo "===== stage $name: limit ${limit} s, $(date -u +%T)" >> "$out/$log"
  start=$SECONDS
  STAGE_LIMIT=$limit timeout -s INT -k 5 "$limit" bash "$script" __run "$@" >> "$out/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '{"stage": "%s", "cap_s": %d, "limit_s": %d, "rc": %d, "status": "%s", "wall_s": %d}\n' \
    "$name" "$cap" "$limit" "$rc" "$status" "$(( SECONDS - start ))" >> "$out/stages.jsonl"
  tail -c +"$(( offset + 1 ))" "$out/$log" | tail -n "${TAIL_LINES:-12}"
  echo "== $name: $status (rc $rc, $(( SECONDS - start )) s)"
}

if [ -n "$stub" ]; then
  export OMP_NUM_THREADS=1
  run_stage versions 15 env.txt versions
  run_stage install 60 build.log true
  run_stage smoke 150 tests.log smoke
  run_stage gpu-triton 90 tests.log stub_pytest 3
  run_stage build 150 build.log stub_pytest 2
  run_stage bench-triton 75 bench.log bench "stub bench" --heads cosface --classes 256,512,1024 --backends eager,floor
  pack_bench
  run_stage bench-modes 60 bench.log bench "stub modes" --heads cosface --classes 256 --backends eager,floor
  pack_bench
  run_stage gpu-cuda 60 tests.log stub_pytest 1000000
  run_stage values 150 tests.log pytest_parallel 2 tests/test_validation.py tests/test_reference.py tests/test_heads.py
  exit 0
fi

# 0. What is installed: a missing package is named before anything else runs.
run_stage versions 15 env.txt versions
# 1. Installed without a compiler: everything but the cpu/cuda backends works at once.
run_stage install 60 build.log env FUSED_MARGIN_NO_EXT=1 "$py" -m pip install -q -e . --no-build-isolation --no-deps
# 2. Values of every mode and dtype, times, torch.compile: one process, JSON lines.
run_stage smoke 150 tests.log smoke
# 3. The GPU-only Triton tests: large shapes, bf16/fp16 three-way, tf32, memory, determinism.
run_stage gpu-triton 90 tests.log pytest_cmd -m gpu tests/test_triton.py
# 4. The CUDA extension for this GPU only (a preset list of architectures multiplies the
#    compile time); a failed build leaves the package installed without it.
run_stage build 150 build.log env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
  "$py" -m pip install -q -e . --no-build-isolation --no-deps
# 5.-6. The Triton benchmark against the floor, then its backward modes side by side.
run_stage bench-triton 75 bench.log bench "Triton (default backward) against the floor" \
  --heads cosface --classes 262144,1048576 --backends triton,floor
pack_bench
run_stage bench-modes 60 bench.log bench "Triton backward modes" \
  --heads cosface --classes 262144 --backends triton,triton:recompute,triton:atomic,floor
pack_bench
# 7. The CUDA backend's tests (they skip where the build failed).
run_stage gpu-cuda 60 tests.log pytest_cmd tests/test_cuda.py tests/test_cuda_build.py
# 8. CS-Softmax, the Triton and CUDA backends against the floor.
run_stage bench-cs 60 bench.log bench "CS-Softmax" \
  --heads cs_softmax --classes 262144,1048576 --backends triton,cuda,floor
pack_bench
# 9. The interpreter-equivalent value tests on compiled kernels (~230 Triton
#    compilations: spread over every core). CPU-only test files are not run here.
run_stage values 150 tests.log pytest_parallel "$cores" -m "not gpu" tests/test_triton.py
# 10.-11. The baselines, last: eager PyTorch as a user writes it, then torch.compile of it.
run_stage bench-eager 45 bench.log bench "eager baseline" --heads cosface --classes 262144 --backends eager,floor
pack_bench
run_stage bench-compile 60 bench.log bench "torch.compile baseline" \
  --heads cosface --classes 262144 --backends compile,floor --compile-max-classes 262144
pack_bench
