#!/usr/bin/env bash
# The GPU machine's Python stack, rehearsed on a CPU machine: torch 2.11 (its CUDA 13
# build, from PyPI) with the Triton 3.6 it pins, the extension built with its CUDA
# kernels (nvcc, no GPU: sm_80/sm_90), then the whole suite (Triton under the
# interpreter, the GPU-only tests skipped). Catches what differs between torch
# 2.11/Triton 3.6 and CI's torch 2.13/Triton 3.9 (Dynamo, the build, the interpreter)
# without spending device time.
#
#   bash bench/device_stack_check.sh            # ~5 GB venv in $VENV (/tmp/fm-torch211), ~8 min
#
# Works on a copy of the tree (the in-place build would replace the .venv's extension).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-/tmp/fm-torch211}
copy=${COPY:-/tmp/fm-torch211-tree}
py=$venv/bin/python
if ! "$py" -c "import torch; assert torch.__version__.startswith('2.11')" 2>/dev/null; then
  python3 -m venv "$venv"
  "$py" -m pip install -q torch==2.11.0 'numpy<2.4'  # Triton 3.6's interpreter fails with numpy 2.4
  "$py" -m pip install -q setuptools wheel ninja pytest pytest-xdist hypothesis matplotlib tqdm \
    pytest-benchmark scipy
  "$py" -m pip install -q --no-deps pytorch-metric-learning
fi
rm -rf "$copy"
git -C "$root" ls-files -z --cached --others --exclude-standard | (cd "$root" && tar -cf - --null -T -) \
  | (mkdir -p "$copy" && tar -xf - -C "$copy")
cd "$copy"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -q -e . --no-build-isolation --no-deps
"$py" -c "import torch, triton, fused_margin._ext as e; print('torch', torch.__version__, 'triton', \
triton.__version__, 'CUDA kernels built:', e.has_cuda_kernels())"
"$py" -m pytest tests -q -n "${JOBS:-2}" -p no:cacheprovider "$@"
