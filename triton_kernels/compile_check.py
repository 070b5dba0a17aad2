"""Compile the kernels for a GPU target without a GPU (Triton's ahead-of-time path).

The interpreter runs the kernels' Python, not Triton's compiler, so it misses what only
compilation rejects (a non-constexpr global, a dtype mismatch in ``tl.dot``, a shared
memory overflow). ``compile_variants`` compiles each kernel for, by default, sm_90 with
the GPU tile sizes of :func:`default_tiles` over a set of options covering every flag,
and returns each variant's shared memory; it needs the ``TRITON_INTERPRET`` variable
unset when Triton is imported (run it in a fresh process) and no GPU.

    python -c "from fused_margin.triton_kernels.compile_check import main; main()"
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .backward import _margin_lse_bwd_dw_kernel, _margin_lse_bwd_dx_kernel
from .backward_atomic import _margin_lse_bwd_atomic_kernel
from .common import _GPU_TILES
from .lse_forward import _margin_lse_fwd_kernel

__all__ = ["VARIANTS", "compile_variants", "main"]

_SCALARS = ("scale", "alpha", "delta", "margin", "t")
_BACKWARD_VECTORS = ("grad_lse_ptr", "grad_target_ptr", "grad_sum_ptr", "lse_ptr", "row_scale_ptr", "col_scale_ptr")

#: (x dtype, W dtype, grad_dot_fp32, input_precision, kind, normalize_x, normalize_w,
#: bias, class_index, K): every transform, dtype pairing, precision and flag at least once
VARIANTS = [
    ("bf16", "bf16", False, "ieee", 0, True, True, False, False, 1),
    ("fp16", "fp16", False, "ieee", 1, True, True, False, True, 1),
    ("bf16", "fp32", False, "ieee", 2, True, True, False, False, 1),
    ("fp32", "fp16", False, "tf32", 3, True, True, False, False, 1),
    ("fp32", "fp32", False, "tf32x3", 4, True, True, False, True, 3),
    ("bf16", "bf16", True, "ieee", 0, False, False, True, True, 1),
]


def _compile(kernel: str, variant: tuple, target: GPUTarget) -> int:
    x_dtype, w_dtype, grad_fp32, precision, kind, normalize_x, normalize_w, bias, index, k = variant
    dot_fp32 = x_dtype != w_dtype or x_dtype == "fp32"
    grad_dot_fp32 = dot_fp32 or grad_fp32
    fp32_operands = dot_fp32 if kernel == "forward" else grad_dot_fp32
    operands = "16" if not fp32_operands else ("ieee" if precision == "ieee" else "tf32")
    block_b, block_c, block_d, block_do, num_warps, num_stages = _GPU_TILES[(kernel, operands)]
    constants = dict(
        K=k, KIND=kind, NORMALIZE_X=normalize_x, NORMALIZE_W=normalize_w, HAS_BIAS=bias, HAS_INDEX=index,
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
    )
    pointers = dict(
        x_ptr=f"*{x_dtype}", w_ptr=f"*{w_dtype}", labels_ptr="*i64", bias_ptr=f"*{w_dtype}",
        class_index_ptr="*i64", threshold_ptr="*fp32",
    )
    if kernel == "forward":
        fn = _margin_lse_fwd_kernel
        pointers.update(partial_ptr="*fp32", partial_idx_ptr="*i32", row_scale_ptr="*fp32", col_scale_ptr="*fp32")
    else:
        constants.update(BLOCK_DO=block_do, GRAD_DOT_FP32=grad_dot_fp32)
        pointers.update({name: "*fp32" for name in _BACKWARD_VECTORS})
        if kernel == "dx":
            fn = _margin_lse_bwd_dx_kernel
            pointers.update(gx_partial_ptr="*fp32", rho_partial_ptr="*fp32")
        elif kernel == "atomic":
            fn = _margin_lse_bwd_atomic_kernel
            pointers.update(grad_x_ptr="*fp32", grad_w_ptr="*fp32", grad_bias_ptr="*fp32")
        else:
            fn = _margin_lse_bwd_dw_kernel
            pointers.update(grad_w_ptr=f"*{w_dtype}", grad_bias_ptr="*fp32")
    signature = {
        name: "constexpr" if name in constants else pointers.get(name, "fp32" if name in _SCALARS else "i32")
        for name in fn.arg_names
    }
    compiled = triton.compile(
        ASTSource(fn, signature, constants), target=target, options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return int(compiled.metadata.shared)


def compile_variants(arch: int = 90, variants: list[tuple] | None = None) -> list[tuple[str, tuple, int]]:
    """``(kernel, variant, shared memory bytes)`` for each kernel and variant; raises on
    the first that does not compile."""
    target = GPUTarget("cuda", arch, 32)
    return [
        (kernel, variant, _compile(kernel, variant, target))
        for kernel in ("forward", "dx", "dw", "atomic")
        for variant in (variants or VARIANTS)
    ]


def main() -> None:
    for kernel, variant, shared in compile_variants():
        print(f"{kernel:8s} {variant} shared memory {shared} B")


if __name__ == "__main__":
    main()
