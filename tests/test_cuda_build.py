"""Compile-only checks of the CUDA sources, for machines without a GPU (CI).

The CPU torch cannot build the CUDA extension, so the CUDA code is checked here the
way the build would compile it: the .cu kernels with nvcc (they include no torch
header), and the .cpp that calls ATen / cuBLAS with the host compiler against torch's
headers (syntax only: nothing is linked).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
CPP_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))


def _cuda_home() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


CUDA_HOME = _cuda_home()
needs_nvcc = pytest.mark.skipif(CUDA_HOME is None, reason="nvcc not found (set CUDA_HOME or install a CUDA toolkit)")


def test_cuda_sources_exist_and_keep_torch_out_of_kernels():
    assert CU_SOURCES and CPP_SOURCES
    # and the headers the kernels share with the CPU code
    shared = [os.path.join(ROOT, "csrc", name) for name in ("margin_params.h", "host_device.h", "non_target.h", "optim_update.h")]
    for path in CU_SOURCES + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")) + shared:
        with open(path) as f:
            includes = [line for line in f if line.startswith("#include")]
        offending = [line.strip() for line in includes if any(h in line for h in ("<torch/", "<ATen/", "<c10/"))]
        assert not offending, f"{os.path.basename(path)} includes torch headers: {offending}"


@needs_nvcc
@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_nvcc_compiles(source, tmp_path):
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    command = [nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-Wall", "-c", source,
               "-o", str(tmp_path / "out.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-4000:]


@needs_nvcc
@pytest.mark.parametrize("source", CPP_SOURCES, ids=os.path.basename)
def test_host_code_compiles_against_torch_headers(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    includes = [*include_paths(), sysconfig.get_paths()["include"], os.path.join(CUDA_HOME, "include")]
    torch_include = include_paths()[0]
    if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        # generated only in CUDA builds of torch; its one macro matters for linking only
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path / "stub"))
    command = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-DFUSED_MARGIN_WITH_CUDA", source,
               *(f"-I{p}" for p in includes)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ours = [line for line in result.stderr.splitlines() if "warning" in line and "csrc/" in line]
    assert not ours, "\n".join(ours)
