"""The C++ CPU backend (csrc/cpu): class chunks through ATen GEMMs (MKL / oneDNN) and a
fused, vectorized epilogue, parallel over fixed groups of chunks (results do not depend
on the thread count). fp32 and fp64 natively; bf16 / fp16 inputs are converted chunk by
chunk and accumulated in fp32."""

from __future__ import annotations

from torch import Tensor

from .. import _ext
from ..kernel_params import KernelParams
from . import Backend


class CpuBackend(Backend):
    name = "cpu"
    auto_priority = {"cpu": 0}
    #: classes per chunk; 0 lets the kernel choose from the L2 size, B and D (tests set it
    #: small to exercise many chunks on small shapes)
    chunk_size: int = 0

    def not_supported_reasons(self, x: Tensor, weight: Tensor, params: KernelParams) -> list[str]:
        if x.device.type != "cpu" or weight.device.type != "cpu":
            return [f"needs CPU tensors, got x on {x.device} and weight on {weight.device}"]
        if _ext.load_error() is not None:
            _ext.warn_unavailable(self.name)
            return [_ext.unavailable_reason()]
        return []

    def forward(self, x, weight, labels, bias, class_index, row_threshold, params):
        return _ext.ops().margin_lse_fwd(
            x, weight, labels, bias, class_index, row_threshold, params.normalize_x, params.normalize_w,
            params.scale, int(params.kind), params.alpha, params.delta, params.margin, params.t,
            params.num_subcenters, self.chunk_size,
        )

    def backward(
        self, grad_lse, grad_target_u, grad_sum, x, weight, labels, bias, class_index, row_threshold,
        lse_neg, row_scale, col_scale, params,
    ):
        grad_x, grad_w, grad_b = _ext.ops().margin_lse_bwd(
            grad_lse, grad_target_u, grad_sum, x, weight, labels, bias, class_index, row_threshold,
            lse_neg, row_scale, col_scale, params.normalize_x, params.normalize_w, params.scale,
            int(params.kind), params.alpha, params.delta, params.margin, params.t, params.num_subcenters,
            self.chunk_size,
        )
        return grad_x, grad_w, (grad_b if bias is not None else None)


BACKEND = CpuBackend()
