"""Helpers shared by the tests: inputs, the float64 ground truth, error measures."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor

import fused_margin as fm
from fused_margin import MarginSpec, _ext
from fused_margin.kernel_params import IGNORED_LABEL, KernelParams, SavedTensors, UpstreamGrads, acc_dtype
from fused_margin.optim.update import UPDATE_ADAM, WeightUpdate, apply_update_
from fused_margin.reference import margin_lse_terms


def _without_hypothesis():
    """Stand-ins for ``given``, ``settings`` and ``strategies`` when hypothesis is not
    installed: the property-based tests are collected and skip; every other test runs."""

    def given(*_args, **_kwargs):
        def decorate(test):
            def skipped():
                pytest.skip("needs hypothesis (pip install hypothesis)")

            skipped.__name__, skipped.__qualname__, skipped.__module__ = test.__name__, test.__qualname__, test.__module__
            skipped.__doc__ = test.__doc__
            return skipped

        return decorate

    def settings(*_args, **_kwargs):
        return lambda test: test

    class Strategies:  # st.integers(...), st.composite(f)(...), ...: placeholders, never drawn from
        def __getattr__(self, _name):
            return lambda *args, **kwargs: (lambda *a, **k: None) if _name == "composite" else None

    return given, settings, Strategies()


# hypothesis only where a test uses it: a machine without it loses those tests alone
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    given, settings, st = _without_hypothesis()

#: skips a test of the compiled backends when the extension is not built
needs_ext = pytest.mark.skipif(
    _ext.load_error() is not None, reason=f"fused_margin._C is not built ({_ext.load_error()})"
)

#: Every head as a stateless spec, with the parameters the tests use. The angular
#: heads keep their defaults; SphereFace and L-Softmax at a mid-range lambda.
HEAD_SPECS: dict[str, MarginSpec] = {
    "softmax": MarginSpec.softmax(),
    "normface": MarginSpec.normface(),
    "cosface": MarginSpec.cosface(),
    "arcface": MarginSpec.arcface(),
    "combined": MarginSpec.combined(),
    "sphereface": MarginSpec.sphereface(lam=5.0),
    "lsoftmax": MarginSpec.lsoftmax(lam=2.0),
    "cs_softmax": MarginSpec.cs_softmax(weight_update_factor=0.8),
    "so_softmax": MarginSpec.so_softmax(),
    "circle": MarginSpec.circle(),
    "curricularface": MarginSpec.curricularface(t=0.4),
    "subcenter_arcface": MarginSpec.arcface(num_subcenters=3),
    # inter-class filtering: at the tests' small D, cosines above 0.2 are common
    "filtered": MarginSpec.cosface(interclass_filtering_threshold=0.2),
}


def make_inputs(
    batch: int,
    num_classes: int,
    dim: int,
    *,
    num_subcenters: int = 1,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    ignore_rows: int = 0,
    peaked_rows: int = 0,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random (x, W, labels). Labels include 0 and C-1 when the batch allows; the first
    ``peaked_rows`` embeddings equal (a multiple of) their target's weight row (c_y = 1);
    the last ``ignore_rows`` labels are ``ignore_index``."""
    x = torch.randn(batch, dim, dtype=torch.float64)
    w = torch.randn(num_classes * num_subcenters, dim, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,))
    if batch >= 2:
        labels[0], labels[1] = 0, num_classes - 1
    for b in range(min(peaked_rows, batch)):
        x[b] = 3.0 * w[labels[b] * num_subcenters]
    if ignore_rows:
        labels[batch - ignore_rows:] = ignore_index
    return x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), labels.to(device)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives inf: NaN never passes)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = torch.linalg.vector_norm(ref64)
    diff = torch.linalg.vector_norm(out64 - ref64)
    if denom == 0:
        return float(diff)
    return float(diff / denom)


def assert_rel_close(out: Tensor, ref: Tensor, tol: float, what: str = "", atol: float = 0.0) -> None:
    """Relative-norm check with a verbose message (max abs error and where it is).
    ``atol``: also pass when ``||out - ref|| <= atol`` (for values that are zero in exact
    arithmetic, where any rounding is an infinite relative error)."""
    err = rel_err(out, ref)
    if err <= tol:
        return
    if atol > 0 and err != float("inf"):
        if float(torch.linalg.vector_norm(out.detach().double() - ref.detach().double())) <= atol:
            return
    diff = (out.detach().double() - ref.detach().double()).abs()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    raise AssertionError(
        f"{what}: relative error {err:.3e} > {tol:.1e}; max abs error {float(diff.max()):.3e} at {where} "
        f"(out {float(out.detach().double().reshape(-1)[flat]):.6g}, ref {float(ref.detach().double().reshape(-1)[flat]):.6g})"
    )


#: Relative-norm tolerances against the float64 reference (computed on the same rounded
#: inputs), per (what runs, input dtype): one table for every test file. For 16-bit inputs
#: the value is the margin of the three-way rule (:func:`assert_no_less_accurate_than_eager`).
TOLERANCES: dict[tuple[str, torch.dtype], float] = {
    # one call of a fused backend
    ("cpu", torch.float64): 1e-12,
    ("cpu", torch.float32): 1e-5,
    ("cpu", torch.bfloat16): 1e-3,
    ("cpu", torch.float16): 1e-3,
    ("cuda", torch.float64): 1e-12,
    ("cuda", torch.float32): 1e-5,
    # on the GPU the dX / dW GEMMs read the logits' gradient in the input dtype
    ("cuda", torch.bfloat16): 2e-2,
    ("cuda", torch.float16): 2e-2,
    # exact ('ieee') fp32 dots: the spec's bound for every output
    ("triton", torch.float32): 1e-5,
    # the class-sharded head (fused_margin.distributed) against one process's reference:
    # per-shard terms combined across ranks, more roundings than one call
    ("sharded", torch.float64): 1e-9,
    ("sharded", torch.float32): 1e-5,
    # the same with the shards on a GPU kernel (Triton / CUDA): other summation orders
    ("sharded-gpu", torch.float32): 1e-4,
    # the InsightFace drop-in against arcface_torch's computation written out in float64
    ("insightface", torch.float64): 1e-10,
    # finite rows beside non-finite ones, on every backend CI runs (test_reliability.py)
    ("reliability", torch.float64): 1e-10,
    ("reliability", torch.float32): 2e-5,
}

OUTPUTS = ("loss", "dx", "dW", "dbias")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def tolerance(what: str, dtype: torch.dtype) -> float:
    """The entry of :data:`TOLERANCES` (a KeyError naming the pair if it has none)."""
    try:
        return TOLERANCES[(what, dtype)]
    except KeyError:
        known = sorted(f"{k}/{str(d).removeprefix('torch.')}" for k, d in TOLERANCES)
        raise KeyError(f"no tolerance for ({what!r}, {dtype}); known: {', '.join(known)}") from None


def assert_no_less_accurate_than_eager(out: Tensor, eager: Tensor, ref: Tensor, margin: float, what: str = "",
                                       *, atol: float | None = None, rtol: float | None = None) -> None:
    """The three-way rule: ``out`` (a fused result) may be at most as wrong as ``eager``
    (eager PyTorch on the same low-precision inputs), both against ``ref`` (float64 on the
    same rounded inputs), plus a small margin:

    * for the whole tensor, ``rel_err(out, ref) <= rel_err(eager, ref) + margin``;
    * per element, ``|out - ref| <= |eager - ref| + atol + rtol * |ref|``; by default
      ``rtol`` is one rounding of the result (the machine epsilon of ``out``'s dtype) and
      ``atol`` is ``max(margin, rtol)`` times the largest ``|ref|``.

    A NaN or inf in ``out`` fails both."""
    err, err_eager = rel_err(out, ref), rel_err(eager, ref)
    assert err <= err_eager + margin, f"{what}: error {err:.3e} > eager's {err_eager:.3e} + {margin:.0e}"
    o, e, r = (t.detach().cpu().double() for t in (out, eager, ref))
    eps = torch.finfo(out.dtype).eps if out.dtype.is_floating_point else 0.0
    rtol = eps if rtol is None else rtol
    atol = max(margin, rtol) * float(r.abs().max()) if atol is None and r.numel() else (atol or 0.0)
    excess = (o - r).abs() - ((e - r).abs() + atol + rtol * r.abs())
    bad = ~(excess <= 0)  # NaN counts as bad
    if bool(bad.any()):
        flat = int(torch.nan_to_num(excess, nan=float("inf")).reshape(-1).argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), o.shape)) if o.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements less accurate than eager's + (atol {atol:.2e}, "
            f"rtol {rtol:.1e}); worst at {where}: out {float(o.reshape(-1)[flat]):.6g}, eager "
            f"{float(e.reshape(-1)[flat]):.6g}, ref {float(r.reshape(-1)[flat]):.6g}")


def assert_matches_reference(backend: str, dtype: torch.dtype, x: Tensor, w: Tensor, labels: Tensor,
                             spec: MarginSpec, *, tol: float | None = None, bias: Tensor | None = None,
                             upstream: Tensor | None = None, what: str = "", atol: float = 0.0,
                             against_eager: bool | None = None, device: str | None = None,
                             **kwargs) -> tuple:
    """Runs ``backend`` on (x, w, bias, upstream) cast to ``dtype`` (on ``device``: 'cuda'
    for the cuda backend, else the CPU), and the eager reference on the same rounded values
    in float64 on the CPU; checks loss and every gradient, their dtypes, and the exact zeros
    (:func:`assert_exact_zeros`). Returns the backend's (loss, dx, dW, dbias).

    fp32 / fp64: each output within ``tol`` (relative norm; default
    ``tolerance(backend, dtype)``; ``atol``: see :func:`assert_rel_close`) of the
    reference. 16-bit inputs (or ``against_eager=True``): the three-way rule against eager
    PyTorch in the same dtype (:func:`assert_no_less_accurate_than_eager`), ``tol`` its
    margin, and each output's dtype that of eager's."""
    device = device or ("cuda" if backend == "cuda" else "cpu")
    tol = tolerance(backend, dtype) if tol is None else tol
    three_way = dtype in LOW_PRECISION if against_eager is None else against_eager
    xc, wc = x.to(device, dtype), w.to(device, dtype)
    bc = None if bias is None else bias.to(device, dtype)
    up = None if upstream is None else upstream.to(device, dtype)
    lab = labels.to(device)
    out = loss_and_grads(xc, wc, lab, spec, backend=backend, bias=bc, upstream=up, **kwargs)
    ref = loss_and_grads(
        xc.double().cpu(), wc.double().cpu(), labels.cpu(), spec, backend="eager",
        bias=None if bc is None else bc.double().cpu(), upstream=None if up is None else up.double().cpu(), **kwargs,
    )
    eager = loss_and_grads(xc, wc, lab, spec, backend="eager", bias=bc, upstream=up, **kwargs) if three_way else None
    for i, (name, o, r) in enumerate(zip(OUTPUTS, out, ref)):
        if r is None:
            assert o is None, f"{what} {name}: a gradient where the reference has none"
            continue
        if three_way:
            assert o.dtype == eager[i].dtype, f"{what} {name}: dtype {o.dtype}, eager gives {eager[i].dtype}"
            assert_no_less_accurate_than_eager(o, eager[i], r, tol, f"{what} {name}")
            continue
        expected = dtype if name != "loss" else (torch.float64 if dtype == torch.float64 else torch.float32)
        assert o.dtype == expected, f"{what} {name}: dtype {o.dtype}, expected {expected}"
        assert_rel_close(o.cpu(), r, tol, f"{what} {name}", atol=atol)
    assert_exact_zeros(out, labels, what=what, num_subcenters=spec.num_subcenters, **kwargs)
    return out


def assert_exact_zeros(out: tuple, labels: Tensor, *, what: str = "", ignore_index: int = -100,
                       class_index: Tensor | None = None, num_subcenters: int = 1, **_ignored) -> None:
    """Elementwise, beside the relative-norm checks: where the answer is exactly zero it
    is zero. ``out`` is :func:`loss_and_grads`'s (loss, dx, dW, dbias); an ignored row's
    loss (per row) and dx row, and the rows of W (and bias) outside ``class_index``."""
    loss, dx, dw, db = out
    ignored = (labels == ignore_index).to(dx.device)
    assert torch.equal(dx[ignored], torch.zeros_like(dx[ignored])), f"{what}: dx of ignored rows is not exactly 0"
    if loss.dim():
        assert torch.equal(loss[ignored], torch.zeros_like(loss[ignored])), f"{what}: loss of ignored rows"
    if class_index is not None:
        unused = torch.ones(dw.shape[0] // num_subcenters, dtype=torch.bool, device=dw.device)
        unused[class_index.to(dw.device)] = False
        rows = dw.view(unused.shape[0], num_subcenters, -1)[unused]
        assert torch.equal(rows, torch.zeros_like(rows)), f"{what}: rows of W outside class_index moved"
        if db is not None:
            assert torch.equal(db[unused], torch.zeros_like(db[unused])), f"{what}: bias outside class_index moved"


def curricular_row_terms(batch: int) -> Tensor:
    """Random CurricularFace per-row constants as the kernels take them: (2, B),
    thresholds then ``t`` (a different t per row, to catch a kernel reading one for all)."""
    return torch.stack([torch.rand(batch) - 0.5, torch.rand(batch)])


def op_samples(backend: str, heads: tuple[str, ...] = ("cosface", "curricularface", "subcenter_arcface", "softmax",
                                                        "so_softmax")) -> list[tuple]:
    """Arguments of ``fused_margin::margin_lse`` with ``backend``, for
    ``torch.library.opcheck``: tiny shapes covering class_index (cosface), CurricularFace's
    row constants, sub-centers, a bias (softmax) and the quadratic transform (so_softmax)."""
    samples = []
    for name in heads:
        spec = HEAD_SPECS[name]
        p = KernelParams.from_spec(spec)
        x, w, labels = make_inputs(5, 6, 4, num_subcenters=spec.num_subcenters, dtype=torch.float32, ignore_rows=1)
        labels = torch.where(labels < 0, -1, labels)
        bias = torch.randn(6).requires_grad_() if name == "softmax" else None
        class_index = torch.tensor([4, 0, 2, 5, 1, 3]) if name == "cosface" else None
        threshold = curricular_row_terms(5) if name == "curricularface" else None
        samples.append((
            x.requires_grad_(), w.requires_grad_(), labels, bias, class_index, threshold,
            p.normalize_x, p.normalize_w, p.scale, int(p.kind), p.alpha, p.delta, p.margin, p.num_subcenters, backend,
        ))
    return samples


FORWARD_TERMS = ("lse_neg", "target_u", "sum_neg", "argmax", "row_scale", "col_scale")


def forward_terms_case(head: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, KernelParams]:
    """``(x, w, labels, bias, row_threshold, params)`` in float64 for a backend's forward at
    B=37, C=1003, D=67, with three rows without a target."""
    spec = HEAD_SPECS[head]
    x, w, labels = make_inputs(37, 1003, 67, num_subcenters=spec.num_subcenters)
    labels[-3:] = -1
    bias = torch.randn(1003, dtype=torch.float64) if head == "softmax" else None
    threshold = curricular_row_terms(37) if head == "curricularface" else None
    return x, w, labels, bias, threshold, KernelParams.from_spec(spec)


def assert_forward_terms_match(got: tuple, want: tuple, tol: float) -> None:
    """A backend's six forward outputs against the reference's: dtypes and shapes equal,
    argmax exactly, the rest within ``tol`` (relative norm)."""
    for name, g, r in zip(FORWARD_TERMS, got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if name == "argmax":
            assert torch.equal(g.cpu(), r)
        else:
            assert_rel_close(g.cpu(), r, tol, name)


def assert_forward_matches_reference(backend, head: str, device: str, tol: float) -> None:
    """``backend.forward`` on ``device`` against the float64 reference on the CPU, on
    :func:`forward_terms_case` (:func:`assert_forward_terms_match`)."""
    x, w, labels, bias, threshold, params = forward_terms_case(head)

    def on_device(t):
        return None if t is None else t.to(device)

    got = backend.forward(on_device(x), on_device(w), on_device(labels), on_device(bias), None, on_device(threshold),
                          params)
    want = margin_lse_terms(x, w, labels, bias, None, threshold, params)
    assert_forward_terms_match(got, want, tol)


def class_index_case(head: str, repeated: bool) -> tuple[MarginSpec, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """``(spec, x, w, labels, class_index, bias)`` in float64 for negative-class sampling:
    700 of 1500 classes in use (with ``repeated``, ten entries repeat the first), B=37,
    D=67, the last two labels ignored (-100), a bias for the linear head."""
    spec = HEAD_SPECS[head]
    x, w, _ = make_inputs(37, 1500, 67, num_subcenters=spec.num_subcenters)
    class_index = torch.randperm(1500)[:700]
    if repeated:
        class_index[100:110] = class_index[0]
    labels = torch.randint(0, 700, (37,))
    labels[-2:] = -100
    bias = torch.randn(1500, dtype=torch.float64) if head == "softmax" else None
    return spec, x, w, labels, class_index, bias


def loss_and_grads(
    x: Tensor,
    w: Tensor,
    labels: Tensor,
    spec: MarginSpec,
    *,
    backend: str,
    upstream: Tensor | None = None,
    bias: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(loss, dx, dW, dbias) of ``margin_cross_entropy``; with ``upstream`` the loss is
    per-row (reduction='none') and backpropagated with that random upstream gradient.
    The inputs go in as they are (detached aliases: their strides are kept)."""
    xr = x.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)
    br = None if bias is None else bias.detach().requires_grad_(True)
    reduction = "none" if upstream is not None else kwargs.pop("reduction", "mean")
    loss = fm.margin_cross_entropy(xr, wr, labels, spec, bias=br, backend=backend, reduction=reduction, **kwargs)
    grad_out = upstream if upstream is not None else torch.ones_like(loss)
    inputs = (xr, wr) if br is None else (xr, wr, br)
    grads = torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype))
    return loss.detach(), grads[0], grads[1], (grads[2] if br is not None else None)


def assert_far_weight_rows_match(backend: str, device: str, dtype: torch.dtype) -> None:
    """Rows of W more than 2**31 elements from its start (10^7 classes x D = 512 holds
    5e9) must be addressed in 64 bits. The weight here is a view with a row stride of
    2**26 elements into an untouched 5 GiB (fp16) allocation, of which only its 40 rows
    are written, so little memory is used; loss and gradients (with a bias, ignored and
    peaked rows, a random upstream gradient) must equal, bit for bit, those for a
    contiguous copy of the same weight, which other tests check against float64. A
    32-bit row offset reads elsewhere (or crashes)."""
    batch, num_classes, dim, stride = 13, 40, 24, 1 << 26
    storage = torch.empty((num_classes - 1) * stride + dim, dtype=dtype, device=device)
    far = storage.as_strided((num_classes, dim), (stride, 1))
    assert (num_classes - 1) * stride >= 2**31
    x, w, labels = make_inputs(batch, num_classes, dim, ignore_rows=2, peaked_rows=1)
    x, labels = x.to(device, dtype), labels.to(device)
    far.copy_(w.to(dtype))
    bias, upstream = torch.randn(num_classes, device=device), torch.randn(batch, device=device)
    results = [
        loss_and_grads(x, weight, labels, HEAD_SPECS["softmax"], backend=backend, upstream=upstream, bias=bias)
        for weight in (far, far.contiguous())
    ]
    for what, a, b in zip(("loss", "dx", "dW", "dbias"), *results):
        assert torch.isfinite(a).all() and torch.equal(a, b), what


def assert_strided_inputs_match(backend: str, device: str, dtype: torch.dtype, tol: float) -> None:
    """Non-contiguous inputs, as users pass them: embeddings sliced from a wider tensor
    (row stride > D), a weight stored (D, C) and passed transposed (column stride C, the
    layout of pytorch-metric-learning's ``W``), a sub-center weight whose rows are every
    other row of a buffer, strided labels and bias. Loss and gradients must match those
    for contiguous copies (``tol``: relative, the kernels may load in another order) and
    come back in the inputs' shapes."""
    batch, num_classes, dim = 11, 29, 20
    for spec in (HEAD_SPECS["softmax"], HEAD_SPECS["subcenter_arcface"]):
        k = spec.num_subcenters
        x, w, labels = make_inputs(batch, num_classes, dim, num_subcenters=k, ignore_rows=2, peaked_rows=1)
        wide = torch.randn(batch, dim + 7, dtype=dtype, device=device)
        wide[:, 3:3 + dim] = x.to(dtype)
        x_view = wide[:, 3:3 + dim]
        if k == 1:
            w_view = w.to(device, dtype).t().contiguous().t()  # column-major (D, C) storage
        else:
            w_view = torch.randn(2 * num_classes * k, dim, dtype=dtype, device=device)[::2]
            w_view.copy_(w.to(dtype))
        labels_view = torch.stack([labels, labels], dim=1).to(device)[:, 1]
        bias = torch.randn(2 * num_classes, device=device, dtype=dtype)[::2] if k == 1 else None
        upstream = torch.randn(batch, device=device)
        assert not (x_view.is_contiguous() or w_view.is_contiguous() or labels_view.is_contiguous())
        strided = (x_view, w_view, labels_view, bias)
        results = [
            loss_and_grads(x_in, w_in, labels_in, spec, backend=backend, upstream=upstream, bias=bias_in)
            for x_in, w_in, labels_in, bias_in in (strided, [None if t is None else t.contiguous() for t in strided])
        ]
        for what, a, b, t in zip(("loss", "dx", "dW", "dbias"), *results, (None, x_view, w_view, bias)):
            if t is None and a is None:  # no bias
                continue
            assert t is None or a.shape == t.shape, what
            assert_rel_close(a, b, tol, f"{spec.name} {what}")


@dataclass(frozen=True)
class Problem:
    """One random case of the fused operation (see :func:`problems`)."""

    name: str
    batch: int
    num_classes: int
    dim: int
    ignored: int
    num_used: int | None  # classes in use through class_index (None: all)
    label_smoothing: float
    reduction: str
    seed: int

    @property
    def single_class(self) -> bool:
        """One class in use: every row's loss is 0 in exact arithmetic (with label
        smoothing computed as a difference of logits, so only rounding is left)."""
        return (self.num_used if self.num_used is not None else self.num_classes) == 1

    def atol(self, tol: float) -> float:
        """An absolute floor for the checks where the loss is identically 0 in exact
        arithmetic (one class in use), so the loss and every gradient are 0 there and
        only rounding is left: of logits of up to |z| ~ 256 (Circle's scale) per row.
        None otherwise."""
        return tol * 256 * self.batch if self.single_class else 0.0

    def inputs(self) -> tuple[Tensor, Tensor, Tensor, dict]:
        """float64 (x, W, labels, kwargs for ``margin_cross_entropy``: bias, class_index,
        label_smoothing, and the random upstream gradient for reduction='none')."""
        torch.manual_seed(self.seed)
        spec = HEAD_SPECS[self.name]
        x, w, labels = make_inputs(self.batch, self.num_classes, self.dim, num_subcenters=spec.num_subcenters,
                                   ignore_rows=self.ignored)
        kwargs: dict = {"label_smoothing": self.label_smoothing}
        if self.num_used is not None:
            kwargs["class_index"] = torch.randperm(self.num_classes)[: self.num_used]
            labels = torch.where(labels >= 0, torch.randint(0, self.num_used, labels.shape), labels)
        if self.name == "softmax":
            kwargs["bias"] = torch.randn(self.num_classes, dtype=torch.float64)
        if self.reduction == "none":
            kwargs["upstream"] = torch.randn(self.batch, dtype=torch.float64)
        else:
            kwargs["reduction"] = self.reduction
        return x, w, labels, kwargs


@st.composite
def problems(draw, max_batch: int = 40, max_classes: int = 300, max_dim: int = 70) -> Problem:
    """Random heads, shapes (D >= 3: see test_reference's gradcheck), ignored rows, class
    sampling, label smoothing and reductions, for cross-checking a backend."""
    batch = draw(st.integers(1, max_batch))
    num_classes = draw(st.integers(1, max_classes))
    sampled = draw(st.booleans()) and num_classes > 1
    return Problem(
        name=draw(st.sampled_from(sorted(HEAD_SPECS))),
        batch=batch,
        num_classes=num_classes,
        dim=draw(st.integers(3, max_dim)),
        ignored=draw(st.integers(0, batch // 3)),
        num_used=draw(st.integers(1, num_classes - 1)) if sampled else None,
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def chunk_size_fixture(backend):
    """A ``chunk_size`` fixture for a compiled backend: ``chunk_size(n)`` sets its classes
    per chunk (0: automatic) for one test."""

    @pytest.fixture
    def chunk_size(monkeypatch):
        return lambda value: monkeypatch.setattr(backend, "chunk_size", value)

    return chunk_size


# ---- the optimizer step fused into a backward --------------------------------------------


def rows_in_use(weight: Tensor, class_index: Tensor | None, k: int) -> Tensor:
    """The rows of ``weight`` the classes in use own, class-major and sub-center minor
    (every row without ``class_index``): the rows a fused optimizer step updates."""
    if class_index is None:
        return torch.arange(weight.shape[0], device=weight.device)
    return (class_index[:, None] * k + torch.arange(k, device=class_index.device)).reshape(-1)


@dataclass
class FusedUpdateProblem:
    """A backward's inputs, from a forward run on the backend under test."""

    grads: UpstreamGrads
    saved: SavedTensors
    params: KernelParams
    rows_in_use: Tensor  # weight rows the update applies to


def fused_update_problem(backend, device, params: KernelParams, *, x_dtype: torch.dtype, w_dtype: torch.dtype,
                         batch: int, classes_all: int, dim: int, num_used: int | None = None, strided: bool = False,
                         bias: bool = False) -> FusedUpdateProblem:
    """A random problem for a backward with a fused optimizer step (fresh float64 draws,
    the same on every device): rows labelled with the last class, ignored
    (``IGNORED_LABEL``) and without a target (-1); ``num_used`` random classes in use
    through ``class_index`` (None: all); with ``strided``, the weight is the transposed view
    of a (D, R) parameter; a bias in x's dtype. Its forward runs on ``backend``."""
    k = params.num_subcenters
    rows_all = classes_all * k
    if strided:
        weight = torch.randn(dim, rows_all, dtype=torch.float64).to(device, w_dtype).t()
    else:
        weight = torch.randn(rows_all, dim, dtype=torch.float64).to(device, w_dtype)
    index = None if num_used is None else torch.randperm(classes_all)[:num_used].to(device)
    classes = classes_all if index is None else index.numel()
    x = torch.randn(batch, dim, dtype=torch.float64).to(device, x_dtype)
    labels = torch.randint(0, classes, (batch,))
    if batch >= 3:
        labels[0], labels[1], labels[2] = classes - 1, IGNORED_LABEL, -1
    labels = labels.to(device)
    b = torch.randn(classes_all, dtype=torch.float64).to(device, x_dtype) if bias else None
    lse_neg, _t, _s, _a, row_scale, col_scale = backend.forward(x, weight, labels, b, index, None, params)
    acc = acc_dtype(x, weight)
    grads = UpstreamGrads(*(torch.randn(batch, dtype=torch.float64).to(device, acc) for _ in range(3)))
    saved = SavedTensors(x, weight, labels, b, index, None, lse_neg, row_scale, col_scale)
    return FusedUpdateProblem(grads, saved, params, rows_in_use(weight, index, k))


def random_state(update_fields: dict, weight: Tensor, contiguous: bool = False,
                 dtype: torch.dtype | None = None) -> tuple[Tensor, ...]:
    """Random optimizer state for ``WeightUpdate(**update_fields)``: tensors of weight's
    shape and strides (or contiguous ones), in weight's dtype or ``dtype``; exp_avg_sq >= 0.
    Not zeros: a first step must ignore the momentum buffer, every other step reads it."""
    def like():
        values = torch.randn(weight.shape, dtype=torch.float64)
        if contiguous:
            return values.to(weight.device, dtype or weight.dtype)
        return torch.empty_like(weight, dtype=dtype).copy_(values)

    if update_fields["kind"] == UPDATE_ADAM:
        return like(), like().abs_()
    return (like(),) if update_fields.get("momentum", 0.0) != 0.0 else ()


def stepped_copies(update: WeightUpdate, weight: Tensor, rows: Tensor,
                   grad_rows: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Copies of ``weight`` and ``update.state`` after the PyTorch rule
    (:func:`apply_update_`) has stepped their ``rows`` with the gradient ``grad_rows``:
    what a fused step must leave."""
    w = weight.clone()
    state = tuple(s.clone() for s in update.state)
    w_rows, state_rows = w[rows], tuple(s[rows] for s in state)
    apply_update_(update, w_rows, state_rows, grad_rows)
    w[rows] = w_rows
    for s, new in zip(state, state_rows):
        s[rows] = new
    return w, state


# ---- process groups ----------------------------------------------------------------------


def run_ranks(worker, args: tuple, world_size: int, folder: Path, what: str, deadline_s: float = 150.0) -> list:
    """Runs ``worker(rank, *args)`` in ``world_size`` fresh (spawned) processes and returns
    what each rank saved to ``folder/rank{r}.pt``. Past ``deadline_s`` the processes still
    running are terminated and the test fails, naming ``what`` (the process group)."""
    context = mp.start_processes(worker, args=args, nprocs=world_size, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    while not context.join(timeout=max(0.1, end - time.monotonic())):
        if time.monotonic() > end:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"{what} did not finish within {deadline_s:g} s")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
