"""Builds fused_margin and its C++/CUDA extension fused_margin._C.

* The C++ CPU kernels are always built (``CppExtension``); the CUDA kernels too
  (``CUDAExtension``) when torch was built with CUDA and a CUDA toolkit is found, or
  when ``FORCE_CUDA=1``.
* ``FUSED_MARGIN_NO_EXT=1`` skips the extension: the package then runs on its Python
  backends (eager reference, Triton) and says so once when the 'cpu' or 'cuda' backend
  is asked for.
* Without a visible GPU the CUDA kernels are built for ``TORCH_CUDA_ARCH_LIST`` when set,
  else for sm_80 and sm_90 with PTX.
* ``MAX_JOBS`` bounds ninja's parallel compile jobs, as for any torch extension.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extension_kwargs() -> dict:
    if _flag("FUSED_MARGIN_NO_EXT"):
        return {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def sources(pattern: str) -> list[str]:
        # relative paths: setuptools refuses absolute ones in sources
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    cpu_sources = ["csrc/bindings.cpp", *sources("csrc/cpu/*.cpp")]
    with_cuda = _flag("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)

    # -O3 and OpenMP as torch itself is built: at::parallel_for is an OpenMP loop compiled
    # into the extension, so without -fopenmp the CPU kernels would run on one thread.
    # -fno-trapping-math / -fno-math-errno (as torch's build): lets GCC vectorize the
    # epilogue's selects and inline sqrt/exp; no value changes.
    cxx = ["-O3", "-DNDEBUG", "-fno-trapping-math", "-fno-math-errno"]
    link = []
    if sys.platform.startswith("linux"):
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    if sys.platform == "win32":
        cxx = ["/O2", "/openmp", "/DNDEBUG"]

    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to read the architecture from (a CPU build machine, or a CUDA build of
        # torch on a CPU machine): torch 2.11 then fails with an IndexError in
        # _get_cuda_arch_flags. Build for A100 and H100/H200, with PTX for newer GPUs.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print(f"fused_margin: no GPU visible, building CUDA kernels for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")
    if with_cuda:
        extension = CUDAExtension(
            "fused_margin._C",
            cpu_sources + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
            extra_compile_args={
                "cxx": cxx + ["-DFUSED_MARGIN_WITH_CUDA"],
                "nvcc": ["-O3", "-DNDEBUG", "-DFUSED_MARGIN_WITH_CUDA", "--expt-relaxed-constexpr"],
            },
            extra_link_args=link,
        )
    else:
        extension = CppExtension(
            "fused_margin._C", cpu_sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


setup(
    # every package below fused_margin/, and the kernels' package (triton_kernels/ in the tree)
    packages=[*find_packages(include=["fused_margin", "fused_margin.*"]), "fused_margin.triton_kernels"],
    package_dir={"fused_margin.triton_kernels": "triton_kernels"},
    **_extension_kwargs(),
)
