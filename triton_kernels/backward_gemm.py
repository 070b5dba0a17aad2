"""Backward, GEMM mode: one recomputation of the logits, gradients by two plain GEMMs.

``backward.py`` recomputes the logit tiles in each of its two kernels and once more per
``block_do`` slice of D (at least 8 B C D flops of backward); ``backward_atomic.py``
recomputes once but adds both gradients with fp32 atomics (not reproducible). This mode
recomputes once *and* writes each gradient element from one program, by going through
a bounded workspace, one chunk of classes at a time:

1. ``_dot_grad_kernel`` (a program per row block x class block of the chunk) recomputes
   ``u`` over all of D, forms ``dU`` (as ``backward.py``) and writes
   ``M = dU * r * q``, the gradient of the loss with respect to the raw dot products
   ``<x_b, w_i>`` (one column per weight row, so per sub-center), into a (B, chunk rows)
   workspace in the GEMM operand dtype; beside it the tile's partial sums of the
   normalization terms (``rho`` per row, ``kappa`` per weight row) and of the bias
   gradient.
2. ``_gemm_dx_kernel`` adds ``M W_chunk`` into fp32 split-K partials (splits, B, D) that
   persist across chunks (each element has one writer per chunk, chunks run in order).
3. ``_gemm_dw_kernel`` computes ``M^T x`` for the chunk's weight rows over the whole
   batch and writes ``dW = M^T x - kappa q^2 w`` once, in W's dtype.

At the end ``dx = sum_splits(partials) - rho r^2 x``. Flops: 2BCD (recompute) + 2BCD +
2BCD, the minimum for a backward that does not keep the logits; memory beyond the
gradients: the workspace (``GEMM_WORKSPACE_BYTES``) plus the dx partials
(``DX_WORKSPACE_BYTES``) plus O(B + C) vectors. Weight rows chosen by ``class_index``
are read through the index inside the kernels (no gathered copy of W). Every sum runs in
a fixed order, so results are bitwise reproducible for fixed inputs and tiles.

Why ``M`` carries both scales: ``u = r q <x, w>``, so ``dL/d<x_b, w_i> = dU r_b q_i``,
and the two normalization terms are what the scales' own derivatives add:
``dx_b = sum_i M_bi w_i - rho_b r_b^2 x_b`` with ``rho_b = sum_i dU_bi u_bi``, and
``dw_i = sum_b M_bi x_b - kappa_i q_i^2 w_i`` with ``kappa_i = sum_b dU_bi u_bi``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backward_common import (
    BackwardInputs,
    _load_row_terms,
    _tile_grads,
    gradient_buffers,
    kernel_arguments,
    zero_gradients,
)
from .common import (
    DX_WORKSPACE_BYTES,
    MAX_GRID_YZ,
    TileConfig,
    _block_range,
    _class_block,
    _load_tile,
    _mma,
    _routed,
    default_tiles,
    launch,
    optional_inputs_guarded,
)
from .lse_forward import num_classes_in_use
from .optim_update import UpdateArguments, _flag_non_finite, _update_rows, no_update, step_with_zero_gradient

__all__ = ["GEMM_WORKSPACE_BYTES", "margin_lse_bwd_gemm"]

#: Upper bound on the (B, chunk rows) workspace of ``dL/d<x, w>``: it sets how many
#: classes one chunk holds (at least one class block of the first kernel, whatever B).
GEMM_WORKSPACE_BYTES = 32 << 20


@triton.jit
def _weight_rows(local_rows, mask, c_begin, class_index_ptr, K: tl.constexpr, HAS_INDEX: tl.constexpr):
    """The rows of W (int64) of a chunk's local weight rows ``class position * K + k``."""
    if HAS_INDEX:
        classes = tl.load(class_index_ptr + c_begin + local_rows // K, mask=mask, other=0)
        rows = classes * K + local_rows % K
    else:
        rows = local_rows.to(tl.int64) + c_begin * K
    return rows


@optional_inputs_guarded
@triton.jit
def _dot_grad_kernel(
    # pointers: inputs
    x_ptr, w_ptr, labels_ptr, bias_ptr, class_index_ptr, threshold_ptr,
    # pointers: upstream gradients (B,) and saved forward results
    grad_lse_ptr, grad_target_ptr, grad_sum_ptr, lse_ptr, row_scale_ptr, col_scale_ptr,
    # pointers: outputs: M (B, chunk_rows) in the GEMM dtype; fp32 partial sums rho
    # (class blocks, B), kappa (row blocks, chunk_rows), bias gradient (row blocks, chunk classes);
    # a fused update's guard (optim_update.py), None without one
    dot_grad_ptr, rho_partial_ptr, kappa_partial_ptr, bias_partial_ptr, guard_ptr,
    # sizes: the chunk is classes [c_begin, c_begin + chunk_classes) of the C in use
    B, D, c_begin, chunk_classes,
    # strides
    stride_xb, stride_xd, stride_wr, stride_wd,
    # scalars of the transform
    scale, alpha, delta, margin,
    # meta
    K: tl.constexpr, KIND: tl.constexpr, NORMALIZE_X: tl.constexpr, NORMALIZE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, GUARDED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)  # row blocks vary fastest: the programs of one W tile run together
    pid_c = tl.program_id(1)
    offs_b, mask_b = _block_range(pid_b, BLOCK_B, B)
    row_scale, row_terms = _load_row_terms(
        offs_b, mask_b, labels_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr, row_scale_ptr,
        threshold_ptr, B, BLOCK_B, NORMALIZE_X, KIND,
    )
    local_c, mask_c = _block_range(pid_c, BLOCK_C, chunk_classes)
    offs_c = c_begin + local_c  # position among the classes in use
    classes, bias = _class_block(offs_c, mask_c, class_index_ptr, bias_ptr, BLOCK_C, HAS_INDEX, HAS_BIAS)
    operands = (x_ptr, w_ptr, D, stride_xb, stride_xd, stride_wr, stride_wd)
    u, best, dz, du = _tile_grads(
        operands, col_scale_ptr, offs_b, mask_b, row_scale, row_terms, offs_c, mask_c, classes, bias,
        (scale, alpha, delta, margin), K, KIND, NORMALIZE_W, BLOCK_B, BLOCK_C, BLOCK_D, DOT_FP32, INPUT_PRECISION,
    )
    tl.store(rho_partial_ptr + pid_c * B + offs_b, tl.sum(du * u, axis=1), mask=mask_b)
    if HAS_BIAS:
        tl.store(bias_partial_ptr + pid_b * chunk_classes + local_c, tl.sum(dz, axis=0), mask=mask_c)

    chunk_rows = chunk_classes * K
    du_r = du * row_scale[:, None]
    out = dot_grad_ptr + offs_b.to(tl.int64)[:, None] * chunk_rows
    for k in range(K):
        local_rows = local_c * K + k
        routed = _routed(du, best, k, K)
        routed_r = _routed(du_r, best, k, K)
        tl.store(kappa_partial_ptr + pid_b * chunk_rows + local_rows, tl.sum(routed * u, axis=0), mask=mask_c)
        if NORMALIZE_W:
            q = tl.load(col_scale_ptr + offs_c.to(tl.int64) * K + k, mask=mask_c, other=0.0)
            routed_r = routed_r * q[None, :]
        m = routed_r.to(dot_grad_ptr.dtype.element_ty)
        tl.store(out + local_rows[None, :], m, mask=mask_b[:, None] & mask_c[None, :])
        if GUARDED:
            # the chunk's whole M is checked before its dW kernel runs: a non-finite entry
            # (or one that overflowed the workspace dtype) stops every write of the update
            _flag_non_finite(m, mask_b[:, None] & mask_c[None, :], guard_ptr)


@triton.heuristics({"HAS_INDEX": lambda args: args["class_index_ptr"] is not None})
@triton.jit
def _gemm_dx_kernel(
    # pointers: M (B, chunk_rows), W, class_index; fp32 partials (splits, B, D) and
    # rho (B,), both accumulated across chunks; rho's partial sums of this chunk
    dot_grad_ptr, w_ptr, class_index_ptr, gx_partial_ptr, rho_ptr, rho_partial_ptr,
    # sizes
    B, D, c_begin, chunk_rows, rows_per_split, rho_blocks,
    # strides of W
    stride_wr, stride_wd,
    # meta: BLOCK_M rows of x, BLOCK_N columns of D, BLOCK_K weight rows per step
    K: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GRAD_DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m, mask_m = _block_range(tl.program_id(0), BLOCK_M, B)
    offs_n, mask_n = _block_range(pid_n, BLOCK_N, D)
    out = gx_partial_ptr + (split * B + offs_m).to(tl.int64)[:, None] * D + offs_n[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    acc = tl.load(out, mask=mask_out, other=0.0)
    a_base = dot_grad_ptr + offs_m.to(tl.int64)[:, None] * chunk_rows
    r_begin = split * rows_per_split
    for r0 in range(0, rows_per_split, BLOCK_K):
        local_rows = r_begin + r0 + tl.arange(0, BLOCK_K)
        mask_r = local_rows < chunk_rows
        a = tl.load(a_base + local_rows[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        rows = _weight_rows(local_rows, mask_r, c_begin, class_index_ptr, K, HAS_INDEX)
        wt = _load_tile(w_ptr, rows, offs_n, mask_r, mask_n, stride_wr, stride_wd)
        acc = _mma(a, wt, acc, GRAD_DOT_FP32, INPUT_PRECISION)
    tl.store(out, acc, mask=mask_out)
    if (pid_n == 0) & (split == 0):  # this chunk's share of rho, its class blocks in order
        rho = tl.load(rho_ptr + offs_m, mask=mask_m, other=0.0)
        for i in range(0, rho_blocks):
            rho += tl.load(rho_partial_ptr + i * B + offs_m, mask=mask_m, other=0.0)
        tl.store(rho_ptr + offs_m, rho, mask=mask_m)


@triton.heuristics({
    "HAS_BIAS": lambda args: args["grad_bias_ptr"] is not None,
    "HAS_INDEX": lambda args: args["class_index_ptr"] is not None,
})
@triton.jit
def _gemm_dw_kernel(
    # pointers: M (B, chunk_rows), x, W, class_index, col_scale; this chunk's partial sums
    # of kappa (row blocks, chunk_rows) and of the bias gradient (row blocks, chunk classes);
    # outputs grad_w (W's dtype) and grad_bias (fp32, all classes)
    dot_grad_ptr, x_ptr, w_ptr, class_index_ptr, col_scale_ptr, kappa_partial_ptr, bias_partial_ptr,
    grad_w_ptr, grad_bias_ptr,
    # sizes
    B, D, c_begin, chunk_rows, row_blocks,
    # strides
    stride_xb, stride_xd, stride_wr, stride_wd, stride_gr, stride_gd,
    # meta: BLOCK_R weight rows, BLOCK_N columns of D, BLOCK_B rows of x per step
    K: tl.constexpr, NORMALIZE_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    GRAD_DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # a fused optimizer step (optim_update.py; UPDATE = 0: write dW to grad_w instead):
    # its state (W's shape), strides, guard (optim_update.py) and scalars
    state1_ptr, state2_ptr, stride_sr, stride_sd, guard_ptr,
    lr, weight_decay, decay_factor, momentum, one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2, eps,
    step_size, bias_correction2_sqrt,
    UPDATE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, DECOUPLED: tl.constexpr,
):
    pid_n = tl.program_id(1)
    local_rows, mask_r = _block_range(tl.program_id(0), BLOCK_R, chunk_rows)
    offs_n, mask_n = _block_range(pid_n, BLOCK_N, D)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        g = _load_tile(dot_grad_ptr, offs_b, local_rows, mask_b, mask_r, chunk_rows, 1)
        xt = _load_tile(x_ptr, offs_b, offs_n, mask_b, mask_n, stride_xb, stride_xd)
        acc = _mma(tl.trans(g), xt, acc, GRAD_DOT_FP32, INPUT_PRECISION)

    rows = _weight_rows(local_rows, mask_r, c_begin, class_index_ptr, K, HAS_INDEX)
    if NORMALIZE_W:
        kappa = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for i in range(0, row_blocks):
            kappa += tl.load(kappa_partial_ptr + i * chunk_rows + local_rows, mask=mask_r, other=0.0)
        q = tl.load(col_scale_ptr + c_begin * K + local_rows, mask=mask_r, other=0.0)
        wt = _load_tile(w_ptr, rows, offs_n, mask_r, mask_n, stride_wr, stride_wd).to(tl.float32)
        acc = acc - (kappa * q * q)[:, None] * wt
    if UPDATE == 0:
        tl.store(
            grad_w_ptr + rows[:, None] * stride_gr + offs_n[None, :] * stride_gd,
            acc.to(grad_w_ptr.dtype.element_ty),
            mask=mask_r[:, None] & mask_n[None, :],
        )
    else:  # the step on this tile of W (and its state) instead of storing dW
        _update_rows(
            acc, rows, offs_n, mask_r[:, None] & mask_n[None, :],
            w_ptr, stride_wr, stride_wd, state1_ptr, state2_ptr, stride_sr, stride_sd, guard_ptr,
            lr, weight_decay, decay_factor, momentum, one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2,
            eps, step_size, bias_correction2_sqrt,
            UPDATE, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, FIRST_STEP, DECOUPLED,
        )
    if HAS_BIAS:
        if pid_n == 0:  # the class of each sub-center-0 row: its bias gradient, row blocks in order
            first = mask_r & (local_rows % K == 0)
            local_c = local_rows // K
            grad_bias = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for i in range(0, row_blocks):
                grad_bias += tl.load(bias_partial_ptr + i * (chunk_rows // K) + local_c, mask=first, other=0.0)
            tl.store(grad_bias_ptr + rows // K, grad_bias, mask=first)


def chunk_classes_for(batch: int, num_classes: int, k: int, element_size: int, block_c: int) -> int:
    """Classes per chunk: as many as the workspace holds, a multiple of ``block_c``
    (at least one block), at most ``num_classes``, and at most ``MAX_GRID_YZ`` class
    blocks (the first kernel's grid y: a small batch would otherwise fit more classes,
    e.g. B=4 bf16 holds 4.2M)."""
    fit = min(GEMM_WORKSPACE_BYTES // max(1, batch * k * element_size), MAX_GRID_YZ * block_c)
    return max(1, min(num_classes, max(block_c, fit // block_c * block_c)))


def margin_lse_bwd_gemm(
    inputs: BackwardInputs,
    *,
    input_precision: str = "ieee",
    grad_dot_fp32: bool = False,
    tiles: dict[str, TileConfig] | None = None,
    update: UpdateArguments | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The backward of :mod:`fused_margin.kernel_params`, like
    :func:`~fused_margin.triton_kernels.backward.margin_lse_bwd` (same arguments and
    results, bitwise reproducible), through a bounded workspace of ``dL/d<x, w>``.
    ``tiles``: optional :class:`TileConfig` overrides keyed 'gemm_logits', 'gemm_dx'
    (its ``splits``: the number of split-K partials of dx), 'gemm_dw'. ``update``: a
    fused optimizer step (:mod:`.optim_update`) that the dW kernel applies to the
    weight rows in use (W and the state in place) instead of writing their gradient:
    the weight's gradient is then None, and none of W's shape is allocated."""
    tiles = tiles or {}
    saved, params = inputs.saved, inputs.params
    x, weight, bias, class_index = saved.x, saved.weight, saved.bias, saved.class_index
    k = params.num_subcenters
    batch, dim = x.shape
    num_classes = num_classes_in_use(weight, class_index, k)
    device = x.device
    f32 = torch.float32
    if batch == 0 or num_classes == 0:
        if update is not None:  # dW = 0: weight decay and momentum still move the rows in use
            step_with_zero_gradient(update, weight, class_index, k)
        return zero_gradients(x, weight, bias, fused_update=update is not None)
    grad_w, grad_bias = gradient_buffers(weight, bias, class_index, fused_update=update is not None)

    args = kernel_arguments(inputs, input_precision=input_precision, grad_dot_fp32=grad_dot_fp32)
    grad_fp32 = args.GRAD_DOT_FP32
    kind = dict(input_precision=input_precision)
    t_logits = tiles.get("gemm_logits") or default_tiles(
        "gemm_logits", batch, num_classes, dim, device, fp32_operands=args.DOT_FP32, **kind
    )
    t_dx = tiles.get("gemm_dx") or default_tiles("gemm_dx", batch, num_classes * k, dim, device,
                                                 fp32_operands=grad_fp32, **kind)
    t_dw = tiles.get("gemm_dw") or default_tiles("gemm_dw" if update is None else "gemm_dw_update", batch,
                                                 num_classes * k, dim, device, fp32_operands=grad_fp32, **kind)

    # The workspace holds dU r q in the dtype the gradient GEMMs multiply in.
    ws_dtype = f32 if grad_fp32 else weight.dtype
    chunk = chunk_classes_for(batch, num_classes, k, torch.finfo(ws_dtype).bits // 8, t_logits.block_c)
    row_blocks = triton.cdiv(batch, t_logits.block_b)
    class_blocks = triton.cdiv(chunk, t_logits.block_c)
    dot_grad = torch.empty((batch, chunk * k), device=device, dtype=ws_dtype)
    rho_partial = torch.empty((class_blocks, batch), device=device, dtype=f32)
    kappa_partial = torch.empty((row_blocks, chunk * k), device=device, dtype=f32)
    bias_partial = torch.empty((row_blocks, chunk), device=device, dtype=f32) if bias is not None else None
    rho = torch.zeros(batch, device=device, dtype=f32)
    # dx's split-K partials: one fixed count for every chunk, within the dx workspace
    splits = max(1, min(t_dx.splits, DX_WORKSPACE_BYTES // (4 * batch * dim), triton.cdiv(chunk * k, t_dx.block_c)))
    gx_partial = torch.zeros((splits, batch, dim), device=device, dtype=f32)

    updating = (update or no_update()).kwargs()

    def launch_gemm_dw(c_begin: int, chunk_rows: int) -> None:
        # after the chunk's other kernels: they have read its rows of W
        launch(
            _gemm_dw_kernel, (triton.cdiv(chunk_rows, t_dw.block_c), triton.cdiv(dim, t_dw.block_do)), t_dw,
            **args.for_kernel(_gemm_dw_kernel), dot_grad_ptr=dot_grad, kappa_partial_ptr=kappa_partial,
            bias_partial_ptr=bias_partial, grad_w_ptr=grad_w, grad_bias_ptr=grad_bias,
            B=batch, D=dim, c_begin=c_begin, chunk_rows=chunk_rows, row_blocks=row_blocks,
            stride_gr=0 if grad_w is None else grad_w.stride(0), stride_gd=0 if grad_w is None else grad_w.stride(1),
            BLOCK_R=t_dw.block_c, BLOCK_N=t_dw.block_do, BLOCK_B=t_dw.block_b, **updating,
        )

    for c_begin in range(0, num_classes, chunk):
        chunk_classes = min(chunk, num_classes - c_begin)
        chunk_rows = chunk_classes * k
        launch(
            _dot_grad_kernel, (row_blocks, triton.cdiv(chunk_classes, t_logits.block_c)), t_logits,
            **args.for_kernel(_dot_grad_kernel), dot_grad_ptr=dot_grad, rho_partial_ptr=rho_partial,
            kappa_partial_ptr=kappa_partial, bias_partial_ptr=bias_partial,
            guard_ptr=None if update is None else update.guard_ptr,
            B=batch, D=dim, c_begin=c_begin, chunk_classes=chunk_classes,
            BLOCK_B=t_logits.block_b, BLOCK_C=t_logits.block_c, BLOCK_D=t_logits.block_d,
        )
        rows_per_split = triton.cdiv(triton.cdiv(chunk_rows, splits), t_dx.block_c) * t_dx.block_c
        launch(
            _gemm_dx_kernel,
            (triton.cdiv(batch, t_dx.block_b), triton.cdiv(dim, t_dx.block_do), splits), t_dx,
            **args.for_kernel(_gemm_dx_kernel), dot_grad_ptr=dot_grad, gx_partial_ptr=gx_partial, rho_ptr=rho,
            rho_partial_ptr=rho_partial, B=batch, D=dim, c_begin=c_begin, chunk_rows=chunk_rows,
            rows_per_split=rows_per_split, rho_blocks=triton.cdiv(chunk_classes, t_logits.block_c),
            BLOCK_M=t_dx.block_b, BLOCK_N=t_dx.block_do, BLOCK_K=t_dx.block_c,
        )
        launch_gemm_dw(c_begin, chunk_rows)

    grad_x = gx_partial.sum(dim=0)  # a fresh tensor also for one split: no view of the workspace
    if params.normalize_x:
        r = args.row_scale_ptr  # row_scale in fp32
        grad_x = grad_x - (rho * r * r)[:, None] * x.to(f32)
    grad_b = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_x.to(x.dtype), grad_w, grad_b
