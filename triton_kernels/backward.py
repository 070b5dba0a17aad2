"""Backward: ``grad_x, grad_weight, grad_bias`` recomputing the logit tiles.

Two kernels, each recomputing ``u`` tile by tile from ``x``, ``W`` and the saved
scales (2 B C D flops each) instead of storing any (B, C) matrix:

* ``_margin_lse_bwd_dx_kernel`` owns a block of rows and a split of the classes and
  accumulates ``G_x = dU (Q W)`` and ``rho = sum_j dU u`` for its rows; the launcher sums
  the (splits, B, D) fp32 partials in split order and applies the normalization term
  ``dx = r (G_x - rho r x)``.
* ``_margin_lse_bwd_dw_kernel`` owns a block of classes (one sub-center) and loops over
  *all* rows, accumulating ``G_w = dU^T (R x)``, ``kappa`` and the bias gradient in
  fp32 registers, then writes ``dw = q (G_w - kappa q w)`` once, in W's dtype.

No atomics: every output element is written by one program after a fixed-order loop,
so the gradients are bitwise reproducible for fixed inputs and tile sizes.
Sub-centers: the gradient of class j goes to the sub-center that attained the max
(recomputed: the dW program of sub-center k recomputes all K to know where the max
is, so sub-center heads pay K times the recomputation in that kernel).
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
    TileConfig,
    _block_range,
    _class_block,
    _load_tile,
    _mma,
    _routed,
    default_tiles,
    dot_in_fp32,
    launch,
    optional_inputs,
    optional_inputs_guarded,
)
from .lse_forward import num_classes_in_use
from .optim_update import UpdateArguments, _flag_non_finite, _update_rows, no_update

__all__ = ["margin_lse_bwd"]


@optional_inputs_guarded
@triton.jit
def _margin_lse_bwd_dx_kernel(
    # pointers: inputs
    x_ptr, w_ptr, labels_ptr, bias_ptr, class_index_ptr, threshold_ptr,
    # pointers: upstream gradients (B,) and saved forward results
    grad_lse_ptr, grad_target_ptr, grad_sum_ptr, lse_ptr, row_scale_ptr, col_scale_ptr,
    # pointers: outputs, fp32 partials G_x (splits, B, D) and rho (splits, B); a fused
    # update's guard (optim_update.py), None without one
    gx_partial_ptr, rho_partial_ptr, guard_ptr,
    # sizes
    B, C, D, blocks_per_split,
    # strides
    stride_xb, stride_xd, stride_wr, stride_wd,
    # scalars of the transform
    scale, alpha, delta, margin,
    # meta
    K: tl.constexpr, KIND: tl.constexpr, NORMALIZE_X: tl.constexpr, NORMALIZE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, GUARDED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_FP32: tl.constexpr, GRAD_DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_b, mask_b = _block_range(tl.program_id(0), BLOCK_B, B)
    row_scale, row_terms = _load_row_terms(
        offs_b, mask_b, labels_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr, row_scale_ptr,
        threshold_ptr, B, BLOCK_B, NORMALIZE_X, KIND,
    )
    offs_do, mask_do = _block_range(pid_d, BLOCK_DO, D)
    operands = (x_ptr, w_ptr, D, stride_xb, stride_xd, stride_wr, stride_wd)

    acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
    rho = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for cb in range(0, blocks_per_split):  # this split's class blocks
        offs_c, mask_c = _block_range(split * blocks_per_split + cb, BLOCK_C, C)
        classes, bias = _class_block(offs_c, mask_c, class_index_ptr, bias_ptr, BLOCK_C, HAS_INDEX, HAS_BIAS)
        u, best, _, du = _tile_grads(
            operands, col_scale_ptr, offs_b, mask_b, row_scale, row_terms, offs_c, mask_c, classes, bias,
            (scale, alpha, delta, margin), K, KIND, NORMALIZE_W, BLOCK_B, BLOCK_C, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        )
        rho += tl.sum(du * u, axis=1)
        if GUARDED:
            # this kernel forms every dU before the dW kernel runs: a non-finite one stops
            # every write of the update (one D slice checks)
            _flag_non_finite(du, mask_b[:, None] & mask_c[None, :] & (pid_d == 0), guard_ptr)
        for k in range(K):
            routed = _routed(du, best, k, K)
            if NORMALIZE_W:
                q = tl.load(col_scale_ptr + offs_c.to(tl.int64) * K + k, mask=mask_c, other=0.0)
                routed = routed * q[None, :]
            wt = _load_tile(w_ptr, classes * K + k, offs_do, mask_c, mask_do, stride_wr, stride_wd)
            acc = _mma(routed, wt, acc, GRAD_DOT_FP32, INPUT_PRECISION)

    out = gx_partial_ptr + (split * B + offs_b).to(tl.int64)[:, None] * D + offs_do[None, :]
    tl.store(out, acc, mask=mask_b[:, None] & mask_do[None, :])
    if pid_d == 0:
        tl.store(rho_partial_ptr + split * B + offs_b, rho, mask=mask_b)


@optional_inputs
@triton.jit
def _margin_lse_bwd_dw_kernel(
    # pointers: inputs
    x_ptr, w_ptr, labels_ptr, bias_ptr, class_index_ptr, threshold_ptr,
    # pointers: upstream gradients (B,) and saved forward results
    grad_lse_ptr, grad_target_ptr, grad_sum_ptr, lse_ptr, row_scale_ptr, col_scale_ptr,
    # pointers: outputs, grad_w (rows of W, D) in W's dtype and grad_bias (C_all,) fp32
    grad_w_ptr, grad_bias_ptr,
    # sizes
    B, C, D,
    # strides
    stride_xb, stride_xd, stride_wr, stride_wd, stride_gr, stride_gd,
    # scalars of the transform
    scale, alpha, delta, margin,
    # meta
    K: tl.constexpr, KIND: tl.constexpr, NORMALIZE_X: tl.constexpr, NORMALIZE_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_FP32: tl.constexpr, GRAD_DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # a fused optimizer step (optim_update.py; UPDATE = 0: write dW to grad_w instead):
    # its state (W's shape), strides and scalars. Only with one program per class block
    # (K = 1, BLOCK_DO >= D): a program recomputes its logits from all of its rows of W,
    # so no other program may update them meanwhile. The guard: optim_update.py.
    state1_ptr, state2_ptr, stride_sr, stride_sd, guard_ptr,
    lr, weight_decay, decay_factor, momentum, one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2, eps,
    step_size, bias_correction2_sqrt,
    UPDATE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, DECOUPLED: tl.constexpr,
):
    sub = tl.program_id(1)  # the sub-center whose rows this program writes
    pid_d = tl.program_id(2)
    offs_c, mask_c = _block_range(tl.program_id(0), BLOCK_C, C)
    classes, bias = _class_block(offs_c, mask_c, class_index_ptr, bias_ptr, BLOCK_C, HAS_INDEX, HAS_BIAS)
    own_rows = classes * K + sub
    offs_do, mask_do = _block_range(pid_d, BLOCK_DO, D)
    operands = (x_ptr, w_ptr, D, stride_xb, stride_xd, stride_wr, stride_wd)

    acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=tl.float32)
    kappa = tl.zeros((BLOCK_C,), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        row_scale, row_terms = _load_row_terms(
            offs_b, mask_b, labels_ptr, lse_ptr, grad_lse_ptr, grad_target_ptr, grad_sum_ptr, row_scale_ptr,
            threshold_ptr, B, BLOCK_B, NORMALIZE_X, KIND,
        )
        u, best, dz, du = _tile_grads(
            operands, col_scale_ptr, offs_b, mask_b, row_scale, row_terms, offs_c, mask_c, classes, bias,
            (scale, alpha, delta, margin), K, KIND, NORMALIZE_W, BLOCK_B, BLOCK_C, BLOCK_D, DOT_FP32, INPUT_PRECISION,
        )
        routed = _routed(du, best, sub, K)
        kappa += tl.sum(routed * u, axis=0)
        grad_bias += tl.sum(dz, axis=0)
        if NORMALIZE_X:
            routed = routed * row_scale[:, None]
        xt = _load_tile(x_ptr, offs_b, offs_do, mask_b, mask_do, stride_xb, stride_xd)
        acc = _mma(tl.trans(routed), xt, acc, GRAD_DOT_FP32, INPUT_PRECISION)

    if NORMALIZE_W:
        q = tl.load(col_scale_ptr + offs_c.to(tl.int64) * K + sub, mask=mask_c, other=0.0)
        wt = _load_tile(w_ptr, own_rows, offs_do, mask_c, mask_do, stride_wr, stride_wd).to(tl.float32)
        acc = q[:, None] * (acc - (kappa * q)[:, None] * wt)
    if UPDATE == 0:
        tl.store(
            grad_w_ptr + own_rows[:, None] * stride_gr + offs_do[None, :] * stride_gd,
            acc.to(grad_w_ptr.dtype.element_ty),
            mask=mask_c[:, None] & mask_do[None, :],
        )
    else:  # the step on this program's rows of W (and their state) instead of storing dW
        _update_rows(
            acc, own_rows, offs_do, mask_c[:, None] & mask_do[None, :],
            w_ptr, stride_wr, stride_wd, state1_ptr, state2_ptr, stride_sr, stride_sd, guard_ptr,
            lr, weight_decay, decay_factor, momentum, one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2,
            eps, step_size, bias_correction2_sqrt,
            UPDATE, MAXIMIZE, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, FIRST_STEP, DECOUPLED,
        )
    if HAS_BIAS:
        if (sub == 0) & (pid_d == 0):
            tl.store(grad_bias_ptr + classes, grad_bias, mask=mask_c)


def margin_lse_bwd(
    inputs: BackwardInputs,
    *,
    input_precision: str = "ieee",
    grad_dot_fp32: bool = False,
    dx_tiles: TileConfig | None = None,
    dw_tiles: TileConfig | None = None,
    update: UpdateArguments | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The backward of :mod:`fused_margin.kernel_params` on one device.

    Args:
        inputs: the upstream gradients (B,) of the forward's first three outputs, the
            forward's inputs, and its saved outputs lse_neg, row_scale, col_scale.
        input_precision: ``tl.dot`` precision for fp32 operands ('ieee', 'tf32', 'tf32x3').
        grad_dot_fp32: feed ``dU`` to the two gradient GEMMs in fp32 (x and W upcast)
            instead of rounding it to the 16-bit input dtype. Accumulation is fp32 either
            way: dW is summed over the whole batch in registers and rounded once.
        dx_tiles, dw_tiles: tile sizes (default: :func:`default_tiles`).
        update: a fused optimizer step (:mod:`.optim_update`) applied by the dW kernel
            to the weight rows in use (W and the state in place) instead of writing
            their gradient, after the dx kernel has read W; the weight's gradient is
            then None. The dW kernel updates in place only when each of its programs
            owns all of its rows (K = 1 and one slice of D: ``dw_tiles.block_do >= D``,
            since a program recomputes its logits from the whole rows); otherwise, and
            for B = 0, the update runs through the 'gemm' backward
            (:func:`~.backward_gemm.margin_lse_bwd_gemm`), which updates a chunk's rows
            after all of its reads.

    Returns ``(grad_x, grad_weight, grad_bias)`` in the dtypes of x, weight, bias;
    ``class_index`` must not repeat a class (each weight row has one writer).
    """
    saved, params = inputs.saved, inputs.params
    x, weight, bias, class_index = saved.x, saved.weight, saved.bias, saved.class_index
    k = params.num_subcenters
    batch, dim = x.shape
    num_classes = num_classes_in_use(weight, class_index, k)
    device = x.device
    f32 = torch.float32
    dw_kind = dict(fp32_operands=dot_in_fp32(x.dtype, weight.dtype) or grad_dot_fp32, input_precision=input_precision)
    dw_tiles = dw_tiles or default_tiles("dw" if update is None else "dw_update", batch, num_classes, dim, device,
                                         **dw_kind)
    if update is not None and (batch == 0 or k > 1 or dw_tiles.block_do < dim):
        from .backward_gemm import margin_lse_bwd_gemm

        return margin_lse_bwd_gemm(inputs, input_precision=input_precision, grad_dot_fp32=grad_dot_fp32,
                                   update=update)
    if batch == 0 or num_classes == 0:
        return zero_gradients(x, weight, bias, fused_update=update is not None)
    grad_w, grad_bias_acc = gradient_buffers(weight, bias, class_index, fused_update=update is not None)

    args = kernel_arguments(inputs, input_precision=input_precision, grad_dot_fp32=grad_dot_fp32)

    # dx: rows x class splits x D slices
    kind = dict(fp32_operands=args.GRAD_DOT_FP32, input_precision=input_precision)
    tiles = dx_tiles or default_tiles("dx", batch, num_classes, dim, device, **kind)
    class_blocks = triton.cdiv(num_classes, tiles.block_c)
    blocks_per_split = triton.cdiv(class_blocks, max(1, min(tiles.splits, class_blocks)))
    splits = triton.cdiv(class_blocks, blocks_per_split)
    gx_partial = torch.empty((splits, batch, dim), device=device, dtype=f32)
    rho_partial = torch.empty((splits, batch), device=device, dtype=f32)
    grid = (triton.cdiv(batch, tiles.block_b), splits, triton.cdiv(dim, tiles.block_do))
    launch(
        _margin_lse_bwd_dx_kernel, grid, tiles,
        **args.for_kernel(_margin_lse_bwd_dx_kernel), gx_partial_ptr=gx_partial, rho_partial_ptr=rho_partial,
        guard_ptr=None if update is None else update.guard_ptr,
        B=batch, C=num_classes, D=dim, blocks_per_split=blocks_per_split,
        BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_D=tiles.block_d, BLOCK_DO=tiles.block_do,
    )
    grad_x = gx_partial.sum(dim=0)  # a fresh tensor also for one split: no view of the workspace
    if params.normalize_x:
        r = args.row_scale_ptr  # row_scale in fp32
        grad_x = r[:, None] * (grad_x - (rho_partial.sum(dim=0) * r)[:, None] * x.to(f32))
    grad_x = grad_x.to(x.dtype)

    # dW (and the bias gradient): class blocks x sub-centers x D slices
    tiles = dw_tiles
    grid = (triton.cdiv(num_classes, tiles.block_c), k, triton.cdiv(dim, tiles.block_do))
    launch(
        _margin_lse_bwd_dw_kernel, grid, tiles,
        **args.for_kernel(_margin_lse_bwd_dw_kernel), grad_w_ptr=grad_w, grad_bias_ptr=grad_bias_acc,
        B=batch, C=num_classes, D=dim,
        stride_gr=0 if grad_w is None else grad_w.stride(0), stride_gd=0 if grad_w is None else grad_w.stride(1),
        BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_D=tiles.block_d, BLOCK_DO=tiles.block_do,
        **(update or no_update()).kwargs(),
    )
    grad_b = None if grad_bias_acc is None else grad_bias_acc.to(bias.dtype)
    return grad_x, grad_w, grad_b
