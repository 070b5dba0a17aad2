"""The CUDA C++ backend (csrc/cuda) against the float64 reference, on a GPU.

Every test is marked ``gpu`` (skipped without CUDA) and also skips when the extension
was built without its CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch

from fused_margin import MarginSpec, _ext
from fused_margin.backends.cuda import BACKEND
from fused_margin.optim.update import WeightUpdate
from tests.test_fused_update_cpp import LAYOUTS as FUSED_LAYOUTS
from tests.test_fused_update_cpp import UPDATES as FUSED_UPDATES
from tests.test_fused_update_cpp import check_empty_batch_update, check_fused_update, make_problem
from tests.utils import (
    HEAD_SPECS,
    assert_far_weight_rows_match,
    assert_forward_matches_reference,
    assert_matches_reference,
    assert_strided_inputs_match,
    chunk_size_fixture,
    class_index_case,
    loss_and_grads,
    make_inputs,
    random_state,
    tolerance,
)

pytestmark = pytest.mark.gpu

FP32_TOL = tolerance("cuda", torch.float32)
FP64_TOL = tolerance("cuda", torch.float64)
OUTPUTS = ("loss", "dx", "dW", "dbias")


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not _ext.has_cuda_kernels():
        pytest.skip(f"fused_margin._C has no CUDA kernels ({_ext.load_error() or 'built without CUDA'})")
    # exact fp32 GEMMs for the fp32 comparisons (TF32 would be a 1e-3 relative change)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


chunk_size = chunk_size_fixture(BACKEND)


def _compare(x, w, labels, spec, *, dtype, **kwargs):
    """The cuda backend against the float64 reference: ``assert_matches_reference``."""
    return assert_matches_reference("cuda", dtype, x, w, labels, spec, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(1, 1003, 3), (37, 1003, 67), (37, 1, 67), (300, 5000, 128)],
                         ids=lambda s: "B{}_C{}_D{}".format(*s))
@pytest.mark.parametrize("head", list(HEAD_SPECS))
def test_heads_match_reference(head, shape, dtype):
    batch, classes, dim = shape
    spec = HEAD_SPECS[head]
    x, w, labels = make_inputs(batch, classes, dim, num_subcenters=spec.num_subcenters,
                               ignore_rows=2 if batch > 8 else 0, peaked_rows=2 if batch > 8 else 0)
    bias = torch.randn(classes, dtype=torch.float64) if head == "softmax" else None
    _compare(x, w, labels, spec, dtype=dtype, tol=FP32_TOL if dtype == torch.float32 else FP64_TOL, bias=bias,
             what=head)


@pytest.mark.parametrize("head", ["cosface", "curricularface", "subcenter_arcface", "so_softmax", "softmax"])
def test_reduction_none_label_smoothing_small_chunks(head, chunk_size):
    """Random upstream gradients, label smoothing, and chunks far smaller than C (a
    ragged last chunk, several forward segments per chunk)."""
    chunk_size(2500)
    spec = HEAD_SPECS[head]
    x, w, labels = make_inputs(37, 7003, 67, num_subcenters=spec.num_subcenters, ignore_rows=3)
    bias = torch.randn(7003, dtype=torch.float64) if head == "softmax" else None
    upstream = torch.randn(37, dtype=torch.float64)
    _compare(x, w, labels, spec, dtype=torch.float64, tol=FP64_TOL, bias=bias, upstream=upstream,
             label_smoothing=0.1, what=head)


@pytest.mark.parametrize("repeated", [False, True], ids=["distinct", "repeated"])
@pytest.mark.parametrize("head", ["cosface", "subcenter_arcface", "softmax"])
def test_class_index(head, repeated, chunk_size):
    chunk_size(300)
    spec, x, w, labels, class_index, bias = class_index_case(head, repeated)
    _compare(x, w, labels, spec, dtype=torch.float64, tol=FP64_TOL, bias=bias, class_index=class_index.cuda(),
             what=head)


@pytest.mark.parametrize("head", ["cosface", "curricularface", "subcenter_arcface", "softmax"])
def test_forward_terms(head):
    assert_forward_matches_reference(BACKEND, head, "cuda", FP64_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head", ["cosface", "arcface", "cs_softmax"])
def test_low_precision(head, dtype):
    """fp16 / bf16: the kernel may be only as wrong as eager PyTorch in the same dtype on
    the GPU, plus a small tolerance (the dX / dW GEMMs read G in the input dtype), for each
    output and for each of its elements."""
    x, w, labels = make_inputs(256, 20000, 128)
    assert_matches_reference("cuda", dtype, x, w, labels, HEAD_SPECS[head], reduction="sum", what=head)


def test_deterministic_and_no_logits_materialized():
    """Two runs give bit-identical results, and the peak memory of a forward + backward
    stays far below one (B x C) fp32 matrix."""
    spec = MarginSpec.cosface()
    batch, classes, dim = 512, 400_000, 128
    torch.manual_seed(0)
    x = torch.randn(batch, dim, device="cuda")
    w = torch.randn(classes, dim, device="cuda")
    labels = torch.randint(0, classes, (batch,), device="cuda")
    first = loss_and_grads(x, w, labels, spec, backend="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    second = loss_and_grads(x, w, labels, spec, backend="cuda")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for name, a, b in zip(OUTPUTS, first, second):
        if a is not None:
            assert torch.equal(a, b), name
    # beyond the inputs the step holds their gradients (loss_and_grads passes the inputs
    # as detached aliases: no copy of W) and the chunk workspaces (~32 MiB tiles)
    extra = peak - (w.numel() * w.element_size() + x.numel() * x.element_size())
    logits_bytes = batch * classes * 4
    assert extra < logits_bytes / 4, f"{extra / 2**20:.0f} MiB beyond dW and dx; logits: {logits_bytes / 2**20:.0f} MiB"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_weight_offsets_beyond_int32(dtype):
    """Rows of W more than 2**31 elements from its start (10^7 classes x D = 512) are
    addressed in 64 bits (see ``assert_far_weight_rows_match``)."""
    assert_far_weight_rows_match("cuda", "cuda", dtype)


def test_strided_inputs():
    """Sliced embeddings, a transposed (column-major) or row-strided weight, strided
    labels and bias give what their contiguous copies give."""
    assert_strided_inputs_match("cuda", "cuda", torch.float32, 1e-6)


# ---- the optimizer step fused into the backward (csrc/optim_update.h) -------------------


@pytest.mark.parametrize("layout", list(FUSED_LAYOUTS))
@pytest.mark.parametrize("rule", list(FUSED_UPDATES))
def test_fused_update_matches_backward_then_rule(rule, layout, chunk_size):
    """The fused backward's weight and state against the plain backward's dW followed by
    ``apply_update_`` on the same rows (tests/test_fused_update_cpp.py), on the GPU."""
    chunk_size(16)
    check_fused_update(BACKEND, "cuda", FUSED_LAYOUTS[layout], FUSED_UPDATES[rule])


def test_fused_update_empty_batch_and_large_chunks(chunk_size):
    """No rows (a zero gradient: the step still applies), then one chunk for all classes."""
    check_empty_batch_update(BACKEND, "cuda")
    chunk_size(100_000)
    check_fused_update(BACKEND, "cuda", FUSED_LAYOUTS["fp32_k2"], FUSED_UPDATES["adam"])


def test_fused_update_allocates_no_weight_gradient():
    """The fused backward's peak memory stays far below one weight-sized tensor (the plain
    backward's gradient)."""
    problem = make_problem(BACKEND, "cuda", x_dtype=torch.float32, w_dtype=torch.float32, batch=64,
                           classes_all=1_000_000, dim=128)
    w_bytes = problem.saved.weight.numel() * problem.saved.weight.element_size()
    fields = FUSED_UPDATES["adam"]
    update = WeightUpdate(**fields, state=random_state(fields, problem.saved.weight))

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    plain = peak(lambda: BACKEND.backward(problem.grads, problem.saved, problem.params))
    assert plain >= w_bytes
    fused = peak(lambda: BACKEND.backward(problem.grads, problem.saved, problem.params, update))
    assert fused < w_bytes / 4, f"{fused / 2**20:.1f} MiB; weight: {w_bytes / 2**20:.1f} MiB"
