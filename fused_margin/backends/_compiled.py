"""What the two compiled backends ('cpu', 'cuda') share: both call the one pair of
extension ops ``torch.ops.fused_margin_C.margin_lse_fwd`` / ``margin_lse_bwd`` (and
``margin_lse_bwd_update``, the backward with a fused optimizer step), and
PyTorch's dispatcher picks the CPU or CUDA kernel from the tensors' device. This module
defines no ``BACKEND``, so the registry does not list it."""

from __future__ import annotations

from torch import Tensor

from .. import _ext
from ..kernel_params import KernelParams, values
from ..optim.update import new_guard
from . import Backend


class ExtensionBackend(Backend):
    #: the backward applies a fused optimizer's update itself (csrc/optim_update.h)
    fused_updates = True
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
            x, weight, labels, bias, class_index, row_threshold, *values(params), self.chunk_size,
        )

    def backward(
        self, grads, saved, params: KernelParams, update=None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        # the extension's flat schema: the bundles' fields in order, then (with a fused
        # optimizer) its state, scalars and guard, then the chunk size
        if update is not None:
            guard = update.guard if update.guard is not None else new_guard(saved.weight.device)
            grad_x, grad_b = _ext.ops().margin_lse_bwd_update(
                *values(grads), *values(saved), *values(params), list(update.state), list(update.scalars()),
                guard, self.chunk_size,
            )
            return grad_x, None, (grad_b if saved.bias is not None else None)
        grad_x, grad_w, grad_b = _ext.ops().margin_lse_bwd(
            *values(grads), *values(saved), *values(params), self.chunk_size
        )
        return grad_x, grad_w, (grad_b if saved.bias is not None else None)
