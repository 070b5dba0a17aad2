"""Forward: ``lse_neg, target_u, sum_neg, argmax`` per row without the (B, C) logits.

One program owns a block of ``block_b`` rows and a contiguous range of class blocks
(its *split*). It computes each (rows x classes) logit tile with ``tl.dot`` over D,
folding the normalization in as row/column scales (the weight rows' sums of squares
come from the same loads as the dot: no normalized copy of W and no second pass over
it), applies the non-target transform, and keeps per row an online logsumexp over the
non-target columns, their sum, the target's ``u`` and the running argmax. Splits of
one row block write (splits, B) partials that the launcher combines in a fixed order,
so the result does not depend on scheduling. Extra memory: 6 x splits x B values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_margin.kernel_params import KernelParams
from fused_margin.spec import NonTargetKind

from .common import (
    IGNORED,
    NORM_EPS,
    TileConfig,
    _block_range,
    _class_block,
    _curricular_terms,
    _load_tile,
    _non_target,
    _subcenter_cosines,
    default_tiles,
    dot_in_fp32,
    launch,
    optional_inputs,
)

__all__ = ["margin_lse_fwd"]

# rows of the fp32 partials tensor
_MAX = tl.constexpr(0)
_SUMEXP = tl.constexpr(1)
_SUM = tl.constexpr(2)
_TARGET = tl.constexpr(3)
_BEST = tl.constexpr(4)


@optional_inputs
@triton.jit
def _margin_lse_fwd_kernel(
    # pointers: inputs
    x_ptr, w_ptr, labels_ptr, bias_ptr, class_index_ptr, threshold_ptr,
    # pointers: outputs. partial_ptr: fp32 (5, splits, B) (running max, sum of exp,
    # sum, target u, best plain logit); partial_idx_ptr: int32 (splits, B) argmax
    partial_ptr, partial_idx_ptr, row_scale_ptr, col_scale_ptr,
    # sizes
    B, C, D, blocks_per_split,
    # strides
    stride_xb, stride_xd, stride_wr, stride_wd,
    # scalars of the transform
    scale, alpha, delta, margin,
    # meta
    K: tl.constexpr, KIND: tl.constexpr, NORMALIZE_X: tl.constexpr, NORMALIZE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    offs_b, mask_b = _block_range(pid_b, BLOCK_B, B)
    labels = tl.load(labels_ptr + offs_b, mask=mask_b, other=-1)

    # 1/||x_b||: B x D work, negligible next to the B x C x D of the tiles.
    if NORMALIZE_X:
        offs_d = tl.arange(0, BLOCK_D)
        sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            xt = _load_tile(x_ptr, offs_b, d, mask_b, d < D, stride_xb, stride_xd).to(tl.float32)
            sq += tl.sum(xt * xt, axis=1)
        row_scale = 1.0 / tl.maximum(tl.sqrt(sq), NORM_EPS)
        if split == 0:
            tl.store(row_scale_ptr + offs_b, row_scale, mask=mask_b)
    else:
        row_scale = tl.full((BLOCK_B,), 1.0, dtype=tl.float32)
    threshold, t = _curricular_terms(threshold_ptr, offs_b, mask_b, B, BLOCK_B, KIND)
    operands = (x_ptr, w_ptr, D, stride_xb, stride_xd, stride_wr, stride_wd)

    run_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    run_sumexp = tl.zeros((BLOCK_B,), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    target_u = tl.zeros((BLOCK_B,), dtype=tl.float32)
    best_val = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_B,), dtype=tl.int32)

    for cb in range(0, blocks_per_split):  # this split's class blocks
        offs_c, mask_c = _block_range(split * blocks_per_split + cb, BLOCK_C, C)
        classes, bias = _class_block(offs_c, mask_c, class_index_ptr, bias_ptr, BLOCK_C, HAS_INDEX, HAS_BIAS)
        # the column scales from the dot's loads: every row block computes the same ones,
        # the first one saves them
        u, _ = _subcenter_cosines(
            operands, col_scale_ptr, offs_b, offs_c, classes, mask_b, mask_c, row_scale, pid_b == 0,
            K, NORMALIZE_W, True, BLOCK_B, BLOCK_C, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        )
        z = scale * _non_target(u, threshold[:, None], alpha, delta, margin, t[:, None], KIND) + bias[None, :]

        is_target = (offs_c[None, :] == labels[:, None]) & mask_c[None, :]
        # an ignored row has no negatives: no softmax term, lse_neg = -inf
        negative = mask_c[None, :] & (offs_c[None, :] != labels[:, None]) & (labels > IGNORED)[:, None]
        target_u += tl.sum(tl.where(is_target, u, 0.0), axis=1)
        run_sum += tl.sum(tl.where(negative, z, 0.0), axis=1)

        # Online logsumexp. A row can have no negative yet (its max is -inf): shift by 0
        # there so that no -inf - -inf = NaN appears.
        z_neg = tl.where(negative, z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z_neg, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sumexp = run_sumexp * tl.exp(run_max - shift) + tl.sum(tl.exp(z_neg - shift[:, None]), axis=1)
        run_max = new_max
        # A NaN negative must make lse_neg NaN; max reductions on a GPU skip NaN, so it is
        # carried in the sum of exponentials (NaN stays NaN through the rescaling above).
        has_nan = tl.max(tl.where(negative & (z != z), 1, 0), axis=1) > 0
        run_sumexp = tl.where(has_nan, float("nan"), run_sumexp)

        # argmax of the margin-free logits over all classes, ties to the lowest index
        plain = tl.where(mask_c[None, :], scale * u + bias[None, :], float("-inf"))
        tile_best = tl.max(plain, axis=1)
        tile_idx = tl.min(tl.where(plain == tile_best[:, None], offs_c[None, :], 2147483647), axis=1)
        take = tile_best > best_val
        best_val = tl.where(take, tile_best, best_val)
        best_idx = tl.where(take, tile_idx, best_idx)

    stride_part = num_splits * B
    out = partial_ptr + split * B + offs_b
    tl.store(out + _MAX * stride_part, run_max, mask=mask_b)
    tl.store(out + _SUMEXP * stride_part, run_sumexp, mask=mask_b)
    tl.store(out + _SUM * stride_part, run_sum, mask=mask_b)
    tl.store(out + _TARGET * stride_part, target_u, mask=mask_b)
    tl.store(out + _BEST * stride_part, best_val, mask=mask_b)
    tl.store(partial_idx_ptr + split * B + offs_b, best_idx, mask=mask_b)


def num_classes_in_use(weight: torch.Tensor, class_index: torch.Tensor | None, num_subcenters: int) -> int:
    return weight.shape[0] // num_subcenters if class_index is None else class_index.shape[0]


def margin_lse_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    class_index: torch.Tensor | None,
    row_threshold: torch.Tensor | None,
    params: KernelParams,
    *,
    input_precision: str = "ieee",
    tiles: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of :mod:`fused_margin.kernel_params` on one device.

    Args:
        x: (B, D) fp32/bf16/fp16; weight: (C_all*K, D) fp32/bf16/fp16; labels: (B,)
            int64 (a value outside [0, C) means "no target"); bias: (C_all,) or None;
            class_index: (C,) int64 or None; row_threshold: (2, B) (CurricularFace only: threshold, t).
        input_precision: ``tl.dot`` precision for fp32 operands: 'ieee', 'tf32', 'tf32x3'.
        tiles: tile sizes (default: :func:`default_tiles`).

    Returns ``(lse_neg, target_u, sum_neg, argmax, row_scale, col_scale)``: fp32 (B,)
    x3, int64 (B,), fp32 (B,), fp32 (C*K,).
    """
    k = params.num_subcenters
    batch, dim = x.shape
    num_classes = num_classes_in_use(weight, class_index, k)
    if weight.shape[1] != dim:
        raise ValueError(f"weight must have shape (rows, {dim}), got {tuple(weight.shape)}")
    if labels.shape != (batch,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}")
    curricular = params.kind == NonTargetKind.CURRICULAR
    if curricular and (row_threshold is None or row_threshold.shape != (2, batch)):
        raise ValueError(f"the CurricularFace transform needs row_threshold of shape (2, {batch})")
    device = x.device
    f32 = torch.float32
    row_scale = torch.empty(batch, device=device, dtype=f32) if params.normalize_x else torch.ones(
        batch, device=device, dtype=f32
    )
    col_scale = torch.empty(num_classes * k, device=device, dtype=f32) if params.normalize_w else torch.ones(
        num_classes * k, device=device, dtype=f32
    )
    if batch == 0:
        empty = x.new_empty(0, dtype=f32)
        if params.normalize_w:  # no row block ran to save the scales
            rows = weight if class_index is None else weight.reshape(-1, k, dim)[class_index].reshape(-1, dim)
            col_scale = 1.0 / torch.linalg.vector_norm(rows.to(f32), dim=1).clamp_min(1e-12)
        return empty, empty.clone(), empty.clone(), x.new_empty(0, dtype=torch.int64), row_scale, col_scale

    fp32_operands = dot_in_fp32(x.dtype, weight.dtype)
    tiles = tiles or default_tiles(
        "forward", batch, num_classes, dim, device, fp32_operands=fp32_operands, input_precision=input_precision
    )
    row_blocks = triton.cdiv(batch, tiles.block_b)
    class_blocks = triton.cdiv(num_classes, tiles.block_c)
    blocks_per_split = triton.cdiv(class_blocks, max(1, min(tiles.splits, class_blocks)))
    splits = triton.cdiv(class_blocks, blocks_per_split)

    partial = torch.empty((5, splits, batch), device=device, dtype=f32)
    partial_idx = torch.empty((splits, batch), device=device, dtype=torch.int32)
    # an absent optional tensor is None (HAS_BIAS / HAS_INDEX follow from the pointers),
    # and so is the threshold unless the transform reads it (CurricularFace)
    launch(
        _margin_lse_fwd_kernel, (row_blocks, splits), tiles,
        x, weight, labels.contiguous(),
        None if bias is None else bias.contiguous(),
        None if class_index is None else class_index.contiguous(),
        row_threshold.to(f32).contiguous() if curricular else None,
        partial, partial_idx, row_scale, col_scale,
        batch, num_classes, dim, blocks_per_split,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        float(params.scale), float(params.alpha), float(params.delta), float(params.margin),
        K=k, KIND=int(params.kind), NORMALIZE_X=params.normalize_x, NORMALIZE_W=params.normalize_w,
        BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_D=tiles.block_d,
        DOT_FP32=fp32_operands, INPUT_PRECISION=input_precision,
    )

    # Combine the splits (O(splits * B)), in split order.
    run_max, run_sumexp, run_sum, target_parts, best_parts = partial.unbind(0)
    top = run_max.amax(dim=0)
    no_negative = top == float("-inf")
    shift = torch.where(no_negative, torch.zeros_like(top), top)
    total = (run_sumexp * torch.exp(run_max - shift)).sum(dim=0)
    # -inf only for a row without negatives; a NaN negative (a NaN sum) gives NaN
    lse_neg = torch.where(no_negative & ~total.isnan(), top, shift + torch.log(total))
    # torch.argmax returns the first maximal split: the lowest class on ties
    best_split = best_parts.argmax(dim=0, keepdim=True)
    argmax = partial_idx.gather(0, best_split).squeeze(0).to(torch.int64)
    return lse_neg, target_parts.sum(dim=0), run_sum.sum(dim=0), argmax, row_scale, col_scale
