"""The C++ CPU backend (csrc/cpu) against the float64 reference.

Shapes are odd on purpose (B in {1, 37}, C in {1, 1003}, D in {3, 67}); the default chunk
(>= 64 weight rows) cuts C = 1003 into many chunks and groups, and a few tests force tiny
chunks. Without the compiled extension every test but the fallback test skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fused_margin as fm
from fused_margin import BackendUnavailableError, MarginSpec, _ext
from fused_margin.backends import resolve_backend
from fused_margin.backends.cpu import BACKEND
from fused_margin.kernel_params import KernelParams
from tests.utils import (
    HEAD_SPECS,
    assert_far_weight_rows_match,
    assert_forward_matches_reference,
    assert_matches_reference,
    assert_rel_close,
    assert_strided_inputs_match,
    chunk_size_fixture,
    class_index_case,
    given,
    loss_and_grads,
    make_inputs,
    needs_ext,
    op_samples,
    problems,
    settings,
    st,
    tolerance,
)

#: fp32 inputs against the float64 reference on the same (fp32-rounded) inputs
FP32_TOL = tolerance("cpu", torch.float32)
FP64_TOL = tolerance("cpu", torch.float64)
OUTPUTS = ("loss", "dx", "dW", "dbias")
SHAPES = [(1, 1003, 3), (37, 1003, 67), (37, 1, 67), (5, 7, 3)]


chunk_size = chunk_size_fixture(BACKEND)


def _compare(x, w, labels, spec, *, dtype, **kwargs):
    """The cpu backend against the float64 reference: ``assert_matches_reference``."""
    return assert_matches_reference("cpu", dtype, x, w, labels, spec, **kwargs)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_C{}_D{}".format(*s))
@pytest.mark.parametrize("head", list(HEAD_SPECS))
def test_heads_match_reference(head, shape, dtype):
    """Loss, dx, dW (and dbias for the linear head) of every head, with ignored rows and
    rows whose embedding is aligned with its target (c_y = 1)."""
    batch, classes, dim = shape
    spec = HEAD_SPECS[head]
    x, w, labels = make_inputs(
        batch, classes, dim, num_subcenters=spec.num_subcenters, ignore_rows=2 if batch > 8 else 0,
        peaked_rows=2 if batch > 8 else 0,
    )
    bias = torch.randn(classes, dtype=torch.float64) if head == "softmax" else None
    tol = FP32_TOL if dtype == torch.float32 else FP64_TOL
    _compare(x, w, labels, spec, dtype=dtype, tol=tol, bias=bias, what=head)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("head", ["cosface", "curricularface", "subcenter_arcface", "so_softmax", "softmax"])
def test_reduction_none_random_upstream(head, dtype):
    spec = HEAD_SPECS[head]
    x, w, labels = make_inputs(37, 1003, 67, num_subcenters=spec.num_subcenters, ignore_rows=3)
    upstream = torch.randn(37, dtype=torch.float64)
    tol = FP32_TOL if dtype == torch.float32 else FP64_TOL
    _compare(x, w, labels, spec, dtype=dtype, tol=tol, upstream=upstream.to(dtype), what=head)


@needs_ext
@pytest.mark.parametrize("head", ["cosface", "subcenter_arcface", "softmax", "circle"])
@pytest.mark.parametrize("repeated", [False, True], ids=["distinct", "repeated"])
def test_class_index(head, repeated):
    """Negative-class sampling: rows read through class_index (distinct entries are
    written in place; repeated ones go through index_add_), unused rows get zero."""
    spec, x, w, labels, class_index, bias = class_index_case(head, repeated)
    k = spec.num_subcenters
    for dtype, tol in ((torch.float64, FP64_TOL), (torch.float32, FP32_TOL)):
        out = _compare(x, w, labels, spec, dtype=dtype, tol=tol, bias=bias, class_index=class_index, what=head)
        unused = torch.ones(1500, dtype=torch.bool)
        unused[class_index] = False
        assert (out[2].view(1500, k, -1)[unused] == 0).all()


@needs_ext
@pytest.mark.parametrize("head", ["cosface", "cs_softmax", "so_softmax"])
def test_label_smoothing(head):
    x, w, labels = make_inputs(37, 1003, 67, ignore_rows=2)
    for dtype, tol in ((torch.float64, FP64_TOL), (torch.float32, FP32_TOL)):
        _compare(x, w, labels, HEAD_SPECS[head], dtype=dtype, tol=tol, label_smoothing=0.1, what=head)


@needs_ext
@pytest.mark.parametrize("head", ["cosface", "curricularface", "subcenter_arcface", "softmax"])
def test_forward_terms(head):
    """The op's six outputs, argmax included, against the reference's."""
    assert_forward_matches_reference(BACKEND, head, "cpu", FP64_TOL)


@needs_ext
def test_single_class_and_empty_negatives():
    """C = 1: every labelled row has no negative class, lse_neg = -inf and nothing is NaN."""
    x, w, labels = make_inputs(6, 1, 5)
    labels[-1] = -100
    for head in ("cosface", "softmax", "so_softmax"):
        loss, dx, dw, _ = loss_and_grads(x.float(), w.float(), labels, HEAD_SPECS[head], backend="cpu")
        assert torch.isfinite(loss) and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    params = KernelParams.from_spec(HEAD_SPECS["cosface"])
    lse_neg = BACKEND.forward(x, w, labels.clamp_min(-1), None, None, None, params)[0]
    assert torch.isneginf(lse_neg[:-1]).all() and torch.isfinite(lse_neg[-1])


@needs_ext
@pytest.mark.parametrize("shape", [(37, 3000, 67), (64, 50, 33)], ids=["many_groups", "one_chunk"])
def test_independent_of_thread_count(shape):
    """Chunks and groups depend on the shapes only and partials merge in a fixed order:
    1 and 2 threads give bit-identical results."""
    batch, classes, dim = shape
    x, w, labels = make_inputs(batch, classes, dim, dtype=torch.float32, ignore_rows=1)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(loss_and_grads(x, w, labels, HEAD_SPECS["arcface"], backend="cpu", return_accuracy=False))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(OUTPUTS, *results):
        if a is not None:
            assert torch.equal(a, b), name


@needs_ext
def test_chunk_size_does_not_matter(chunk_size):
    """Tiny chunks (many more chunks than groups, a ragged last chunk) and one chunk for
    everything agree with the automatic choice."""
    spec = HEAD_SPECS["subcenter_arcface"]
    x, w, labels = make_inputs(37, 1003, 67, num_subcenters=3, ignore_rows=1)
    base = loss_and_grads(x, w, labels, spec, backend="cpu")
    for size in (7, 1003):
        chunk_size(size)
        for name, a, b in zip(OUTPUTS, loss_and_grads(x, w, labels, spec, backend="cpu"), base):
            if a is not None:
                assert_rel_close(a, b, FP64_TOL, f"chunk_size={size} {name}")


@needs_ext
def test_far_classes_underflow():
    """Aligned rows at s=64: most softmax probabilities fall below fp32's normal range
    (the denormal trap of docs/design.md section 5) and are flushed to zero in the epilogue.
    The loss is ~1e-6 here, so the fp32 `logaddexp(z_y, lse) - z_y` downstream of the
    kernel cancels: the kernel may be as wrong as eager fp32, plus a small tolerance, for
    each output and for each of its elements."""
    x, w, labels = make_inputs(37, 1003, 67, peaked_rows=37)
    x, w = (x * 10.0).float(), w.float()
    spec = MarginSpec.cosface(scale=64.0)
    out = assert_matches_reference("cpu", torch.float32, x, w, labels, spec, against_eager=True, tol=FP32_TOL,
                                   what="far classes")
    assert float(out[0]) > 0


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs(dtype):
    """bf16 / fp16 inputs are converted per chunk and accumulated in fp32: the kernel may be
    only as wrong as eager PyTorch in the same dtype, plus a small tolerance, for each output
    and for each of its elements."""
    x, w, labels = make_inputs(37, 1003, 67)
    assert_matches_reference("cpu", dtype, x, w, labels, HEAD_SPECS["cosface"], what="cosface")


@needs_ext
def test_opcheck():
    """The public op with backend='cpu' passes torch.library.opcheck (schema, fake kernel,
    autograd registration against this implementation)."""
    from fused_margin.ops import margin_lse

    for args in op_samples("cpu", heads=("cosface", "curricularface", "subcenter_arcface", "softmax")):
        torch.library.opcheck(margin_lse, args)


@needs_ext
def test_validation_names_the_argument():
    params = KernelParams.from_spec(HEAD_SPECS["cosface"])
    x, w, labels = make_inputs(4, 5, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        BACKEND.forward(x, w[:, :2], labels, None, None, None, params)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        BACKEND.forward(x, w, labels[:3], None, None, None, params)
    with pytest.raises(RuntimeError, match=r"class_index\[1\] = 9"):
        BACKEND.forward(x, w, labels, None, torch.tensor([0, 9]), None, params)
    curricular = KernelParams.from_spec(HEAD_SPECS["curricularface"])
    with pytest.raises(RuntimeError, match="needs row_threshold"):
        BACKEND.forward(x, w, labels, None, None, None, curricular)


@needs_ext
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_memory_stays_bounded():
    """B x C fp32 would be 128 MiB here; the peak resident memory of a forward + backward
    (in a fresh process, over its inputs) stays far below that: only O(B x chunk) tiles."""
    script = textwrap.dedent(
        """
        import torch, fused_margin as fm
        torch.manual_seed(0)
        B, C, D = 256, 131072, 16
        x = torch.randn(B, D, requires_grad=True)
        w = torch.randn(C, D, requires_grad=True)
        y = torch.randint(0, C, (B,))
        spec = fm.MarginSpec.cosface()
        fm.margin_cross_entropy(x[:2], w[:100], y[:2] % 100, spec, backend="cpu").backward()  # warm-up
        w.grad = None
        def status(key):
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
        # ru_maxrss survives exec (it holds the parent's peak): reset this process's peak
        # RSS (VmHWM) instead, and measure from the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS:")
        fm.margin_cross_entropy(x, w, y, spec, backend="cpu").backward()
        print((status("VmHWM:") - before) / 1024.0)
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    growth_mib = float(result.stdout.strip().splitlines()[-1])
    # grad of W (8 MiB) + workspace; the logits alone would be 128 MiB
    assert growth_mib < 40, f"peak RSS grew by {growth_mib:.1f} MiB"



@needs_ext
@settings(max_examples=40, deadline=None)
@given(problem=problems(), chunk=st.sampled_from([0, 1, 5, 64]))
def test_random_problems_match_reference(problem, chunk):
    """Random heads, shapes, ignored rows, class sampling, label smoothing, reductions
    (random upstream gradients for 'none') and chunk sizes: float64 loss and every
    gradient equal the eager reference's to rounding."""
    x, w, labels, kwargs = problem.inputs()
    saved, BACKEND.chunk_size = BACKEND.chunk_size, chunk
    try:
        _compare(x, w, labels, HEAD_SPECS[problem.name], dtype=torch.float64, tol=FP64_TOL, what=str(problem),
                 atol=problem.atol(FP64_TOL), **kwargs)
    finally:
        BACKEND.chunk_size = saved

def test_missing_extension_warns_once_and_auto_falls_back(monkeypatch):
    """Without the extension: import works, 'auto' falls back to the next backend with one
    warning, an explicit backend='cpu' raises and says how to build it."""
    monkeypatch.setattr(_ext, "load_error", lambda: "ImportError: simulated")
    monkeypatch.setattr(_ext, "_warned", False)
    params = KernelParams.from_spec(HEAD_SPECS["cosface"])
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = resolve_backend("auto", x, w, params)
        second = resolve_backend("auto", x, w, params)
    assert first == second and first != "cpu"
    messages = [str(c.message) for c in caught if "fused_margin._C" in str(c.message)]
    assert len(messages) == 1 and "pip install --no-build-isolation -e ." in messages[0]
    with pytest.raises(BackendUnavailableError, match="fused_margin._C is not available"):
        resolve_backend("cpu", x, w, params)
    labels = torch.tensor([0, 1, 4])
    loss = fm.margin_cross_entropy(x, w, labels, HEAD_SPECS["cosface"])  # runs on the fallback
    assert torch.isfinite(loss)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_offsets_beyond_int32(dtype):
    """Rows of W more than 2**31 elements from its start (10^7 classes x D = 512) are
    addressed in 64 bits (see ``assert_far_weight_rows_match``)."""
    assert_far_weight_rows_match("cpu", "cpu", dtype)


@needs_ext
def test_strided_inputs():
    """Sliced embeddings, a transposed (column-major) or row-strided weight, strided
    labels and bias give what their contiguous copies give."""
    assert_strided_inputs_match("cpu", "cpu", torch.float32, 1e-6)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _peak_rss_growth(step, *leaves: torch.Tensor) -> int:
    """Bytes of peak resident memory beyond the current one while ``step()`` runs (after a
    first, unmeasured call that makes the one-time allocations); the gradients of
    ``leaves`` are dropped before measuring, so the growth includes them."""
    import ctypes
    import gc

    step()
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    step()
    return _rss_kib("VmHWM") * 1024 - base


@needs_ext
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_lsoftmax_weight_norm_adds_no_dense_gradient():
    """L-Softmax's target needs ``||w_y||``: its gradient reaches W as B sparse rows added
    into the kernel's dW, not as a dense W-sized buffer (a gathered ``index_select``
    scatters into zeros of W's shape, and autograd then adds the two: twice W beyond the
    gradient). Peak resident memory of forward + backward beyond the inputs, at a W of
    49 MiB: at most 1.5 W (the gradient itself); the dense path measures 2.0 W."""
    torch.manual_seed(0)
    w = torch.randn(200_000, 64, requires_grad=True)
    x = torch.randn(16, 64, requires_grad=True)
    labels = torch.randint(0, 200_000, (16,))
    spec = MarginSpec.lsoftmax(lam=2.0)
    w_bytes = w.numel() * w.element_size()

    def step():
        fm.margin_cross_entropy(x, w, labels, spec, backend="cpu").backward()

    extra = _peak_rss_growth(step, w, x)
    assert not w.grad.is_sparse
    assert extra <= 1.5 * w_bytes, f"peak {extra / 2**20:.0f} MiB beyond the inputs, W {w_bytes / 2**20:.0f} MiB"
    # the value: the same gradient as the dense gather's
    w_dense = w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        rows = w_dense.index_select(0, labels)
        torch.linalg.vector_norm(rows, dim=1).sum().backward()
    w_sparse = w.detach().clone().requires_grad_(True)
    from fused_margin.spec import _TargetRowNorm

    _TargetRowNorm.apply(w_sparse, labels, torch.float32).sum().backward()
    assert torch.allclose(w_sparse.grad.to_dense(), w_dense.grad, atol=1e-6)


@needs_ext
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_transposed_weight_is_not_copied():
    """A (D, C) parameter passed as its transposed view (pytorch-metric-learning's layout)
    is read chunk by chunk, never copied whole: peak resident memory of forward + backward
    beyond the inputs stays near the gradient (1 W), where a row-major copy of W in each
    pass measures 2 W. The values equal those of a contiguous copy."""
    torch.manual_seed(0)
    w_dc = torch.randn(64, 200_000, requires_grad=True)
    x = torch.randn(16, 64, requires_grad=True)
    labels = torch.randint(0, 200_000, (16,))
    spec = MarginSpec.cosface()
    w_bytes = w_dc.numel() * w_dc.element_size()
    losses = []

    def step():
        loss = fm.margin_cross_entropy(x, w_dc.t(), labels, spec, backend="cpu")
        loss.backward()
        losses.append(loss.detach())

    extra = _peak_rss_growth(step, w_dc, x)
    assert extra <= 1.5 * w_bytes, f"peak {extra / 2**20:.0f} MiB beyond the inputs, W {w_bytes / 2**20:.0f} MiB"
    w_rows = w_dc.detach().t().contiguous().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    loss = fm.margin_cross_entropy(x2, w_rows, labels, spec, backend="cpu")
    loss.backward()
    assert torch.allclose(losses[-1], loss.detach(), rtol=1e-6)
    assert torch.allclose(w_dc.grad.t(), w_rows.grad, rtol=1e-5, atol=1e-9)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-9)
