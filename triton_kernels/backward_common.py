"""What the three Triton backward variants share: the per-row terms and the logit-gradient
tile (``@triton.jit`` helpers), the backward's inputs as one bundle, the gradient buffers
and the kernels' common arguments. The variants: ``backward_gemm.py`` (the default),
``backward.py`` (recompute), ``backward_atomic.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_margin.kernel_params import KernelParams, SavedTensors, UpstreamGrads
from fused_margin.spec import NonTargetKind

from .common import IGNORED, KIND_CURRICULAR, _non_target, _non_target_grad, dot_in_fp32

__all__ = ["BackwardInputs", "gradient_buffers", "kernel_arguments", "zero_gradients"]


@triton.jit
def _load_row_terms(
    offs_b, mask_b,
    labels_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr, row_scale_ptr, threshold_ptr, B,
    BLOCK_B: tl.constexpr, NORMALIZE_X: tl.constexpr, KIND: tl.constexpr,
):
    """The rows' saved and upstream terms; ``threshold`` and ``t`` are CurricularFace's
    per-row constants (rows 0 and 1 of ``row_threshold``), zeros for other kinds."""
    labels = tl.load(labels_ptr + offs_b, mask=mask_b, other=-1)
    lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
    grad_lse = tl.load(grad_lse_ptr + offs_b, mask=mask_b, other=0.0)
    grad_target = tl.load(grad_target_ptr + offs_b, mask=mask_b, other=0.0)
    grad_sum = tl.load(grad_sum_ptr + offs_b, mask=mask_b, other=0.0)
    if NORMALIZE_X:
        row_scale = tl.load(row_scale_ptr + offs_b, mask=mask_b, other=0.0)
    else:
        row_scale = tl.full((BLOCK_B,), 1.0, dtype=tl.float32)
    if KIND == KIND_CURRICULAR:
        threshold = tl.load(threshold_ptr + offs_b, mask=mask_b, other=0.0)
        t = tl.load(threshold_ptr + B + offs_b, mask=mask_b, other=0.0)
    else:
        threshold = tl.zeros((BLOCK_B,), dtype=tl.float32)
        t = tl.zeros((BLOCK_B,), dtype=tl.float32)
    return labels, lse, grad_lse, grad_target, grad_sum, row_scale, threshold, t


@triton.jit
def _logit_grads(
    u, offs_c, mask_c, mask_b, bias,
    labels, lse, grad_lse, grad_target, grad_sum, threshold, t,
    scale, alpha, delta, margin, KIND: tl.constexpr,
):
    """``(dz, dU)`` for a tile: ``dz = g_lse p + g_sum`` on the negatives (0 elsewhere),
    ``dU = dz s T'(u)`` plus ``g_target`` at the target column."""
    z = scale * _non_target(u, threshold[:, None], alpha, delta, margin, t[:, None], KIND) + bias[None, :]
    valid = mask_b[:, None] & mask_c[None, :]
    is_target = valid & (offs_c[None, :] == labels[:, None])
    # an ignored row has no negatives (and no target): dU = 0, whatever its logits hold
    negative = valid & (offs_c[None, :] != labels[:, None]) & (labels > IGNORED)[:, None]
    # lse_neg = -inf: the row has no negative. Shift by 0 there (never -inf - -inf), and
    # exponentiate only negatives (the target's z may exceed lse_neg by far: exp = inf).
    # A NaN lse_neg is not "no negative": it propagates.
    has_negative = lse != float("-inf")
    shift = tl.where(has_negative, lse, 0.0)
    prob = tl.exp(tl.where(negative & has_negative[:, None], z - shift[:, None], float("-inf")))
    dz = tl.where(negative, grad_lse[:, None] * prob + grad_sum[:, None], 0.0)
    du = tl.where(negative, dz * scale * _non_target_grad(u, threshold[:, None], alpha, margin, t[:, None], KIND), 0.0)
    du += tl.where(is_target, grad_target[:, None], 0.0)
    return dz, du


class BackwardInputs:
    """What every Triton backward takes: the backend contract's backward bundles (see
    :mod:`fused_margin.kernel_params`), their fields readable by name."""

    def __init__(self, grads: UpstreamGrads, saved: SavedTensors, params: KernelParams) -> None:
        self.grads, self.saved, self.params = grads, saved, params

    def __getattr__(self, name: str):
        # only reached for names that are not attributes: a field of one of the bundles
        for bundle in (self.__dict__.get("grads"), self.__dict__.get("saved")):
            if bundle is not None and hasattr(bundle, name):
                return getattr(bundle, name)
        raise AttributeError(name)


def zero_gradients(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradients of a problem without rows or without classes: zeros."""
    return torch.zeros_like(x), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias)


def gradient_buffers(
    weight: torch.Tensor, bias: torch.Tensor | None, class_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(grad_w, grad_bias)`` for kernels that write each weight row in use once: dW in
    W's dtype (zeros first with ``class_index``: the rows not in use must read 0) and an
    fp32 bias gradient (zeros: classes not in use get 0)."""
    grad_w = torch.empty_like(weight) if class_index is None else torch.zeros_like(weight)
    grad_bias = None if bias is None else torch.zeros(bias.shape[0], device=weight.device, dtype=torch.float32)
    return grad_w, grad_bias


def kernel_arguments(
    inputs: BackwardInputs,
    *,
    input_precision: str,
    grad_dot_fp32: bool,
) -> tuple[tuple[torch.Tensor, ...], tuple[float, ...], dict]:
    """What every backward kernel takes, in its order: the 12 input pointers (the six
    (B,)-or-(C,) vectors as contiguous fp32; the first of them stands in for absent
    optional tensors, whose pointers a constexpr flag leaves unread), the transform's
    scalars, and the constexpr flags."""
    x, weight, bias, class_index, row_threshold, params = (
        inputs.x, inputs.weight, inputs.bias, inputs.class_index, inputs.row_threshold, inputs.params
    )
    if params.kind == NonTargetKind.CURRICULAR and (row_threshold is None or row_threshold.shape != (2, x.shape[0])):
        raise ValueError(f"the CurricularFace transform needs row_threshold of shape (2, {x.shape[0]})")
    f32 = torch.float32
    vectors = [
        t.to(f32).contiguous()
        for t in (inputs.grad_lse, inputs.grad_target_u, inputs.grad_sum, inputs.lse_neg, inputs.row_scale,
                  inputs.col_scale)
    ]
    dummy = vectors[0]
    tensor_args = (
        x, weight, inputs.labels.contiguous(),
        dummy if bias is None else bias.contiguous(),
        dummy if class_index is None else class_index.contiguous(),
        dummy if row_threshold is None else row_threshold.to(f32).contiguous(),
        *vectors,
    )
    scalars = (float(params.scale), float(params.alpha), float(params.delta), float(params.margin))
    fp32_operands = dot_in_fp32(x.dtype, weight.dtype)
    meta = dict(
        K=params.num_subcenters, KIND=int(params.kind), NORMALIZE_X=params.normalize_x,
        NORMALIZE_W=params.normalize_w, HAS_BIAS=bias is not None, HAS_INDEX=class_index is not None,
        DOT_FP32=fp32_operands, GRAD_DOT_FP32=fp32_operands or grad_dot_fp32, INPUT_PRECISION=input_precision,
    )
    return tensor_args, scalars, meta
