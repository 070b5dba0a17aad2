"""What the forward refuses when a fused optimizer updates the weight: what would make
the in-backward update silently wrong."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_fused_forward", "check_target_reads_no_weight"]


def check_fused_forward(weight: Tensor, backend: str, device_type: str) -> None:
    """``backend='eager'`` (plain autograd: the weight would get a gradient and no
    update) and fp16 autocast (it goes with GradScaler, whose scaled gradients the update
    cannot see unscaled) are refused for a weight with an optimizer in the backward."""
    if backend == "eager":
        raise ValueError(
            "backend='eager' cannot update a weight that has an optimizer in the backward (plain autograd forms "
            "its gradient instead); use a fused backend ('auto', 'reference', 'cpu', 'cuda', 'triton')"
        )
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16:
        raise RuntimeError(
            "fp16 autocast is not supported with an optimizer in the backward (it needs GradScaler, whose scaled "
            "gradients would update the weight unscaled); use bf16 autocast or fp32"
        )


def check_target_reads_no_weight(ctx) -> None:
    """A target transform that reads the target rows' norms (``ctx.weight_norm``: heads
    that do not normalize the weight) gives the weight a second gradient, outside the
    fused op, that its optimizer in the backward would never apply: refused."""
    norm = getattr(ctx, "_weight_norm", None)
    if norm is not None and norm.requires_grad:
        raise ValueError(
            "this head's target reads the class weights' norms (normalize_weight=False), a gradient path to the "
            "weight outside the fused op: an optimizer in the backward cannot update such a weight; use a plain "
            "optimizer for it"
        )
