"""The Triton backend against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: ``conftest.py``
sets ``TRITON_INTERPRET=1`` before anything imports Triton (Triton fixes interpreter or
compiler when a function is decorated, so it must be set that early).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fused_margin as fm
from fused_margin import BackendUnavailableError, MarginSpec
from fused_margin.backends.triton import BACKEND
from fused_margin.kernel_params import KernelParams, SavedTensors, UpstreamGrads
from fused_margin.reference import margin_lse_terms
from tests.utils import (
    HEAD_SPECS,
    assert_exact_zeros,
    assert_far_weight_rows_match,
    assert_no_less_accurate_than_eager,
    assert_rel_close,
    assert_strided_inputs_match,
    given,
    loss_and_grads,
    make_inputs,
    problems,
    rel_err,
    settings,
    st,
    tolerance,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
# fp32 inputs, exact ('ieee') fp32 dots: the spec's bound for every output
FP32_TOL = tolerance("triton", torch.float32)
# An output whose float64 reference is this small (norm) is 0 in fp32 arithmetic: its
# terms lie below fp32's normal range (1.2e-38). Found by the property test: ArcFace with
# B=1, C=2 and one dominant logit gives dx ~ 1e-42 in float64 and exactly 0 in fp32 (eager
# fp32 included), an infinite relative error.
FP32_UNDERFLOW = 1e-30
OUTPUTS = ("loss", "dx", "dW", "dbias")

pytestmark = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="needs a CUDA device or TRITON_INTERPRET=1",
)


def test_kernels_run_in_the_mode_the_tests_need():
    """Guards the set-up above: interpreted kernels on CPU tensors, compiled ones on a GPU."""
    from triton.runtime.interpreter import InterpretedFunction

    from fused_margin.triton_kernels.lse_forward import _margin_lse_fwd_kernel

    # the jit function under the kernel's triton.heuristics (its HAS_BIAS / HAS_INDEX)
    assert isinstance(_margin_lse_fwd_kernel.fn, InterpretedFunction) == INTERPRETED


def _run(x, w, labels, spec, *, backend, dtype=None, w_dtype=None, bias=None, upstream=None, **kwargs):
    """(loss, dx, dW, dbias) with inputs cast to (dtype, w_dtype) on DEVICE (float64 on
    the reference side: pass dtype=torch.float64)."""
    dtype = dtype or torch.float32
    w_dtype = w_dtype or dtype
    cast = {"device": DEVICE}
    if upstream is not None:
        upstream = upstream.to(device=DEVICE, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if kwargs.get("class_index") is not None:
        kwargs["class_index"] = kwargs["class_index"].to(DEVICE)
    return loss_and_grads(
        x.to(dtype=dtype, **cast), w.to(dtype=w_dtype, **cast), labels.to(DEVICE), spec, backend=backend,
        upstream=upstream, bias=None if bias is None else bias.to(dtype=w_dtype, **cast), **kwargs,
    )


def _check_fp32(name, x, w, labels, spec, tol=FP32_TOL, atol=0.0, bias_atol=0.0, **kwargs):
    """Triton in fp32 vs eager in float64 on the same (fp32-representable) inputs
    (``atol``: see ``assert_rel_close``; ``bias_atol``: the same for dbias only; never
    below ``FP32_UNDERFLOW``)."""
    x, w = x.float().double(), w.float().double()
    if kwargs.get("bias") is not None:
        kwargs["bias"] = kwargs["bias"].float().double()
    ref = _run(x, w, labels, spec, backend="eager", dtype=torch.float64, **kwargs)
    out = _run(x, w, labels, spec, backend="triton", **kwargs)
    for what, a, b in zip(OUTPUTS, out, ref):
        if b is not None:
            floor = max(atol, FP32_UNDERFLOW, bias_atol if what == "dbias" else 0.0)
            assert_rel_close(a, b, tol, f"{name} {what}", atol=floor)
    assert_exact_zeros(out, labels, what=name, num_subcenters=spec.num_subcenters, **kwargs)
    return out


def _bias_grad_floor(labels, kwargs, tol):
    """An absolute floor for dbias: each entry is a sum over rows of ``p - [j = y]`` terms
    that cancel (with two classes in use the entries are +-a, from terms ~1/B each), so
    fp32 is only accurate relative to the terms' total size, at most ``sum_b |g_b|`` per
    class (``g_b`` the row's upstream gradient): ``2 tol sum_b |g_b|``. A wrong gradient
    is off by the size of the terms, far above it. (Found by the property test:
    Problem(name='softmax', batch=31, num_classes=23, dim=23, num_used=2, seed=83811),
    dbias 1.5e-5 in every backward mode against eager fp32's 4.4e-6.)"""
    valid = labels >= 0
    if kwargs.get("upstream") is not None:
        total = float(kwargs["upstream"][valid].abs().sum())
    elif kwargs.get("reduction") == "sum":
        total = float(valid.sum())
    else:
        total = 1.0
    return 2 * tol * total


def _check_three_way(name, x, w, labels, spec, dtype, w_dtype, tol, **kwargs):
    """Low-precision inputs: the kernel may be only as wrong, against float64 on the same
    rounded inputs, as eager PyTorch on the same dtypes is, plus ``tol``, for each output
    and for each of its elements (``assert_no_less_accurate_than_eager``)."""
    x, w = x.to(dtype), w.to(w_dtype)
    if kwargs.get("bias") is not None:
        kwargs["bias"] = kwargs["bias"].to(w_dtype)
    ref = _run(x.double(), w.double(), labels, spec, backend="eager", dtype=torch.float64,
               **{**kwargs, "bias": None if kwargs.get("bias") is None else kwargs["bias"].double()})
    eager = _run(x, w, labels, spec, backend="eager", dtype=dtype, w_dtype=w_dtype, **kwargs)
    out = _run(x, w, labels, spec, backend="triton", dtype=dtype, w_dtype=w_dtype, **kwargs)
    for what, a, e, r in zip(OUTPUTS, out, eager, ref):
        if r is None:
            continue
        assert a.dtype == e.dtype, f"{name} {what}: dtype {a.dtype}, eager gives {e.dtype}"
        assert_no_less_accurate_than_eager(a, e, r, tol, f"{name} {what}")
    assert_exact_zeros(out, labels, what=name, num_subcenters=spec.num_subcenters, **kwargs)


def _bias_for(name, num_classes):
    return torch.randn(num_classes, dtype=torch.float64) if name == "softmax" else None


BACKWARD_MODES = ("gemm", "recompute", "atomic")


@pytest.fixture(params=BACKWARD_MODES)
def backward_mode(request, monkeypatch):
    """Every backward implementation: the workspace + GEMMs path (the default), the two
    recomputing kernels, and the one-kernel atomic path."""
    monkeypatch.setattr(BACKEND, "backward_mode", request.param)
    return request.param


# ---------------------------------------------------------------------------------
# every head, fp32, odd shapes
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HEAD_SPECS))
def test_every_head_matches_float64(name, backward_mode):
    """Loss, dx, dW (and dbias for the linear head) at B=37, C=1003, D=67 with ignored
    rows, labels 0 and C-1, and a random upstream gradient per row."""
    spec = HEAD_SPECS[name]
    x, w, labels = make_inputs(37, 1003, 67, num_subcenters=spec.num_subcenters, ignore_rows=3)
    upstream = torch.randn(37, dtype=torch.float64)
    _check_fp32(name, x, w, labels, spec, upstream=upstream, bias=_bias_for(name, 1003))


_NAMES = sorted(HEAD_SPECS)
_SHAPES = [(b, c, d, k) for b in (1, 37) for c in (1, 1003) for d in (3, 67) for k in (1, 3)]


@pytest.mark.parametrize(("batch", "num_classes", "dim", "k"), _SHAPES)
def test_odd_shapes(batch, num_classes, dim, k, backward_mode):
    """Every (B, C, D, K) in {1, 37} x {1, 1003} x {3, 67} x {1, 3}, each with another head
    (sub-center count K applied to it). C = 1: a row whose only class is its target has
    no negatives (lse_neg = -inf) and must give 0 loss and no NaN."""
    name = _NAMES[_SHAPES.index((batch, num_classes, dim, k)) % len(_NAMES)]
    base = HEAD_SPECS[name]
    spec = MarginSpec(
        base.scale, base.target, base.non_target, base.normalize_embeddings, base.normalize_weight, k, name=name
    )
    x, w, labels = make_inputs(batch, num_classes, dim, num_subcenters=k, ignore_rows=1 if batch > 2 else 0)
    upstream = torch.randn(batch, dtype=torch.float64)
    out = _check_fp32(name, x, w, labels, spec, upstream=upstream, bias=_bias_for(name, num_classes))
    if num_classes == 1:
        assert torch.all(out[0][labels >= 0] == 0)


@settings(max_examples=12, deadline=None)
@given(problem=problems(max_classes=200), mode=st.sampled_from(BACKWARD_MODES))
def test_random_problems_match_reference(problem, mode):
    """Random heads, shapes, ignored rows, class sampling, label smoothing and reductions
    (random upstream gradients for 'none'), every backward mode, fp32 against float64."""
    x, w, labels, kwargs = problem.inputs()
    saved, BACKEND.backward_mode = BACKEND.backward_mode, mode
    try:
        # fp32 at large scales: a row's dominant p = exp(z - lse) carries the rounding of
        # z - lse, about scale * 2^-24 relative, above 1e-5 for Circle's scale 256. The
        # recompute backward adds its own (its tiles differ from the forward's: dW 1.0e-5
        # where eager fp32 has 8e-7); eager fp32 itself reaches it too (Problem(name='circle',
        # batch=1, num_classes=58, dim=3, seed=1292): dx 1.09e-5 eager, 1.10e-5 gemm mode).
        tol = max(FP32_TOL, 2 * HEAD_SPECS[problem.name].scale * 2**-24)
        _check_fp32(str(problem), x, w, labels, HEAD_SPECS[problem.name], tol=tol, atol=problem.atol(tol),
                    bias_atol=_bias_grad_floor(labels, kwargs, tol), **kwargs)
    finally:
        BACKEND.backward_mode = saved


def test_forward_terms_match_reference():
    """The op's outputs themselves: lse_neg, target_u, sum_neg, argmax (exact), and the
    saved scales, with sub-centers, bias and class_index."""
    spec = MarginSpec.arcface(num_subcenters=3)
    params = KernelParams.from_spec(spec)
    x, w, _ = make_inputs(37, 200, 67, num_subcenters=3)
    class_index = torch.randperm(200)[:131]
    labels = torch.randint(0, 131, (37,))
    labels[-2:] = -1
    bias = torch.randn(200, dtype=torch.float64)
    x, w, bias = x.float().double(), w.float().double(), bias.float().double()
    ref = margin_lse_terms(x, w, labels, bias, class_index, None, params)
    dev = [t.to(DEVICE) for t in (x.float(), w.float(), labels, bias.float(), class_index)]
    out = BACKEND.forward(dev[0], dev[1], dev[2], dev[3], dev[4], None, params)
    for what, a, b in zip(("lse_neg", "target_u", "sum_neg"), out[:3], ref[:3]):
        assert_rel_close(a, b, FP32_TOL, what)
    assert torch.equal(out[3].cpu(), ref[3]), "argmax"
    assert_rel_close(out[4], ref[4], FP32_TOL, "row_scale")
    assert_rel_close(out[5], ref[5], FP32_TOL, "col_scale")
    assert out[3].dtype == torch.int64 and out[0].dtype == torch.float32


@pytest.mark.parametrize("splits", [1, 3])
def test_argmax_ties_go_to_the_lowest_class(monkeypatch, splits):
    """Small-integer inputs to the linear head make exact ties common: the argmax is the
    lowest maximal class, within a tile, across tiles and across splits."""
    from fused_margin.triton_kernels.common import TileConfig

    tiles = TileConfig(block_b=16, block_c=32, block_d=16, block_do=32, splits=splits)
    monkeypatch.setattr(BACKEND, "tiles", {"forward": tiles})
    x = torch.randint(-1, 2, (37, 5)).double()
    w = torch.randint(-1, 2, (1003, 5)).double()
    labels = torch.randint(0, 1003, (37,))
    params = KernelParams.from_spec(HEAD_SPECS["softmax"])
    expected = margin_lse_terms(x, w, labels, None, None, None, params)[3]
    got = BACKEND.forward(x.float().to(DEVICE), w.float().to(DEVICE), labels.to(DEVICE), None, None, None, params)[3]
    assert torch.equal(got.cpu(), expected)
    assert (x @ w.T == (x @ w.T).amax(1, keepdim=True)).sum(1).min() > 1  # there were ties


def test_accuracy_from_argmax():
    spec = HEAD_SPECS["cosface"]
    x, w, labels = make_inputs(37, 1003, 67, ignore_rows=2)
    x[:10] = 5.0 * w[labels[:10].clamp_min(0)] + 0.1 * x[:10]  # some rows classified right
    acc = {
        b: fm.margin_cross_entropy(x.to(DEVICE, t), w.to(DEVICE, t), labels.to(DEVICE), spec, backend=b,
                                   return_accuracy=True)[1]
        for b, t in (("eager", torch.float64), ("triton", torch.float32))
    }
    # the same rows right (35 rows are not ignored)
    assert round(float(acc["triton"]) * 35) == round(float(acc["eager"]) * 35) >= 10


# ---------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosface", "softmax", "curricularface", "subcenter_arcface"])
def test_class_index_and_label_smoothing(name, backward_mode):
    """Negative-class sampling (rows of W read through the index; rows not in use get a
    zero gradient) with label smoothing and ignored rows."""
    spec = HEAD_SPECS[name]
    k = spec.num_subcenters
    num_all, num_used = 301, 173
    x, w, _ = make_inputs(37, num_all, 67, num_subcenters=k)
    class_index = torch.randperm(num_all)[:num_used]
    labels = torch.randint(0, num_used, (37,))
    labels[0], labels[1], labels[-3:] = 0, num_used - 1, -100
    out = _check_fp32(
        name, x, w, labels, spec, upstream=torch.randn(37, dtype=torch.float64), bias=_bias_for(name, num_all),
        class_index=class_index, label_smoothing=0.1,
    )
    unused = torch.ones(num_all, dtype=torch.bool)
    unused[class_index] = False
    assert torch.all(out[2].view(num_all, k, -1)[unused.to(DEVICE)] == 0)
    if out[3] is not None:
        assert torch.all(out[3][unused.to(DEVICE)] == 0)


def test_class_index_must_not_repeat():
    x, w, labels = make_inputs(4, 10, 8, dtype=torch.float32, device=DEVICE)
    class_index = torch.tensor([1, 3, 3, 5], device=DEVICE)
    with pytest.raises(ValueError, match="repeat"):
        fm.margin_cross_entropy(x, w, labels % 4, HEAD_SPECS["cosface"], class_index=class_index, backend="triton")


@pytest.mark.parametrize("name", ["normface", "cosface", "cs_softmax", "so_softmax", "softmax"])
def test_peaked_rows(name, backward_mode):
    """Rows whose embedding is a multiple of its target weight (c_y = 1): the target
    logit saturates and the negatives' probabilities underflow; still exact."""
    spec = HEAD_SPECS[name]
    x, w, labels = make_inputs(37, 1003, 67, peaked_rows=5, ignore_rows=2)
    _check_fp32(name, x, w, labels, spec, upstream=torch.randn(37, dtype=torch.float64),
                bias=_bias_for(name, 1003))


@pytest.mark.parametrize("name", ["arcface", "combined", "curricularface", "subcenter_arcface", "circle"])
def test_peaked_rows_angular_heads_stay_finite(name, backward_mode):
    """Angular targets at c_y = 1: the target's gradient depends on which side of 1 the
    rounded cosine lands (see ``SIN2_EPS``), so fp32 cannot match float64 there; the
    loss does, and nothing is NaN or infinite."""
    spec = HEAD_SPECS[name]
    x, w, labels = make_inputs(37, 1003, 67, num_subcenters=spec.num_subcenters, peaked_rows=5)
    x, w = x.float(), w.float()
    upstream = torch.randn(37, dtype=torch.float64)
    loss, dx, dw, _ = _run(x, w, labels, spec, backend="triton", upstream=upstream)
    ref = _run(x.double(), w.double(), labels, spec, backend="eager", dtype=torch.float64, upstream=upstream)
    assert_rel_close(loss, ref[0], 1e-4, f"{name} loss")
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize(
    ("name", "dtype", "w_dtype"),
    [
        ("softmax", torch.float16, torch.float16),
        ("arcface", torch.float16, torch.float16),
        ("subcenter_arcface", torch.float16, torch.float16),
        ("curricularface", torch.float16, torch.float16),
        ("circle", torch.float16, torch.float16),
        ("cosface", torch.float16, torch.float32),
        ("so_softmax", torch.bfloat16, torch.float32),
        # Triton 3.9's interpreter converts fp32 to bf16 by truncation (compiled code
        # rounds to nearest), doubling the error of a bf16 dW: bf16 W on GPU only
        *([] if INTERPRETED else [("softmax", torch.bfloat16, torch.bfloat16)]),
        ("lsoftmax", torch.float32, torch.float16),
    ],
)
def test_half_precision_three_way(name, dtype, w_dtype, backward_mode):
    """fp16, bf16 and mixed inputs: gradients come back in each input's dtype, no less
    accurate than eager PyTorch on the same dtypes plus 3e-4: the gradient GEMMs round
    dU to fp16 where eager keeps it in fp32 (measured at fp16: 3.1e-4 against eager's
    2.1e-4 for dx and dW)."""
    spec = HEAD_SPECS[name]
    x, w, labels = make_inputs(37, 1003, 67, num_subcenters=spec.num_subcenters, ignore_rows=2)
    _check_three_way(name, x, w, labels, spec, dtype, w_dtype, 3e-4,
                     upstream=torch.randn(37, dtype=torch.float64), bias=_bias_for(name, 1003))


def test_grad_dot_fp32_option(monkeypatch):
    """With ``grad_dot_fp32`` the fp16 kernel's gradients are as accurate as eager's (the
    only rounding left is the final cast to fp16)."""
    monkeypatch.setattr(BACKEND, "grad_dot_fp32", True)
    spec = HEAD_SPECS["arcface"]
    x, w, labels = make_inputs(37, 1003, 67, ignore_rows=2)
    _check_three_way("arcface", x, w, labels, spec, torch.float16, torch.float16, 2e-5,
                     upstream=torch.randn(37, dtype=torch.float64))


def _fp16_range_inputs():
    """fp16 inputs whose gradient intermediates leave fp16's range while the gradients do
    not: large embedding norms (r = 1/||x|| ~ 1/170) make ``dU r q`` ~ 1e-6 (fp16
    subnormals) and ``dX`` ~ ``dU / 170``, so an fp16 ``dU`` overflows under a loss
    scale that the gradients themselves take."""
    torch.manual_seed(5)
    x, w, labels = make_inputs(37, 1003, 32, ignore_rows=2, peaked_rows=2)
    return (30 * x).half(), w.half(), labels, HEAD_SPECS["cosface"]


def _max_row_rel_err(a, b):
    a, b = a.double(), b.double()
    norms = b.norm(dim=1)
    live = norms > 1e-3 * norms.max()
    return float(((a - b).norm(dim=1)[live] / norms[live]).max())


def test_fp16_gradients_keep_small_rows(backward_mode):
    """fp16: every class's dW row is as accurate as the float64 gradient rounded once to
    fp16 (the intermediates stay in fp32's range). A norm-wise error does not see a flushed
    workspace, a per-row one does: an fp16 ``dU r q`` gives 1.5e-2 here, fp16 ``dU`` 3.2e-3,
    against the rounding's 3.0e-4."""
    x, w, labels, spec = _fp16_range_inputs()
    ref = _run(x.double(), w.double(), labels, spec, backend="eager", dtype=torch.float64)
    out = _run(x, w, labels, spec, backend="triton", dtype=torch.float16)
    err, rounding = _max_row_rel_err(out[2], ref[2]), _max_row_rel_err(ref[2].half(), ref[2])
    assert err <= rounding + 1e-3, f"dW per row: {err:.2e}, rounding to fp16 alone {rounding:.2e}"
    assert rel_err(out[1], ref[1]) <= rel_err(ref[1].half(), ref[1]) + 1e-3


def test_fp16_largest_loss_scale(backward_mode):
    """Under a loss scale S (``torch.amp.GradScaler``: a step counts when every gradient
    is finite), the largest power-of-two S whose fp16 gradients are all finite is that of
    the float64 gradients rounded to fp16 at the end: no intermediate overflows first."""
    x, w, labels, spec = _fp16_range_inputs()
    _, dx, dw, _ = _run(x.double(), w.double(), labels, spec, backend="eager", dtype=torch.float64)

    def finite_ref(scale):
        return all(bool(torch.isfinite((g * scale).half()).all()) for g in (dx, dw))

    def finite_kernel(scale):
        xr, wr = x.to(DEVICE).requires_grad_(True), w.to(DEVICE).requires_grad_(True)
        (fm.margin_cross_entropy(xr, wr, labels.to(DEVICE), spec, backend="triton") * scale).backward()
        return bool(torch.isfinite(xr.grad).all() and torch.isfinite(wr.grad).all())

    largest = max(k for k in range(64) if finite_ref(2.0**k))
    assert 4 < largest < 60
    assert finite_kernel(2.0**largest), f"non-finite gradients at the reference's largest scale 2^{largest}"
    assert not finite_kernel(2.0 ** (largest + 1))


def test_weight_offsets_beyond_int32(backward_mode):
    """Rows of W more than 2**31 elements from its start (10^7 classes x D = 512):
    every kernel addresses them in int64 (see ``assert_far_weight_rows_match``)."""
    assert_far_weight_rows_match("triton", DEVICE, torch.float16)


@pytest.mark.parametrize(
    ("name", "num_classes", "k"), [("softmax", 1003, 1), ("curricularface", 300, 1), ("subcenter_arcface", 77, 3)]
)
def test_small_tiles(monkeypatch, name, num_classes, k, backward_mode):
    """Tiles much smaller than the problem, so that every loop runs several times: row
    blocks (forward, dW), class blocks per split, three splits combined, D steps and
    three D slices in the backward (with class_index for the linear head); in the GEMM
    backward several class chunks (a workspace of 100 classes for 37 rows), three split-K
    partials of dx, and GEMM tiles that cut across sub-centers."""
    from fused_margin.triton_kernels import backward_gemm
    from fused_margin.triton_kernels.common import TileConfig

    tiles = TileConfig(block_b=16, block_c=32, block_d=16, block_do=32, splits=3)
    monkeypatch.setattr(BACKEND, "tiles", {
        "forward": tiles, "dx": tiles, "dw": tiles.with_(splits=1), "atomic": tiles.with_(splits=1),
        "gemm_logits": tiles.with_(splits=1), "gemm_dx": tiles.with_(block_c=16),
        "gemm_dw": tiles.with_(block_b=16, block_c=16, splits=1),
    })
    monkeypatch.setattr(backward_gemm, "GEMM_WORKSPACE_BYTES", 37 * 4 * k * 100)
    spec = HEAD_SPECS[name]
    x, w, labels = make_inputs(37, num_classes, 67, num_subcenters=k, ignore_rows=2)
    kwargs = {}
    if name == "softmax":
        kwargs["class_index"] = torch.randperm(num_classes)[:900]
        labels = torch.randint(0, 900, (37,))
    _check_fp32(name, x, w, labels, spec, upstream=torch.randn(37, dtype=torch.float64),
                bias=_bias_for(name, num_classes), label_smoothing=0.05, **kwargs)


@pytest.mark.parametrize(("batch", "dtype"), [(1, torch.float32), (4, torch.bfloat16), (1, torch.bfloat16)])
def test_gemm_backward_grid_within_cuda_limits(monkeypatch, batch, dtype):
    """With a small batch the 32 MiB workspace holds millions of classes (B=4 in bf16:
    4.2M), more class blocks than a grid's y extent allows (65535). The launches are
    recorded instead of run (``check_grid`` as CUDA would refuse them), at C just past
    the boundary: every grid fits, and the chunks still cover every class once."""
    from fused_margin.triton_kernels import backward_gemm
    from fused_margin.triton_kernels.backward_common import BackwardInputs
    from fused_margin.triton_kernels.common import MAX_GRID_YZ, check_grid, default_tiles

    block_c = default_tiles("gemm_logits", batch, 1 << 22, 16, torch.device(DEVICE)).block_c
    num_classes = (MAX_GRID_YZ + 1) * block_c + 7
    grids: dict[str, list[tuple[int, ...]]] = {}

    def record(kernel, grid, tiles, *args, **kwargs):
        check_grid(grid)
        grids.setdefault(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), []).append(grid)

    monkeypatch.setattr(backward_gemm, "launch", record)
    dim = 16
    x = torch.randn(batch, dim).to(dtype)
    w = torch.randn(8, dim).to(dtype)  # few rows: the classes in use come from class_index
    f32 = {"dtype": torch.float32}
    inputs = BackwardInputs(
        UpstreamGrads(torch.ones(batch, **f32), torch.zeros(batch, **f32), torch.zeros(batch, **f32)),
        SavedTensors(x, w, torch.zeros(batch, dtype=torch.int64), None, torch.arange(num_classes) % 8, None,
                     torch.zeros(batch, **f32), torch.ones(batch, **f32), torch.ones(num_classes, **f32)),
        KernelParams.from_spec(HEAD_SPECS["cosface"]),
    )
    backward_gemm.margin_lse_bwd_gemm(inputs)
    [name] = [n for n in grids if "dot_grad" in n]
    assert all(g[1] <= MAX_GRID_YZ for g in grids[name])
    assert len(grids[name]) >= 2, "the cap splits these classes into several chunks"
    assert sum(g[1] for g in grids[name]) * block_c >= num_classes
    with pytest.raises(ValueError, match="65535"):
        check_grid((1, MAX_GRID_YZ + 1))


@pytest.mark.parametrize("mode", ["gemm", "recompute"])
def test_deterministic(monkeypatch, mode):
    """Same inputs, same bits (the two reproducible backwards): no atomics, partials
    combined in a fixed order."""
    monkeypatch.setattr(BACKEND, "backward_mode", mode)
    spec = HEAD_SPECS["subcenter_arcface"]
    x, w, labels = make_inputs(37, 300, 67, num_subcenters=3, dtype=torch.float32, device=DEVICE)
    first = loss_and_grads(x, w, labels, spec, backend="triton")
    second = loss_and_grads(x, w, labels, spec, backend="triton")
    for what, a, b in zip(OUTPUTS, first, second):
        if a is not None:
            assert torch.equal(a, b), what


# ---------------------------------------------------------------------------------
# what the backend refuses
# ---------------------------------------------------------------------------------


def test_float64_is_refused():
    x, w, labels = make_inputs(4, 5, 3, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="float64"):
        fm.margin_cross_entropy(x, w, labels, HEAD_SPECS["arcface"], backend="triton")
    assert BACKEND.not_supported_reasons(x.float(), w.float(), None) == []


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = BACKEND.not_supported_reasons(torch.zeros(2, 3), torch.zeros(4, 3), None)
    assert any("CUDA" in r for r in reasons)
    # never picked on CPU by 'auto'
    assert "cpu" not in BACKEND.auto_priority


def test_auto_picks_triton_for_cuda_tensors():
    """'auto' takes the Triton backend for CUDA tensors it supports, and another for the
    ones it refuses (fp64). Fake CUDA tensors (shapes and devices only): no GPU needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fused_margin.backends import resolve_backend

    params = KernelParams.from_spec(HEAD_SPECS["cosface"])
    with FakeTensorMode():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.empty(4, 8, device="cuda", dtype=dtype)
            w = torch.empty(10, 8, device="cuda", dtype=torch.float32)
            assert resolve_backend("auto", x, w, params) == "triton", dtype
        x, w = torch.empty(4, 8, device="cuda", dtype=torch.float64), torch.empty(10, 8, device="cuda")
        assert resolve_backend("auto", x, w, params) != "triton"


def test_bad_precision_option(monkeypatch):
    monkeypatch.setenv("FUSED_MARGIN_TRITON_PRECISION", "fp8")
    with pytest.raises(ValueError, match="precision"):
        BACKEND.precision()
    monkeypatch.setenv("FUSED_MARGIN_TRITON_PRECISION", "tf32")
    assert BACKEND.precision() == "tf32"


@pytest.mark.parametrize(("torch_setting", "expected"), [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_precision_follows_torch_setting(monkeypatch, torch_setting, expected):
    """Without the option or its variable, fp32 dots follow
    torch.set_float32_matmul_precision as torch.mm does; both override it."""
    monkeypatch.delenv("FUSED_MARGIN_TRITON_PRECISION", raising=False)
    monkeypatch.setattr(BACKEND, "input_precision", None)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(torch_setting)
        assert BACKEND.precision() == expected
        monkeypatch.setenv("FUSED_MARGIN_TRITON_PRECISION", "tf32x3")
        assert BACKEND.precision() == "tf32x3"
        monkeypatch.setattr(BACKEND, "input_precision", "ieee")
        assert BACKEND.precision() == "ieee"
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="PyTorch < 2.9")
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_precision_follows_new_torch_setting(monkeypatch, setting):
    """PyTorch >= 2.9's ``torch.backends.cuda.matmul.fp32_precision``: once a user sets
    it, ``torch.get_float32_matmul_precision()`` raises; the backend reads the new
    setting first, and a training step runs."""
    monkeypatch.delenv("FUSED_MARGIN_TRITON_PRECISION", raising=False)
    monkeypatch.setattr(BACKEND, "input_precision", None)
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = setting
        if setting == "tf32":
            with pytest.raises(RuntimeError):
                torch.get_float32_matmul_precision()
        assert BACKEND.precision() == setting
        x, w, labels = make_inputs(5, 7, 16, dtype=torch.float32, device=DEVICE)
        loss = fm.margin_cross_entropy(x.requires_grad_(True), w, labels, HEAD_SPECS["cosface"], backend="triton")
        loss.backward()
        assert torch.isfinite(x.grad).all()
    finally:
        matmul.fp32_precision = saved
    torch.get_float32_matmul_precision()  # the legacy reading works again


def test_backward_mode_option(monkeypatch):
    monkeypatch.delenv("FUSED_MARGIN_TRITON_BACKWARD", raising=False)
    assert BACKEND.backward_implementation() == "gemm"
    monkeypatch.setenv("FUSED_MARGIN_TRITON_BACKWARD", "atomic")
    assert BACKEND.backward_implementation() == "atomic"
    monkeypatch.setenv("FUSED_MARGIN_TRITON_BACKWARD", "fast")
    with pytest.raises(ValueError, match="backward mode must be one of"):
        BACKEND.backward_implementation()
    monkeypatch.setattr(BACKEND, "backward_mode", "recompute")  # the attribute wins
    assert BACKEND.backward_implementation() == "recompute"


def test_import_without_triton():
    """``import fused_margin`` works when triton cannot be imported; the Triton backend
    then explains why it cannot run, and the default backend still runs."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fused_margin as fm\n"
        "x, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 4, 2])\n"
        "fm.margin_cross_entropy(x, w, y, fm.MarginSpec.cosface())\n"
        "try:\n"
        "    fm.margin_cross_entropy(x, w, y, fm.MarginSpec.cosface(), backend='triton')\n"
        "except fm.BackendUnavailableError as e:\n"
        "    assert 'triton cannot be imported' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('triton backend ran without triton')\n"
        "assert not any(m.startswith('fused_margin.triton_kernels.') for m in sys.modules)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the compiled kernels run in every other test")
def test_kernels_compile_for_hopper():
    """What the interpreter cannot see: Triton's compiler accepts every kernel with the
    GPU tile sizes (sm_90, every transform, dtype pairing, precision and flag), and each
    fits in an H100's 227 KiB of shared memory. Needs no GPU; runs in a fresh process
    because the kernels must be decorated with TRITON_INTERPRET unset."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    code = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "from fused_margin.triton_kernels.compile_check import compile_variants\n"
        "for kernel, variant, shared, counts in compile_variants(90):\n"
        "    assert shared <= 227 * 1024, (kernel, variant, shared)\n"
        "    print('compiled', kernel, *variant, counts['wgmma'], counts['mma.sync'], sep=',')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split(",") for line in result.stdout.splitlines() if line.startswith("compiled,")]
    kernels = ("forward", "dx", "dw", "atomic", "gemm_logits", "gemm_dx", "gemm_dw")
    assert {row[1] for row in rows} == set(kernels), result.stdout
    # The default path (forward + gemm backward) multiplies 16-bit operands, and fp32 ones
    # in tf32, on Hopper's wgmma tensor-core instructions, not Ampere's mma.sync (half
    # the rate at best) nor CUDA-core FMAs. Exact fp32 ('ieee', also what mixed dtypes
    # and grad_dot_fp32 use by default) has no tensor-core path.
    for kernel, x_dtype, w_dtype, grad_fp32, precision, *_, wgmma, mma_sync in rows:
        if kernel not in ("forward", "gemm_logits", "gemm_dx", "gemm_dw"):
            continue
        fp32 = x_dtype != w_dtype or x_dtype == "fp32" or (grad_fp32 == "True" and kernel in ("gemm_dx", "gemm_dw"))
        if not fp32 or precision != "ieee":
            assert int(wgmma) > 0 and int(mma_sync) == 0, (kernel, x_dtype, w_dtype, grad_fp32, precision)


# ---------------------------------------------------------------------------------
# GPU only: compiled kernels, large shapes, bf16, precision modes, memory
# ---------------------------------------------------------------------------------

LARGE = (1024, 131072, 512)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["arcface", "softmax", "curricularface", "subcenter_arcface"])
def test_gpu_large_half_precision(name, dtype, backward_mode):
    if INTERPRETED:
        pytest.skip("large shapes are for the compiled kernels")
    spec = HEAD_SPECS[name]
    batch, num_classes, dim = LARGE
    k = spec.num_subcenters
    if k > 1:
        num_classes //= k
    torch.manual_seed(0)
    x = torch.randn(batch, dim, device="cuda", dtype=torch.float64)
    w = torch.randn(num_classes * k, dim, device="cuda", dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,), device="cuda")
    labels[-8:] = -100
    bias = torch.randn(num_classes, device="cuda", dtype=torch.float64) if name == "softmax" else None
    tol = 3e-3 if dtype == torch.bfloat16 else 5e-4
    _check_three_way(name, x, w, labels, spec, dtype, dtype, tol,
                     upstream=torch.randn(batch, dtype=torch.float64), bias=bias)


@pytest.mark.gpu
def test_gpu_fp16_dw_rows_at_scale(backward_mode):
    """fp16 at B=1024, C=131072, D=512 (where an fp16 ``dU r q`` workspace has 99.8% of
    its entries below fp16's normal range): every dW row within the fp16 rounding of the
    float64 gradient plus 2e-3 (the tf32 rounding of dU), as eager's upcast computation."""
    if INTERPRETED:
        pytest.skip("large shapes are for the compiled kernels")
    batch, num_classes, dim = LARGE
    torch.manual_seed(0)
    x, w, labels = make_inputs(batch, num_classes, dim, device="cuda", ignore_rows=8, peaked_rows=2)
    spec = HEAD_SPECS["arcface"]
    x16, w16 = x.half(), w.half()
    ref = _run(x16.double(), w16.double(), labels, spec, backend="reference", dtype=torch.float64)
    out = _run(x16, w16, labels, spec, backend="triton", dtype=torch.float16)
    err, rounding = _max_row_rel_err(out[2], ref[2]), _max_row_rel_err(ref[2].half(), ref[2])
    assert err <= rounding + 2e-3, f"dW per row: {err:.2e}, rounding to fp16 alone {rounding:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tol"), [("ieee", 1e-5), ("tf32x3", 1e-4), ("tf32", 1e-2)])
def test_gpu_fp32_precision_modes(monkeypatch, precision, tol, backward_mode):
    if INTERPRETED:
        pytest.skip("the interpreter multiplies fp32 exactly in every mode")
    monkeypatch.setattr(BACKEND, "input_precision", precision)
    spec = HEAD_SPECS["arcface"]
    torch.manual_seed(0)
    x, w, labels = make_inputs(512, 32768, 512, device="cuda", ignore_rows=4)
    _check_fp32("arcface", x, w, labels, spec, tol=tol, upstream=torch.randn(512, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["gemm", "recompute"])
def test_gpu_deterministic_large(monkeypatch, mode):
    if INTERPRETED:
        pytest.skip("compiled kernels only")
    monkeypatch.setattr(BACKEND, "backward_mode", mode)
    spec = HEAD_SPECS["arcface"]
    x, w, labels = make_inputs(1024, 65536, 512, dtype=torch.bfloat16, device="cuda")
    first = loss_and_grads(x, w, labels, spec, backend="triton")
    second = loss_and_grads(x, w, labels, spec, backend="triton")
    for what, a, b in zip(OUTPUTS, first, second):
        if a is not None:
            assert torch.equal(a, b), what


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("mode", "w_dtype"), [("gemm", torch.bfloat16), ("recompute", torch.bfloat16), ("atomic", torch.float32)]
)
def test_gpu_peak_memory(monkeypatch, mode, w_dtype):
    """Forward + backward at B=1024, C=262144, D=512 (bf16 embeddings) allocates at most
    the gradients + the bounded workspaces (the gemm backward's 32 MiB, the dx partials'
    16 MiB) + 32 MiB of O(B*D + C) vectors beyond the inputs: no (B, C) buffer anywhere
    (512 MiB in bf16). The atomic backward with fp32 master weights accumulates into the
    gradient itself (with a 16-bit W it would need an fp32 buffer of W's shape, which
    this bound excludes). The warm-up runs at the measured batch (a small C), so that no
    kernel compiles inside the measured call."""
    from fused_margin.triton_kernels.backward_gemm import GEMM_WORKSPACE_BYTES
    from fused_margin.triton_kernels.common import DX_WORKSPACE_BYTES

    if INTERPRETED:
        pytest.skip("compiled kernels only")
    monkeypatch.setattr(BACKEND, "backward_mode", mode)
    batch, num_classes, dim = 1024, 262144, 512
    x = torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(num_classes, dim, device="cuda", dtype=w_dtype, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch,), device="cuda")
    spec = HEAD_SPECS["arcface"]
    fm.margin_cross_entropy(x, w[:4096], labels % 4096, spec, backend="triton").backward()  # compile
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fm.margin_cross_entropy(x, w, labels, spec, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = x.numel() * x.element_size() + w.numel() * w.element_size()
    allowance = GEMM_WORKSPACE_BYTES + DX_WORKSPACE_BYTES + (32 << 20)
    assert extra <= grads + allowance, f"peak {extra / 2**20:.1f} MiB beyond inputs, gradients {grads / 2**20:.1f} MiB"


def test_strided_inputs(backward_mode):
    """Sliced embeddings, a transposed (column-major) or row-strided weight, strided
    labels and bias give what their contiguous copies give."""
    assert_strided_inputs_match("triton", DEVICE, torch.float32, 1e-6)
