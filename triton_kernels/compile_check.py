"""Compile the kernels for a GPU target without a GPU (Triton's ahead-of-time path).

The interpreter runs the kernels' Python, not Triton's compiler, so it misses what only
compilation rejects (a non-constexpr global, a dtype mismatch in ``tl.dot``, a shared
memory overflow). ``compile_variants`` compiles each kernel for, by default, sm_90 with
the GPU tile sizes of :func:`default_tiles` over a set of options covering every flag,
and returns each variant's shared memory; ``main`` also prints registers and spills. The
compilation specializes the arguments as the JIT does for a typical call (unit strides,
16-divisible sizes and pointers). It needs the ``TRITON_INTERPRET`` variable unset when
Triton is imported (run it in a fresh process) and no GPU.

    python -c "from fused_margin.triton_kernels.compile_check import main; main()"
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Heuristics

from fused_margin.spec import NonTargetKind

from .backward import _margin_lse_bwd_dw_kernel, _margin_lse_bwd_dx_kernel
from .backward_atomic import _margin_lse_bwd_atomic_kernel
from .backward_gemm import _dot_grad_kernel, _gemm_dw_kernel, _gemm_dx_kernel
from .common import _GPU_TILES
from .lse_forward import _margin_lse_fwd_kernel

__all__ = ["KERNELS", "UPDATE_VARIANTS", "VARIANTS", "compile_variants", "main", "matrix_instructions"]

KERNELS = ("forward", "dx", "dw", "atomic", "gemm_logits", "gemm_dx", "gemm_dw")

_SCALARS = (
    "scale", "alpha", "delta", "margin",
    # a fused optimizer step's (optim_update.py)
    "lr", "weight_decay", "decay_factor", "momentum", "one_minus_dampening", "beta2", "one_minus_beta1",
    "one_minus_beta2", "eps", "step_size", "bias_correction2_sqrt",
)
_UNIT_STRIDES = ("stride_xd", "stride_wd", "stride_gd")
_BLOCK_COUNTS = ("blocks_per_split", "rho_blocks", "row_blocks")
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
    ("bf16", "bf16", False, "ieee", 0, True, True, False, False, 3),
    ("fp16", "fp16", False, "ieee", 5, True, True, False, False, 1),
]


#: the dW kernels ('dw', 'gemm_dw') with a fused optimizer step: (a variant above, the
#: step's name in UPDATES, the state's dtype, None: no state); every rule, flag and state
#: dtype once, on variants with K = 1 (the only ones the 'dw' kernel updates in)
UPDATE_VARIANTS = [
    (VARIANTS[0], "nesterov", "bf16"),
    (VARIANTS[1], "sgd_wd_maximize", None),
    (VARIANTS[3], "adamw", "fp32"),
    (VARIANTS[2], "momentum_first_step", "fp32"),
    (VARIANTS[5], "adam", "bf16"),
]
_NO_UPDATE = dict(UPDATE=0, MAXIMIZE=False, HAS_WEIGHT_DECAY=False, HAS_MOMENTUM=False, NESTEROV=False,
                  FIRST_STEP=False, DECOUPLED=False)
#: the constexprs of each named step
UPDATES = {
    "nesterov": dict(_NO_UPDATE, UPDATE=1, HAS_WEIGHT_DECAY=True, HAS_MOMENTUM=True, NESTEROV=True),
    "sgd_wd_maximize": dict(_NO_UPDATE, UPDATE=1, HAS_WEIGHT_DECAY=True, MAXIMIZE=True),
    "adamw": dict(_NO_UPDATE, UPDATE=2, HAS_WEIGHT_DECAY=True, DECOUPLED=True),
    "momentum_first_step": dict(_NO_UPDATE, UPDATE=1, HAS_MOMENTUM=True, FIRST_STEP=True),
    "adam": dict(_NO_UPDATE, UPDATE=2, HAS_WEIGHT_DECAY=True, MAXIMIZE=True),
}


def _compile(kernel: str, variant: tuple, target: GPUTarget, update: tuple[str, str | None] | None = None):
    x_dtype, w_dtype, grad_fp32, precision, kind, normalize_x, normalize_w, bias, index, k = variant[:10]
    dot_fp32 = x_dtype != w_dtype or x_dtype == "fp32"
    grad_dot_fp32 = dot_fp32 or grad_fp32
    fp32_operands = dot_fp32 if kernel in ("forward", "gemm_logits") else grad_dot_fp32
    operands = "16" if not fp32_operands else ("ieee" if precision == "ieee" else "tf32")
    tiles_key = f"{kernel}_update" if update is not None and kernel in ("dw", "gemm_dw") else kernel
    block_b, block_c, block_d, block_do, num_warps, num_stages = _GPU_TILES[(tiles_key, operands)]
    constants = dict(
        K=k, KIND=kind, NORMALIZE_X=normalize_x, NORMALIZE_W=normalize_w, HAS_BIAS=bias, HAS_INDEX=index,
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
    )
    pointers = dict(
        x_ptr=f"*{x_dtype}", w_ptr=f"*{w_dtype}", labels_ptr="*i64", bias_ptr=f"*{w_dtype}",
        class_index_ptr="*i64", threshold_ptr="*fp32",
    )
    workspace = "fp32" if grad_dot_fp32 else w_dtype
    if kernel in ("gemm_dx", "gemm_dw"):
        constants = dict(K=k, HAS_INDEX=index, GRAD_DOT_FP32=grad_dot_fp32, INPUT_PRECISION=precision)
        pointers = dict(dot_grad_ptr=f"*{workspace}", x_ptr=f"*{x_dtype}", w_ptr=f"*{w_dtype}", class_index_ptr="*i64")
        if kernel == "gemm_dx":
            fn = _gemm_dx_kernel
            constants.update(BLOCK_M=block_b, BLOCK_N=block_do, BLOCK_K=block_c)
        else:
            fn = _gemm_dw_kernel
            constants.update(NORMALIZE_W=normalize_w, HAS_BIAS=bias, BLOCK_R=block_c, BLOCK_N=block_do, BLOCK_B=block_b)
            pointers.update(grad_w_ptr=f"*{w_dtype}")
    elif kernel == "gemm_logits":
        fn = _dot_grad_kernel
        pointers.update({name: "*fp32" for name in _BACKWARD_VECTORS}, dot_grad_ptr=f"*{workspace}")
    elif kernel == "forward":
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
    if isinstance(fn, Heuristics):  # HAS_BIAS / HAS_INDEX / GUARDED from the pointers: given below
        fn = fn.fn
    # absent optional tensors are None, which the JIT specializes as constexpr None
    absent = [] if bias else ["bias_ptr", "bias_partial_ptr", "grad_bias_ptr"]
    absent += [] if index else ["class_index_ptr"]
    absent += [] if kind == int(NonTargetKind.CURRICULAR) else ["threshold_ptr"]  # read by CurricularFace only
    absent += ["grad_w_ptr"] if update is not None else []
    constants.update({name: None for name in absent if name in fn.arg_names})
    # a fused update's guard: checked by the kernels that form dU ('dx', 'gemm_logits'),
    # and by the dW kernels before they write
    if "guard_ptr" in fn.arg_names:
        if update is None:
            constants["guard_ptr"] = None
        else:
            pointers["guard_ptr"] = "*i32"
    if "GUARDED" in fn.arg_names:
        constants["GUARDED"] = update is not None
    if kernel in ("dw", "gemm_dw"):
        name, state_dtype = update or ("none", None)
        constants.update(UPDATES.get(name, _NO_UPDATE))
        for ptr in ("state1_ptr", "state2_ptr"):
            if state_dtype is None:
                constants[ptr] = None
            else:
                pointers[ptr] = f"*{state_dtype}"
    signature = {
        name: "constexpr" if name in constants else pointers.get(
            name, "fp32" if name in _SCALARS else "*fp32" if name.endswith("_ptr") else "i32"
        )
        for name in fn.arg_names
    }
    # What the JIT would specialize on a typical GPU call (B, C, D multiples of 16, inputs
    # contiguous): unit strides become constants, pointers and sizes 16-divisible. Without
    # this the compiler cannot prove contiguity and emits scalar loads without cp.async.
    for name in _UNIT_STRIDES:
        if name in signature:
            signature[name] = "constexpr"
            constants[name] = 1
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or (signature[name] == "i32" and name not in _BLOCK_COUNTS)
    }
    return triton.compile(
        ASTSource(fn, signature, constants, attrs), target=target,
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def resource_usage(compiled) -> tuple[int, int]:
    """``(registers per thread, spill stack bytes)`` of a compiled kernel's cubin, read
    with the cuobjdump that ships with Triton's NVIDIA backend (CUDA 13.0's ptxas/cuobjdump
    may not read the PTX version Triton emits)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no register line in cuobjdump's output: {out!r}")
    return int(found.group(1)), int(found.group(2))


def matrix_instructions(compiled) -> dict[str, int]:
    """How the kernel multiplies, counted in its PTX: Hopper's asynchronous tensor-core
    instructions (``wgmma``), Ampere's synchronous ones (``mma.sync``, half of Hopper's
    tensor-core rate at best) and fp32 FMAs on the CUDA cores (``fma``, what an exact
    fp32 ``tl.dot`` becomes)."""
    ptx = compiled.asm["ptx"]
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "mma.sync": len(re.findall(r"\bmma\.sync\b", ptx)),
        "fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
    }


def _compiled_variants(arch: int, variants: list[tuple] | None):
    """``(kernel, variant, compiled)`` for each kernel and variant, in order; raises on
    the first that does not compile."""
    target = GPUTarget("cuda", arch, 32)
    for kernel in KERNELS:
        for variant in variants or VARIANTS:
            yield kernel, variant, _compile(kernel, variant, target)
        if kernel in ("dx", "dw", "gemm_logits", "gemm_dw") and variants is None:
            for variant, update, state_dtype in UPDATE_VARIANTS:
                yield kernel, (*variant, update), _compile(kernel, variant, target, (update, state_dtype))


def compile_variants(
    arch: int = 90, variants: list[tuple] | None = None
) -> list[tuple[str, tuple, int, dict[str, int]]]:
    """``(kernel, variant, shared memory bytes, matrix instructions)`` for each kernel and
    variant; raises on the first that does not compile."""
    return [
        (kernel, variant, int(compiled.metadata.shared), matrix_instructions(compiled))
        for kernel, variant, compiled in _compiled_variants(arch, variants)
    ]


def main() -> None:
    """Every kernel and variant for sm_90: shared memory, registers, spill bytes, and the
    matrix instructions in its PTX."""
    for kernel, variant, compiled in _compiled_variants(90, None):
        registers, spill = resource_usage(compiled)
        counts = "  ".join(f"{name} {n}" for name, n in matrix_instructions(compiled).items())
        print(f"{kernel:12s} {variant} shared {compiled.metadata.shared:6d} B  registers {registers:3d}  "
              f"spill {spill} B  {counts}")


if __name__ == "__main__":
    main()
