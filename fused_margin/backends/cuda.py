"""The CUDA C++ backend (csrc/cuda): class chunks through cuBLAS GEMMs (via ATen) and
custom CUDA kernels for the fused epilogue -- the robust path where Triton is missing.
fp32 / fp64 natively; fp16 / bf16 GEMMs with fp32 outputs and fp32 accumulation. With
bf16 inputs the backward GEMMs read G = dU * r * q in bf16; with fp16 inputs they run in
fp32 (fp16's range would flush G's small entries)."""

from __future__ import annotations

from torch import Tensor

from .. import _ext
from ..kernel_params import KernelParams
from ._compiled import ExtensionBackend


class CudaBackend(ExtensionBackend):
    name = "cuda"
    # After Triton (priority 0), before the eager reference.
    auto_priority = {"cuda": 1}
    #: classes per chunk; 0 lets the kernel choose (a ~32 MiB fp32 logits tile)
    chunk_size: int = 0

    def not_supported_reasons(self, x: Tensor, weight: Tensor, params: KernelParams) -> list[str]:
        if x.device.type != "cuda" or weight.device != x.device:
            return [f"needs CUDA tensors on one device, got x on {x.device} and weight on {weight.device}"]
        reasons = self.extension_reasons()
        if reasons:
            return reasons
        if not _ext.has_cuda_kernels():
            return [
                "fused_margin._C was built without its CUDA kernels (a CPU-only torch or no CUDA toolkit at "
                "build time); rebuild with a CUDA torch and toolkit, or FORCE_CUDA=1"
            ]
        return []


BACKEND = CudaBackend()
