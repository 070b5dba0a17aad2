"""Pieces shared by the forward and backward kernels: the non-target transform and its
derivative, the cosine tile (a GEMM tile with the sub-center max), the tile sizes.

Math and names follow :mod:`fused_margin.kernel_params`; ``u`` is the cosine-like
value ``r_b * q_i * <x_b, w_i>``, ``z = scale * T(u) + bias``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from fused_margin.kernel_params import IGNORED_LABEL
from fused_margin.spec import NonTargetKind

__all__ = [
    "TileConfig",
    "launch",
    "default_tiles",
    "dot_in_fp32",
    "interpreting",
    "num_programs_target",
    "optional_inputs",
    "optional_inputs_guarded",
]

NORM_EPS = tl.constexpr(1e-12)
#: labels at or below this are rows not part of the computation (see kernel_params)
IGNORED = tl.constexpr(IGNORED_LABEL)

# tl.constexpr copies of NonTargetKind (a jit function can't read a Python enum)
KIND_IDENTITY = tl.constexpr(int(NonTargetKind.IDENTITY))
KIND_AFFINE = tl.constexpr(int(NonTargetKind.AFFINE))
KIND_QUADRATIC = tl.constexpr(int(NonTargetKind.QUADRATIC))
KIND_QUADRATIC_DETACHED = tl.constexpr(int(NonTargetKind.QUADRATIC_DETACHED))
KIND_CURRICULAR = tl.constexpr(int(NonTargetKind.CURRICULAR))
KIND_FILTERED = tl.constexpr(int(NonTargetKind.FILTERED))


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter. Triton reads
    ``TRITON_INTERPRET`` when a function is *decorated* (its own ``tl.*`` helpers when
    Triton is first imported), so the variable must be set before that import."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def dot_in_fp32(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether GEMM operands are cast to fp32 before ``tl.dot``: when the dtypes differ
    (``tl.dot`` needs one dtype; promoting never loses the fp32 operand's bits), when
    either is fp32, and for bf16 in the interpreter (Triton 3.9's interpreter returns
    garbage for ``tl.dot`` on bf16 operands; fp16 and fp32 are fine)."""
    if a != b or a == torch.float32:
        return True
    return a == torch.bfloat16 and interpreting()


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the three kernels. ``block_d`` is the reduction step over D of the
    logit GEMM; ``block_do`` the width of the D slice a backward program accumulates
    (D > block_do splits D across programs, each recomputing its logit tiles);
    ``splits`` the number of programs sharing one row block's classes in the forward and
    the dx kernel (their partial results are combined in a fixed order: deterministic)."""

    block_b: int
    block_c: int
    block_d: int
    block_do: int
    splits: int
    num_warps: int = 4
    num_stages: int = 2

    def with_(self, **changes) -> TileConfig:
        return replace(self, **changes)


def num_programs_target(device: torch.device) -> int:
    """About four waves of programs on a GPU; on the interpreter (one thread) a couple of
    splits, enough to run the combine path in tests without making them slow."""
    if device.type == "cuda":
        return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 2


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


#: Upper bound on the dx kernel's fp32 partials (splits x B x D): part of the "bounded
#: workspace" beside the O(B*D + C) the backward keeps.
DX_WORKSPACE_BYTES = 16 << 20


# GPU tiles (block_b, block_c, block_d, block_do, num_warps, num_stages) per kernel and
# operand kind: "16" (bf16/fp16 operands), "tf32" (fp32 on tensor cores: tf32, tf32x3),
# "ieee" (fp32 on CUDA cores). Chosen from Triton 3.9's sm_90a compilation (registers and
# spills of the cubin, compile_check.py, with the JIT's specialization of a typical call:
# unit strides, 16-divisible sizes) to keep spills at zero at D = 512; not yet tuned by
# timing. The recompute backward's fp32 accumulator is block_b (dx) or block_c (dW) rows
# by block_do columns of D in registers; D > block_do would split D across programs that
# each recompute their logit tiles, hence block_do = 512 for 16-bit operands (tf32: 256,
# since 512 spills 2 KiB with tf32x3 and sub-centers).
_GPU_TILES = {
    ("forward", "16"): (128, 64, 64, 0, 8, 3),
    ("forward", "tf32"): (64, 128, 32, 0, 8, 3),
    ("forward", "ieee"): (64, 64, 16, 0, 8, 2),
    ("dx", "16"): (64, 32, 64, 512, 8, 2),
    ("dx", "tf32"): (64, 32, 32, 256, 8, 2),
    ("dx", "ieee"): (32, 32, 16, 256, 8, 2),
    ("dw", "16"): (64, 32, 64, 512, 8, 2),
    ("dw", "tf32"): (64, 32, 32, 256, 8, 2),
    ("dw", "ieee"): (32, 32, 16, 128, 8, 2),
    # backward_atomic.py: one (row block, class block) tile per program; block_do is the
    # D slice of each gradient product (a loop: no D-split recomputation)
    ("atomic", "16"): (64, 64, 64, 32, 8, 2),
    ("atomic", "tf32"): (64, 64, 32, 32, 8, 2),
    ("atomic", "ieee"): (32, 32, 16, 32, 8, 1),
    # backward_gemm.py: the recomputation kernel takes the forward's tiles (same dot
    # shapes and D order, so it reproduces the forward's logits); the two GEMMs are
    # (block_b, block_c, -, block_do) = (rows of x, weight rows, -, columns of D), the
    # reduction over weight rows (dx) or over rows of x (dW) in steps of block_c / block_b
    ("gemm_logits", "16"): (128, 64, 64, 0, 8, 3),
    ("gemm_logits", "tf32"): (64, 128, 32, 0, 8, 3),
    ("gemm_logits", "ieee"): (64, 64, 16, 0, 8, 2),
    ("gemm_dx", "16"): (128, 64, 0, 128, 8, 4),
    ("gemm_dx", "tf32"): (128, 32, 0, 128, 8, 4),
    ("gemm_dx", "ieee"): (64, 16, 0, 64, 4, 2),
    ("gemm_dw", "16"): (64, 128, 0, 128, 8, 4),
    ("gemm_dw", "tf32"): (32, 128, 0, 128, 8, 4),
    ("gemm_dw", "ieee"): (16, 64, 0, 64, 4, 2),
    # the dW kernels with a fused optimizer step (optim_update.py): the epilogue holds the
    # tiles of W and of up to two state tensors beside the fp32 gradient, so the gradient
    # tile is halved (gemm: fewer columns; recompute: fewer rows, its D slice must still
    # cover D) to keep spills at zero
    ("dw_update", "16"): (64, 16, 64, 512, 8, 2),
    ("dw_update", "tf32"): (64, 16, 32, 256, 8, 2),
    ("dw_update", "ieee"): (32, 16, 16, 128, 8, 2),
    ("gemm_dw_update", "16"): (64, 128, 0, 64, 8, 4),
    ("gemm_dw_update", "tf32"): (32, 64, 0, 64, 8, 4),
    ("gemm_dw_update", "ieee"): (16, 64, 0, 32, 4, 2),
}


def default_tiles(
    kernel: str,
    batch: int,
    num_classes: int,
    dim: int,
    device: torch.device,
    *,
    fp32_operands: bool = True,
    input_precision: str = "ieee",
) -> TileConfig:
    """Tile sizes for ``kernel`` in {'forward', 'dx', 'dw', 'atomic', 'gemm_logits',
    'gemm_dx', 'gemm_dw', 'dw_update', 'gemm_dw_update'} (every ``tl.dot`` side >= 16;
    the ``_update`` ones: the dW kernels with a fused optimizer step).

    Interpreter: larger tiles (each Triton op costs a NumPy call, so fewer, larger ones
    are faster), still small enough that the tests' odd shapes take several blocks."""
    if device.type == "cuda":
        operands = "16" if not fp32_operands else ("ieee" if input_precision == "ieee" else "tf32")
        block_b, block_c, block_d, block_do, num_warps, num_stages = _GPU_TILES[(kernel, operands)]
    else:
        block_b, block_d, block_do, num_warps, num_stages = 64, 32, 256, 4, 1
        block_c = 64 if kernel in ("dw", "dw_update") else 128
    block_b = min(block_b, _pow2_at_least(batch))
    block_d = min(block_d, _pow2_at_least(dim))
    block_do = min(block_do, _pow2_at_least(dim))
    class_blocks = triton.cdiv(num_classes, block_c)
    row_blocks = triton.cdiv(batch, block_b)
    splits = 1
    if kernel in ("forward", "dx"):
        splits = max(1, min(class_blocks, num_programs_target(device) // row_blocks, 64))
    if kernel == "dx":
        splits = max(1, min(splits, DX_WORKSPACE_BYTES // (4 * max(batch, 1) * max(dim, 1))))
    if kernel == "gemm_dx":  # split-K over the weight rows: enough programs for the device
        tiles = row_blocks * triton.cdiv(dim, block_do)
        splits = max(1, min(triton.cdiv(num_programs_target(device), tiles), triton.cdiv(num_classes, block_c)))
    return TileConfig(block_b, block_c, block_d, block_do, splits, num_warps, num_stages)


#: CUDA's limit on a grid's y and z extents (x may reach 2**31 - 1)
MAX_GRID_YZ = 65535


def check_grid(grid: tuple[int, ...]) -> None:
    """Raises where CUDA would refuse the launch (the interpreter accepts any grid)."""
    if any(extent > MAX_GRID_YZ for extent in grid[1:]):
        raise ValueError(f"grid {grid}: CUDA allows at most {MAX_GRID_YZ} programs along y and z")


def launch(kernel, grid: tuple[int, ...], tiles: TileConfig, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with the tiles' warps and stages; on a GPU with
    less shared memory than the tiles were chosen for (they were for an H100's 227
    KiB), retry once without software pipelining (num_stages=1), which needs less."""
    check_grid(grid)
    try:
        kernel[grid](*args, **kwargs, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    except OutOfResources:
        if tiles.num_stages <= 1:
            raise
        kernel[grid](*args, **kwargs, num_warps=tiles.num_warps, num_stages=1)


# ---------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b``. In fp32 the precision is the caller's choice (ieee, tf32,
    tf32x3); otherwise ``a`` is cast to ``b``'s 16-bit dtype (tensor cores, fp32
    accumulation)."""
    if FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


@triton.jit
def _non_target(u, threshold, alpha, delta, margin, t, KIND: tl.constexpr):
    """``T(u)`` (``fused_margin.spec.NonTarget.value``: the one Triton copy, used by the
    forward and every backward mode); ``threshold`` and ``t`` are (BLOCK_B, 1),
    CurricularFace's per-row constants (unused by the other kinds)."""
    if KIND == KIND_AFFINE:
        out = alpha * u + delta
    elif KIND == KIND_QUADRATIC or KIND == KIND_QUADRATIC_DETACHED:
        out = tl.maximum(u + margin, 0.0) * (u - margin)
    elif KIND == KIND_CURRICULAR:
        out = tl.where(u > threshold, u * (t + u), u)
    elif KIND == KIND_FILTERED:  # inter-class filtering, threshold in `margin`
        out = tl.where(u > margin, 0.0, u)  # u > t: a NaN stays NaN
    else:
        out = u
    return out


@triton.jit
def _non_target_grad(u, threshold, alpha, margin, t, KIND: tl.constexpr):
    """``T'(u)`` (``fused_margin.spec.NonTarget.derivative``), with the constants of the
    paper held fixed: CurricularFace's ``t`` and threshold, and the detached quadratic's
    weight ``[u + m]_+`` (Circle loss)."""
    if KIND == KIND_AFFINE:
        out = tl.zeros_like(u) + alpha
    elif KIND == KIND_QUADRATIC:
        out = tl.where(u > -margin, 2.0 * u, 0.0)
    elif KIND == KIND_QUADRATIC_DETACHED:
        out = tl.maximum(u + margin, 0.0)
    elif KIND == KIND_CURRICULAR:
        out = tl.where(u > threshold, t + 2.0 * u, 1.0)
    elif KIND == KIND_FILTERED:
        out = tl.where(u > margin, 0.0, 1.0)
    else:
        out = tl.zeros_like(u) + 1.0
    return out


@triton.jit
def _block_range(pid, BLOCK: tl.constexpr, n):
    """``(offsets, mask)`` of block ``pid`` of ``BLOCK`` consecutive indices below ``n``."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _load_tile(ptr, rows, cols, mask_rows, mask_cols, stride_r, stride_c):
    """The (rows, cols) tile of a strided matrix, 0 outside the masks (row offsets in
    int64: a matrix may exceed 2**31 elements)."""
    return tl.load(
        ptr + rows.to(tl.int64)[:, None] * stride_r + cols[None, :] * stride_c,
        mask=mask_rows[:, None] & mask_cols[None, :], other=0.0,
    )


@triton.jit
def _routed(grad, best, k, K: tl.constexpr):
    """The part of a tile's gradient that goes to sub-center ``k``: the gradient of class
    j goes to the sub-center that attained the max (``best``, :func:`_subcenter_cosines`)."""
    if K == 1:
        part = grad
    else:
        part = tl.where(best == k, grad, 0.0)
    return part


@triton.jit
def _dot_tile(
    # the logit GEMM's operands: (x_ptr, w_ptr, D, stride_xb, stride_xd, stride_wr, stride_wd)
    operands,
    # the tile: batch rows (BLOCK_B,), weight rows (BLOCK_C,) int64, and their masks
    offs_b, w_rows, mask_b, mask_c,
    # meta
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    WITH_W_SQ: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``<x_b, w_i>`` for a (BLOCK_B, BLOCK_C) tile, fp32, and optionally the weight rows'
    sums of squares, accumulated from the same loads (no separate pass over W)."""
    x_ptr, w_ptr, D, stride_xb, stride_xd, stride_wr, stride_wd = operands
    offs_d = tl.arange(0, BLOCK_D)
    x_base = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
    w_base = w_ptr + w_rows[:, None] * stride_wr
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    w_sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask_d = d < D
        xt = tl.load(x_base + d[None, :] * stride_xd, mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        wt = tl.load(w_base + d[None, :] * stride_wd, mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        if WITH_W_SQ:
            wf = wt.to(tl.float32)
            w_sq += tl.sum(wf * wf, axis=1)
        acc = _mma(xt, tl.trans(wt), acc, DOT_FP32, INPUT_PRECISION)
    return acc, w_sq


@triton.jit
def _class_block(
    offs_c, mask_c, class_index_ptr, bias_ptr,
    BLOCK_C: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """``(classes, bias)`` of a class block: the class ids (int64; read through
    ``class_index`` when one is given) and their fp32 bias (0 without bias)."""
    if HAS_INDEX:
        classes = tl.load(class_index_ptr + offs_c, mask=mask_c, other=0)
    else:
        classes = offs_c.to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + classes, mask=mask_c, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    return classes, bias


@triton.jit
def _curricular_terms(threshold_ptr, offs_b, mask_b, B, BLOCK_B: tl.constexpr, KIND: tl.constexpr):
    """``(threshold, t)``: CurricularFace's per-row constants (rows 0 and 1 of the (2, B)
    fp32 ``row_threshold``), zeros for the other kinds (which never read them)."""
    if KIND == KIND_CURRICULAR:
        threshold = tl.load(threshold_ptr + offs_b, mask=mask_b, other=0.0)
        t = tl.load(threshold_ptr + B + offs_b, mask=mask_b, other=0.0)
    else:
        threshold = tl.zeros((BLOCK_B,), dtype=tl.float32)
        t = tl.zeros((BLOCK_B,), dtype=tl.float32)
    return threshold, t


@triton.jit
def _subcenter_cosines(
    # the logit GEMM's operands (see _dot_tile) and the (C*K,) fp32 column scales
    operands, col_scale_ptr,
    # the tile: batch rows, classes (BLOCK_C,), their weight rows' class ids (int64), masks
    offs_b, offs_c, classes, mask_b, mask_c, row_scale,
    # with SCALES_FROM_W: whether this program stores the scales it computes
    store_scales,
    # meta
    K: tl.constexpr, NORMALIZE_W: tl.constexpr, SCALES_FROM_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``u`` (BLOCK_B, BLOCK_C): the max over the K sub-centers of ``r * q * <x, w>``, and
    which sub-center attained it (the lowest on ties) for routing the gradient. The
    column scales ``q`` are, with ``SCALES_FROM_W`` (the forward), computed from the
    weight rows' sums of squares of the dot's own loads and stored where
    ``store_scales``; otherwise (the backward's recomputation) read from
    ``col_scale_ptr``, as the forward saved them."""
    u = tl.full((BLOCK_B, BLOCK_C), float("-inf"), dtype=tl.float32)
    best = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.int32)
    for k in range(K):
        acc, w_sq = _dot_tile(
            operands, offs_b, classes * K + k, mask_b, mask_c,
            BLOCK_B, BLOCK_C, BLOCK_D, NORMALIZE_W and SCALES_FROM_W, DOT_FP32, INPUT_PRECISION,
        )
        uk = acc * row_scale[:, None]
        if NORMALIZE_W:
            if SCALES_FROM_W:
                q = 1.0 / tl.maximum(tl.sqrt(w_sq), NORM_EPS)
                if store_scales:
                    tl.store(col_scale_ptr + offs_c.to(tl.int64) * K + k, q, mask=mask_c)
            else:
                q = tl.load(col_scale_ptr + offs_c.to(tl.int64) * K + k, mask=mask_c, other=1.0)
            uk = uk * q[None, :]
        # NaN propagates (tl.maximum drops it on GPUs): a NaN sub-center makes the class
        # NaN, as torch.amax does
        better = (uk > u) | (uk != uk)
        u = tl.where(better, uk, u)
        best = tl.where(better, k, best)
    return u, best


def _given(name: str):
    return lambda args: args[name] is not None


#: the flags of a kernel's optional inputs (``bias_ptr``, ``class_index_ptr``), derived by
#: ``triton.heuristics`` from their pointers: None when absent, which the JIT specializes as
#: a constexpr; the forward's and every backward's kernel take them this way
optional_inputs = triton.heuristics({"HAS_BIAS": _given("bias_ptr"), "HAS_INDEX": _given("class_index_ptr")})
#: the same, and ``GUARDED`` from ``guard_ptr``: the kernels that form dU check it for a
#: fused update's guard (``optim_update.py``) when one is given
optional_inputs_guarded = triton.heuristics(
    {"HAS_BIAS": _given("bias_ptr"), "HAS_INDEX": _given("class_index_ptr"), "GUARDED": _given("guard_ptr")}
)
