"""The C++ CPU backend (csrc/cpu): class chunks through ATen GEMMs (MKL / oneDNN) and a
fused, vectorized epilogue, parallel over fixed groups of chunks (results do not depend
on the thread count). fp32 and fp64 natively; bf16 / fp16 inputs are converted chunk by
chunk and accumulated in fp32."""

from __future__ import annotations

from torch import Tensor

from ..kernel_params import KernelParams
from ._compiled import ExtensionBackend


class CpuBackend(ExtensionBackend):
    name = "cpu"
    auto_priority = {"cpu": 0}
    #: classes per chunk; 0 lets the kernel choose from the L2 size, B and D (tests set it
    #: small to exercise many chunks on small shapes)
    chunk_size: int = 0

    def not_supported_reasons(self, x: Tensor, weight: Tensor, params: KernelParams) -> list[str]:
        if x.device.type != "cpu" or weight.device.type != "cpu":
            return [f"needs CPU tensors, got x on {x.device} and weight on {weight.device}"]
        return self.extension_reasons()


BACKEND = CpuBackend()
