"""The Triton backend: fused GPU kernels (``fused_margin.triton_kernels``).

Runs CUDA tensors; CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is first imported: the tests' way of running the kernels without a
GPU). Triton and the kernels are imported only when this backend is asked about or
used, so ``import fused_margin`` works without Triton. No fp64 (Triton's ``tl.dot``
has no fp64 tensor-core path; use the 'reference' or 'cpu' backends for fp64).

Options (backend attributes, or the environment variables read when an attribute is
None):

* ``input_precision`` / ``FUSED_MARGIN_TRITON_PRECISION``: how ``tl.dot`` multiplies
  fp32 operands: ``'ieee'`` (exact fp32 on CUDA cores, several times slower than the
  tensor-core modes), ``'tf32'`` (tensor cores, 10-bit mantissa products: ~1e-3
  relative error in each logit), ``'tf32x3'`` (three tf32 products per multiply, close
  to fp32). When neither is set, PyTorch's own setting decides, as it does for
  ``torch.mm`` (and so for the 'cuda' backend's cuBLAS GEMMs):
  ``torch.backends.cuda.matmul.fp32_precision`` (PyTorch >= 2.9) 'ieee'/'tf32' when
  set, else ``torch.get_float32_matmul_precision()``: 'highest' (PyTorch's default) gives
  ``'ieee'``, 'high' and 'medium' (``torch.set_float32_matmul_precision``, or
  ``torch.backends.cuda.matmul.allow_tf32 = True``) give ``'tf32'``. bf16/fp16
  operands always use tensor cores with fp32 accumulation; mixed dtypes (e.g. bf16 x
  with fp32 W) are multiplied in fp32, so under 'ieee' they too run on CUDA cores (the
  compiled code has no tensor-core instruction then): 'tf32' or 'tf32x3' put them on
  tensor cores.
* ``backward_mode`` / ``FUSED_MARGIN_TRITON_BACKWARD``: how the backward is computed;
  every mode recomputes the logits (none are kept from the forward).

  - ``'gemm'`` (default): one recomputation kernel writes ``dL/d<x, w>`` for a chunk of
    classes into a bounded workspace (``triton_kernels/backward_gemm.py``), two GEMM
    kernels turn it into dx and dW: 6 B C D flops, bitwise reproducible.
  - ``'recompute'``: two kernels without workspace (``triton_kernels/backward.py``), each
    recomputing the logits (and again per slice of D wider than its accumulator: 512
    columns for 16-bit operands, 256 for fp32): 8 B C D flops with bf16/fp16 up to
    D = 512, bitwise reproducible.
  - ``'atomic'``: one kernel that recomputes once and adds both gradients with fp32
    atomics (``triton_kernels/backward_atomic.py``): 6 B C D flops, last bits vary from
    run to run; with a bf16/fp16 W it keeps an fp32 buffer of W's shape.

  With a fused optimizer (``backward(..., update=...)``: ``fused_updates`` is True), the
  dW kernel applies the step to each tile of weight rows as soon as the tile's gradient
  is formed, in fp32, and stores the new W and optimizer state instead of dW
  (``triton_kernels/optim_update.py``): no gradient of W's shape is allocated. 'gemm'
  updates a chunk's rows after the chunk's other kernels have read them; 'recompute'
  updates from its dW kernel when each program owns whole rows (K = 1, D within one
  slice) and otherwise runs the 'gemm' backward; 'atomic', whose programs each add a
  part of a row's gradient, runs the 'gemm' backward too.
* ``grad_dot_fp32`` / ``FUSED_MARGIN_TRITON_GRAD_FP32=1``: the backward's two
  gradient GEMMs take ``dU`` in fp32 instead of rounding it to the bf16/fp16 input
  dtype (fp32 GEMMs: on CUDA cores under 'ieee', as above). Unset, it is on for fp16
  inputs (fp16's range flushes ``dU`` to zero at large C), with the gradient GEMMs in
  'tf32' (exact for fp16 operands, tensor cores) unless a precision is set; off for
  bf16 (fp32's exponent range) and fp32. ``FUSED_MARGIN_TRITON_GRAD_FP32=0`` turns it off. dW is accumulated in fp32
  in every case (over the whole batch, in registers, rounded once to W's dtype), so
  this only removes the rounding of ``dU``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..kernel_params import KernelParams
from . import Backend

if TYPE_CHECKING:
    from ..triton_kernels.common import TileConfig

_PRECISIONS = ("ieee", "tf32", "tf32x3")
#: torch.get_float32_matmul_precision() -> input_precision (what cuBLAS does on CUDA)
_TORCH_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}
_BACKWARD_MODES = ("gemm", "recompute", "atomic")
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return str(e) or type(e).__name__
    return ""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


class TritonBackend(Backend):
    name = "triton"
    auto_priority = {"cuda": 0}

    def __init__(self) -> None:
        #: 'ieee' | 'tf32' | 'tf32x3' | None (None: $FUSED_MARGIN_TRITON_PRECISION, else
        #: from torch.get_float32_matmul_precision())
        self.input_precision: str | None = None
        #: bool | None (None: $FUSED_MARGIN_TRITON_GRAD_FP32 == '1')
        self.grad_dot_fp32: bool | None = None
        #: 'gemm' | 'recompute' | 'atomic' | None (None: $FUSED_MARGIN_TRITON_BACKWARD, else 'gemm')
        self.backward_mode: str | None = None
        #: optional ``TileConfig`` overrides, keyed 'forward', 'dx', 'dw', 'atomic',
        #: 'gemm_logits', 'gemm_dx', 'gemm_dw' (tests, tuning)
        self.tiles: dict[str, TileConfig] = {}

    # ---- options -------------------------------------------------------------------

    def precision(self) -> str:
        value = self.input_precision or os.environ.get("FUSED_MARGIN_TRITON_PRECISION")
        if not value:
            value = torch_fp32_matmul_precision()
        if value not in _PRECISIONS:
            raise ValueError(f"the Triton input precision must be one of {_PRECISIONS}, got {value!r}")
        return value

    def gradient_dot_fp32(self, x_dtype: torch.dtype | None = None, w_dtype: torch.dtype | None = None) -> bool:
        """Whether the gradient GEMMs take ``dU`` in fp32. Unset (attribute and variable):
        yes for fp16 embeddings and weights, whose exponent range flushes ``dU`` (about
        ``s p / B``: ~1e-8 at B=1024, C=10^5) and ``dU r q`` to zero; no otherwise."""
        if self.grad_dot_fp32 is not None:
            return bool(self.grad_dot_fp32)
        env = os.environ.get("FUSED_MARGIN_TRITON_GRAD_FP32", "")
        if env:
            return env == "1"
        return x_dtype == torch.float16 and w_dtype == torch.float16

    def _fp16_range_safe(self, x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
        """fp16 inputs with neither option set: the gradient GEMMs multiply dU in fp32 and
        fp16 operands as 'tf32', which holds fp16 values exactly and rounds dU to fp16's
        10-bit mantissa with fp32's exponent range (tensor cores, no flush to zero). The
        logit recomputation multiplies fp16 by fp16 and ignores the precision."""
        unset = (self.grad_dot_fp32 is None and not os.environ.get("FUSED_MARGIN_TRITON_GRAD_FP32")
                 and self.input_precision is None and not os.environ.get("FUSED_MARGIN_TRITON_PRECISION"))
        return unset and x_dtype == torch.float16 and w_dtype == torch.float16

    def backward_implementation(self) -> str:
        value = self.backward_mode or os.environ.get("FUSED_MARGIN_TRITON_BACKWARD", "gemm")
        if value not in _BACKWARD_MODES:
            raise ValueError(f"the Triton backward mode must be one of {_BACKWARD_MODES}, got {value!r}")
        return value

    # ---- Backend -------------------------------------------------------------------

    def not_supported_reasons(self, x: Tensor, weight: Tensor, params: KernelParams) -> list[str]:
        reasons = []
        error = _triton_import_error()
        if error:
            reasons.append(f"triton cannot be imported ({error})")
        if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreting()):
            reasons.append(f"tensors are on {x.device}; Triton needs CUDA (or TRITON_INTERPRET=1 for CPU tensors)")
        for name, t in (("embeddings", x), ("weight", weight)):
            if t.dtype not in _SUPPORTED_DTYPES:
                reasons.append(f"{name} dtype {t.dtype} is not supported (fp32, bf16, fp16; no fp64)")
        return reasons

    def forward(self, x, weight, labels, bias, class_index, row_threshold, params):
        from ..triton_kernels.lse_forward import margin_lse_fwd

        if class_index is not None:
            _check_unique(class_index)
        return margin_lse_fwd(
            x, weight, labels, bias, class_index, row_threshold, params,
            input_precision=self.precision(), tiles=self.tiles.get("forward"),
        )

    #: the dW kernels of the 'gemm' and 'recompute' modes apply a fused optimizer step
    fused_updates = True

    def backward(self, grads, saved, params, update=None):
        from ..triton_kernels.backward_common import BackwardInputs

        inputs = BackwardInputs(grads, saved, params)
        step = None
        if update is not None:
            from ..triton_kernels.optim_update import update_arguments

            step = update_arguments(update, saved.weight)
        x, weight = saved.x, saved.weight
        options = dict(input_precision=self.precision(), grad_dot_fp32=self.gradient_dot_fp32(x.dtype, weight.dtype))
        if self._fp16_range_safe(x.dtype, weight.dtype):
            options["input_precision"] = "tf32"
        mode = self.backward_implementation()
        if mode == "gemm" or (mode == "atomic" and step is not None):
            # 'atomic' adds dW from many programs: no program holds a row's whole
            # gradient, so a fused update runs through the 'gemm' backward
            from ..triton_kernels.backward_gemm import margin_lse_bwd_gemm

            return margin_lse_bwd_gemm(inputs, **options, tiles=self.tiles, update=step)
        if mode == "atomic":
            from ..triton_kernels.backward_atomic import margin_lse_bwd_atomic

            return margin_lse_bwd_atomic(inputs, **options, tiles=self.tiles.get("atomic"))
        from ..triton_kernels.backward import margin_lse_bwd

        return margin_lse_bwd(
            inputs, **options, dx_tiles=self.tiles.get("dx"), dw_tiles=self.tiles.get("dw"), update=step
        )


def torch_fp32_matmul_precision() -> str:
    """'ieee' or 'tf32': what PyTorch's settings give ``torch.mm`` of fp32 CUDA tensors.
    PyTorch >= 2.9's ``torch.backends.cuda.matmul.fp32_precision`` (or the global
    ``torch.backends.fp32_precision``) first: once a user has set it,
    ``torch.get_float32_matmul_precision()`` raises."""
    matmul = getattr(torch.backends.cuda, "matmul", None)
    for value in (getattr(matmul, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None)):
        if value in ("ieee", "tf32"):
            return value
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # settings PyTorch itself calls inconsistent: its default
        return "ieee"
    return _TORCH_PRECISION.get(legacy, "ieee")


def _check_unique(class_index: Tensor) -> None:
    # The dW kernel writes each weight row in use from one program; a repeated class
    # would be two writers of one row (a race), so repeats are refused up front.
    if class_index.numel() > 1:
        ordered = torch.sort(class_index).values
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise ValueError("class_index must not repeat a class with backend='triton'")


BACKEND = TritonBackend()
