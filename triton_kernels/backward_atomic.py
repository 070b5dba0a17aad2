"""Backward, fast mode: one recomputation of the logits, gradients by atomic adds.

``backward.py`` recomputes every logit tile twice (once for ``dx``, once for ``dW``) and
once more per ``block_do`` slice of D: at least 8 B C D flops of backward, against
6 B C D for recompute + dX + dW. This kernel does the minimum (as ``backward_gemm.py``
does, through a workspace instead of atomics). Each program owns one (row block, class block) tile:

1. recompute ``u`` over all of D (and the K sub-centers), then ``dU`` (as ``backward.py``);
2. for each slice of D: ``dU (Q W)`` for the tile's rows and ``dU^T (R x)`` for its
   classes, with the folded-normalization terms of this tile (``rho`` and ``kappa``
   summed over the tile only: both gradients are linear in them), added with fp32
   atomics into ``grad_x`` (B, D) and ``grad_w`` (rows, D).

The cost is order: fp32 atomics make the result depend on the order in which programs
finish (last-bit differences from run to run), so the reproducible ``backward_gemm.py``
is the default (``backward_mode='atomic'`` picks this one). ``grad_w`` accumulates in fp32: in place when W is fp32 (fp32
master weights, the usual mixed-precision set-up), else in an fp32 buffer of W's shape.
Programs are ordered class block by class block, so the row blocks that share a W tile
run side by side and read it from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backward_common import BackwardInputs, _load_row_terms, _tile_grads, kernel_arguments
from .common import (
    TileConfig,
    _block_range,
    _class_block,
    _load_tile,
    _mma,
    _routed,
    default_tiles,
    launch,
    optional_inputs,
)
from .lse_forward import num_classes_in_use

__all__ = ["margin_lse_bwd_atomic"]


@optional_inputs
@triton.jit
def _margin_lse_bwd_atomic_kernel(
    # pointers: inputs
    x_ptr, w_ptr, labels_ptr, bias_ptr, class_index_ptr, threshold_ptr,
    # pointers: upstream gradients (B,) and saved forward results
    grad_lse_ptr, grad_target_ptr, grad_sum_ptr, lse_ptr, row_scale_ptr, col_scale_ptr,
    # pointers: fp32 accumulators grad_x (B, D), grad_w (rows of W, D), grad_bias (C_all,)
    grad_x_ptr, grad_w_ptr, grad_bias_ptr,
    # sizes
    B, C, D,
    # strides (the accumulators are contiguous)
    stride_xb, stride_xd, stride_wr, stride_wd,
    # scalars of the transform
    scale, alpha, delta, margin,
    # meta
    K: tl.constexpr, KIND: tl.constexpr, NORMALIZE_X: tl.constexpr, NORMALIZE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_FP32: tl.constexpr, GRAD_DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(B, BLOCK_B)
    pid_c = pid // row_blocks  # class-block-major: the row blocks of one W tile run together
    pid_b = pid % row_blocks
    offs_b, mask_b = _block_range(pid_b, BLOCK_B, B)
    row_scale, row_terms = _load_row_terms(
        offs_b, mask_b, labels_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr, row_scale_ptr,
        threshold_ptr, B, BLOCK_B, NORMALIZE_X, KIND,
    )
    offs_c, mask_c = _block_range(pid_c, BLOCK_C, C)
    classes, bias = _class_block(offs_c, mask_c, class_index_ptr, bias_ptr, BLOCK_C, HAS_INDEX, HAS_BIAS)
    operands = (x_ptr, w_ptr, D, stride_xb, stride_xd, stride_wr, stride_wd)
    u, best, dz, du = _tile_grads(
        operands, col_scale_ptr, offs_b, mask_b, row_scale, row_terms, offs_c, mask_c, classes, bias,
        (scale, alpha, delta, margin), K, KIND, NORMALIZE_W, BLOCK_B, BLOCK_C, BLOCK_D, DOT_FP32, INPUT_PRECISION,
    )
    if HAS_BIAS:
        tl.atomic_add(grad_bias_ptr + classes, tl.sum(dz, axis=0), mask=mask_c, sem="relaxed")
    # this tile's share of rho_b = sum_j dU_bj u_bj (dx's normalization term)
    rho = tl.sum(du * u, axis=1)
    du_r = du * row_scale[:, None]  # dW's left operand: dU^T (R x)

    offs_b64 = offs_b.to(tl.int64)
    for d0 in range(0, D, BLOCK_DO):
        offs_do = d0 + tl.arange(0, BLOCK_DO)
        mask_do = offs_do < D
        xt = _load_tile(x_ptr, offs_b, offs_do, mask_b, mask_do, stride_xb, stride_xd)
        gx = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
        for k in range(K):
            w_rows = classes * K + k
            wt = _load_tile(w_ptr, w_rows, offs_do, mask_c, mask_do, stride_wr, stride_wd)
            routed = _routed(du, best, k, K)
            routed_r = _routed(du_r, best, k, K)
            if NORMALIZE_W:
                q = tl.load(col_scale_ptr + offs_c.to(tl.int64) * K + k, mask=mask_c, other=0.0)
                gx = _mma(routed * q[None, :], wt, gx, GRAD_DOT_FP32, INPUT_PRECISION)
                gw = _mma(tl.trans(routed_r), xt, tl.zeros((BLOCK_C, BLOCK_DO), dtype=tl.float32),
                          GRAD_DOT_FP32, INPUT_PRECISION)
                kappa = tl.sum(routed * u, axis=0)
                gw = q[:, None] * (gw - (kappa * q)[:, None] * wt.to(tl.float32))
            else:
                gx = _mma(routed, wt, gx, GRAD_DOT_FP32, INPUT_PRECISION)
                gw = _mma(tl.trans(routed_r), xt, tl.zeros((BLOCK_C, BLOCK_DO), dtype=tl.float32),
                          GRAD_DOT_FP32, INPUT_PRECISION)
            tl.atomic_add(
                grad_w_ptr + w_rows[:, None] * D + offs_do[None, :], gw,
                mask=mask_c[:, None] & mask_do[None, :], sem="relaxed",
            )
        if NORMALIZE_X:
            gx = row_scale[:, None] * (gx - (rho * row_scale)[:, None] * xt.to(tl.float32))
        tl.atomic_add(
            grad_x_ptr + offs_b64[:, None] * D + offs_do[None, :], gx,
            mask=mask_b[:, None] & mask_do[None, :], sem="relaxed",
        )


def margin_lse_bwd_atomic(
    inputs: BackwardInputs,
    *,
    input_precision: str = "ieee",
    grad_dot_fp32: bool = False,
    tiles: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward of :mod:`fused_margin.kernel_params`, like
    :func:`~fused_margin.triton_kernels.backward.margin_lse_bwd` (same arguments and
    results) but with one recomputation and atomic accumulation: not bitwise
    reproducible. ``tiles``: :class:`TileConfig` of the one kernel (default
    :func:`default_tiles` for 'atomic')."""
    saved, params = inputs.saved, inputs.params
    x, weight, bias, class_index = saved.x, saved.weight, saved.bias, saved.class_index
    batch, dim = x.shape
    num_classes = num_classes_in_use(weight, class_index, params.num_subcenters)
    device = x.device
    f32 = torch.float32
    grad_x = torch.zeros((batch, dim), device=device, dtype=f32)
    grad_w = torch.zeros(weight.shape, device=device, dtype=f32)
    grad_bias = None if bias is None else torch.zeros(bias.shape[0], device=device, dtype=f32)
    if batch > 0 and num_classes > 0:
        args = kernel_arguments(inputs, input_precision=input_precision, grad_dot_fp32=grad_dot_fp32)
        tiles = tiles or default_tiles(
            "atomic", batch, num_classes, dim, device,
            fp32_operands=args.GRAD_DOT_FP32, input_precision=input_precision,
        )
        grid = (triton.cdiv(batch, tiles.block_b) * triton.cdiv(num_classes, tiles.block_c),)
        launch(
            _margin_lse_bwd_atomic_kernel, grid, tiles,
            **args.for_kernel(_margin_lse_bwd_atomic_kernel),
            grad_x_ptr=grad_x, grad_w_ptr=grad_w, grad_bias_ptr=grad_bias, B=batch, C=num_classes, D=dim,
            BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_D=tiles.block_d, BLOCK_DO=tiles.block_do,
        )
    grad_b = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b
