"""What the three Triton backward variants share: the per-row terms and the logit-gradient
tile (``@triton.jit`` helpers), the backward's inputs as one bundle, the gradient buffers
and the kernels' common arguments. The variants: ``backward_gemm.py`` (the default),
``backward.py`` (recompute), ``backward_atomic.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from fused_margin.kernel_params import KernelParams, SavedTensors, UpstreamGrads
from fused_margin.spec import NonTargetKind

from .common import IGNORED, _curricular_terms, _non_target, _non_target_grad, _subcenter_cosines, dot_in_fp32

__all__ = ["BackwardInputs", "KernelArguments", "gradient_buffers", "kernel_arguments", "zero_gradients"]


@triton.jit
def _load_row_terms(
    offs_b, mask_b,
    labels_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr, row_scale_ptr, threshold_ptr, B,
    BLOCK_B: tl.constexpr, NORMALIZE_X: tl.constexpr, KIND: tl.constexpr,
):
    """``(row_scale, row_terms)``: the rows' saved scales (ones without ``NORMALIZE_X``) and,
    as one tuple for :func:`_tile_grads`, their saved and upstream terms ``(labels,
    lse, grad_lse, grad_target, grad_sum, threshold, t)`` (``threshold`` and ``t``:
    :func:`~.common._curricular_terms`)."""
    labels = tl.load(labels_ptr + offs_b, mask=mask_b, other=-1)
    lse = tl.load(lse_ptr + offs_b, mask=mask_b, other=0.0)
    grad_lse = tl.load(grad_lse_ptr + offs_b, mask=mask_b, other=0.0)
    grad_target = tl.load(grad_target_ptr + offs_b, mask=mask_b, other=0.0)
    grad_sum = tl.load(grad_sum_ptr + offs_b, mask=mask_b, other=0.0)
    if NORMALIZE_X:
        row_scale = tl.load(row_scale_ptr + offs_b, mask=mask_b, other=0.0)
    else:
        row_scale = tl.full((BLOCK_B,), 1.0, dtype=tl.float32)
    threshold, t = _curricular_terms(threshold_ptr, offs_b, mask_b, B, BLOCK_B, KIND)
    return row_scale, (labels, lse, grad_lse, grad_target, grad_sum, threshold, t)


@triton.jit
def _tile_grads(
    # the logit GEMM's operands (see common._dot_tile) and the saved column scales
    operands, col_scale_ptr,
    # the tile: batch rows, their scales and terms (_load_row_terms); classes (positions
    # among those in use), their class ids and bias (common._class_block)
    offs_b, mask_b, row_scale, row_terms, offs_c, mask_c, classes, bias,
    # the transform's scalars (scale, alpha, delta, margin)
    transform,
    # meta
    K: tl.constexpr, KIND: tl.constexpr, NORMALIZE_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``(u, best, dz, dU)`` for a tile: ``u`` recomputed and the sub-center ``best``
    that attained it (:func:`~.common._subcenter_cosines`); ``dz = g_lse p + g_sum`` on
    the negatives (0 elsewhere), ``dU = dz s T'(u)`` plus ``g_target`` at the target
    column."""
    labels, lse, grad_lse, grad_target, grad_sum, threshold, t = row_terms
    scale, alpha, delta, margin = transform
    u, best = _subcenter_cosines(
        operands, col_scale_ptr, offs_b, offs_c, classes, mask_b, mask_c, row_scale, False,
        K, NORMALIZE_W, False, BLOCK_B, BLOCK_C, BLOCK_D, DOT_FP32, INPUT_PRECISION,
    )
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
    return u, best, dz, du


@dataclass(frozen=True)
class BackwardInputs:
    """What every Triton backward takes: the backend contract's backward bundles (see
    :mod:`fused_margin.kernel_params`), read through their named fields."""

    grads: UpstreamGrads
    saved: SavedTensors
    params: KernelParams


def zero_gradients(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, fused_update: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of a problem without rows or without classes: zeros. With
    ``fused_update`` there is no gradient of W's shape (None), as in
    :func:`gradient_buffers`."""
    grad_w = None if fused_update else torch.zeros_like(weight)
    return torch.zeros_like(x), grad_w, None if bias is None else torch.zeros_like(bias)


def gradient_buffers(
    weight: torch.Tensor, bias: torch.Tensor | None, class_index: torch.Tensor | None, *, fused_update: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad_w, grad_bias)`` for kernels that write each weight row in use once: dW in
    W's dtype (zeros first with ``class_index``: the rows not in use must read 0) and an
    fp32 bias gradient (zeros: classes not in use get 0). With ``fused_update`` there is
    no gradient of W's shape (None): the dW kernel updates W instead."""
    if fused_update:
        grad_w = None
    else:
        grad_w = torch.empty_like(weight) if class_index is None else torch.zeros_like(weight)
    grad_bias = None if bias is None else torch.zeros(bias.shape[0], device=weight.device, dtype=torch.float32)
    return grad_w, grad_bias


@dataclass(frozen=True)
class KernelArguments:
    """The arguments the backward kernels share, each field named as the kernels name
    the parameter (:meth:`for_kernel` passes those a kernel declares, by keyword). The
    six (B,)-or-(C,) vectors are contiguous fp32; an absent optional tensor is None,
    from which ``triton.heuristics`` (:data:`~.common.optional_inputs`) derives the kernel's
    ``HAS_BIAS`` / ``HAS_INDEX``, and ``threshold_ptr`` is None unless the transform
    reads it (CurricularFace)."""

    x_ptr: torch.Tensor
    w_ptr: torch.Tensor
    labels_ptr: torch.Tensor
    bias_ptr: torch.Tensor | None
    class_index_ptr: torch.Tensor | None
    threshold_ptr: torch.Tensor | None
    grad_lse_ptr: torch.Tensor
    grad_target_ptr: torch.Tensor
    grad_sum_ptr: torch.Tensor
    lse_ptr: torch.Tensor
    row_scale_ptr: torch.Tensor
    col_scale_ptr: torch.Tensor
    stride_xb: int
    stride_xd: int
    stride_wr: int
    stride_wd: int
    scale: float
    alpha: float
    delta: float
    margin: float
    K: int
    KIND: int
    NORMALIZE_X: bool
    NORMALIZE_W: bool
    #: the logit GEMM multiplies fp32 operands (mixed or fp32 dtypes)
    DOT_FP32: bool
    #: the gradient GEMMs do
    GRAD_DOT_FP32: bool
    INPUT_PRECISION: str

    def for_kernel(self, kernel) -> dict:
        """The fields among ``kernel``'s parameters (a ``@triton.jit`` function or its
        ``triton.heuristics`` wrapper), by name."""
        names = set(kernel.arg_names)
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in names}


def kernel_arguments(inputs: BackwardInputs, *, input_precision: str, grad_dot_fp32: bool) -> KernelArguments:
    """The shared arguments of ``inputs``' backward kernels."""
    grads, saved, params = inputs.grads, inputs.saved, inputs.params
    x, weight, row_threshold = saved.x, saved.weight, saved.row_threshold
    curricular = params.kind == NonTargetKind.CURRICULAR
    if curricular and (row_threshold is None or row_threshold.shape != (2, x.shape[0])):
        raise ValueError(f"the CurricularFace transform needs row_threshold of shape (2, {x.shape[0]})")

    def vector(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).contiguous()

    fp32_operands = dot_in_fp32(x.dtype, weight.dtype)
    return KernelArguments(
        x_ptr=x, w_ptr=weight, labels_ptr=saved.labels.contiguous(),
        bias_ptr=None if saved.bias is None else saved.bias.contiguous(),
        class_index_ptr=None if saved.class_index is None else saved.class_index.contiguous(),
        threshold_ptr=vector(row_threshold) if curricular else None,
        grad_lse_ptr=vector(grads.grad_lse), grad_target_ptr=vector(grads.grad_target_u),
        grad_sum_ptr=vector(grads.grad_sum), lse_ptr=vector(saved.lse_neg), row_scale_ptr=vector(saved.row_scale),
        col_scale_ptr=vector(saved.col_scale),
        stride_xb=x.stride(0), stride_xd=x.stride(1), stride_wr=weight.stride(0), stride_wd=weight.stride(1),
        scale=float(params.scale), alpha=float(params.alpha), delta=float(params.delta), margin=float(params.margin),
        K=params.num_subcenters, KIND=int(params.kind), NORMALIZE_X=params.normalize_x,
        NORMALIZE_W=params.normalize_w, DOT_FP32=fp32_operands, GRAD_DOT_FP32=fp32_operands or grad_dot_fp32,
        INPUT_PRECISION=input_precision,
    )
