"""What the two compiled backends ('cpu', 'cuda') share: both call the one pair of
extension ops ``torch.ops.fused_margin_C.margin_lse_fwd`` / ``margin_lse_bwd``, and
PyTorch's dispatcher picks the CPU or CUDA kernel from the tensors' device. This module
defines no ``BACKEND``, so the registry does not list it."""

from __future__ import annotations

from torch import Tensor

from .. import _ext
from ..kernel_params import KernelParams
from . import Backend


class ExtensionBackend(Backend):
    #: classes per chunk; 0 lets the kernel choose (tests set it small to exercise many
    #: chunks on small shapes)
    chunk_size: int = 0

    def extension_reasons(self) -> list[str]:
        """Why the extension cannot run at all (warns once when it failed to load)."""
        if _ext.load_error() is not None:
            _ext.warn_unavailable(self.name)
            return [_ext.unavailable_reason()]
        return []

    def forward(self, x, weight, labels, bias, class_index, row_threshold, params: KernelParams):
        return _ext.ops().margin_lse_fwd(
            x, weight, labels, bias, class_index, row_threshold, params.normalize_x, params.normalize_w,
            params.scale, int(params.kind), params.alpha, params.delta, params.margin,
            params.num_subcenters, self.chunk_size,
        )

    def backward(
        self, grad_lse, grad_target_u, grad_sum, x, weight, labels, bias, class_index, row_threshold,
        lse_neg, row_scale, col_scale, params: KernelParams,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        grad_x, grad_w, grad_b = _ext.ops().margin_lse_bwd(
            grad_lse, grad_target_u, grad_sum, x, weight, labels, bias, class_index, row_threshold,
            lse_neg, row_scale, col_scale, params.normalize_x, params.normalize_w, params.scale,
            int(params.kind), params.alpha, params.delta, params.margin, params.num_subcenters,
            self.chunk_size,
        )
        return grad_x, grad_w, (grad_b if bias is not None else None)
