"""Conformance of every backend's non-target transform ``T`` and derivative ``T'`` with
their Python definition, :meth:`NonTarget.value` / :meth:`NonTarget.derivative`.

Each kind is evaluated on a grid of cosines in [-1, 1] that holds -1, 0, 1, the kind's
breakpoints (``-m`` and ``m``, the filtering threshold, CurricularFace's per-row
thresholds), the points ``cos(pi - m)``, and the neighbours one ulp either side of each,
in the dtype under test. Two ways in:

* directly: ``torch.ops.fused_margin_C.non_target_transform`` runs the C++ header's
  ``T``/``T'`` (the CPU epilogue's vector lanes and their scalar tail; the CUDA device
  code on a GPU), and a small Triton kernel calls the Triton jit helpers;
* through the op: ``x_b = (u_b, rho_b)`` (``rho_b`` random), target row ``(0, 1)`` and one
  negative class with weight row ``(1, 0)``, no normalization, so the negative's cosine
  is exactly ``u_b``; then ``lse_neg_b = s * T(u_b)`` (one negative, ``s`` a power of two:
  exact), and with random upstream gradients ``g`` of ``lse_neg`` and ``h`` of
  ``sum_neg``, ``dx_b[0] = (g_b + h_b) * s * T'(u_b)``.

The Python side is evaluated in float64 with the constants the kernels see (rounded to
the dtype under test). Criteria: relative norm error below 1e-5 (fp32) / 1e-12 (fp64),
and exact zeros elementwise wherever the definition gives exactly zero.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from fused_margin import NonTarget, NonTargetKind, _ext
from fused_margin.kernel_params import KernelParams
from fused_margin.ops import OpOptions, forward_args, margin_lse
from fused_margin.triton_kernels.common import _non_target, _non_target_grad

K = NonTargetKind
SCALE = 4.0  # a power of two: s * T(u) is exact, so lse_neg / s is the kernel's T(u)

#: Per kind, a transform with constants exactly representable in fp32 (the breakpoints
#: are then the same in every dtype) and one with arbitrary constants (rounded to the
#: dtype on the Python side, as the kernels round them).
TRANSFORMS: dict[str, NonTarget] = {
    "identity": NonTarget(),
    "affine": NonTarget(K.AFFINE, alpha=1.25, delta=-0.125),
    "affine_any": NonTarget(K.AFFINE, alpha=0.83, delta=0.071),
    "quadratic": NonTarget(K.QUADRATIC, margin=0.375),
    "quadratic_any": NonTarget(K.QUADRATIC, margin=0.35),
    "quadratic_detached": NonTarget(K.QUADRATIC_DETACHED, margin=0.25),
    "quadratic_detached_any": NonTarget(K.QUADRATIC_DETACHED, margin=0.4),
    "curricular": NonTarget(K.CURRICULAR, margin=0.5),
    "filtered": NonTarget.filtered(0.25),
    "filtered_any": NonTarget.filtered(0.2),
}

#: the ArcFace-style angular margins whose ``cos(pi - m)`` joins the grid
ANGULAR_MARGINS = (0.5, 0.35)


def _rounded(nt: NonTarget, dtype: torch.dtype) -> NonTarget:
    """``nt`` with its constants as a kernel computing in ``dtype`` sees them."""
    def r(v: float) -> float:
        return float(torch.tensor(v, dtype=torch.float64).to(dtype))
    return NonTarget(nt.kind, alpha=r(nt.alpha), delta=r(nt.delta), margin=r(nt.margin))


def _with_neighbours(points: torch.Tensor) -> torch.Tensor:
    lower = torch.nextafter(points, torch.full_like(points, -math.inf))
    upper = torch.nextafter(points, torch.full_like(points, math.inf))
    return torch.cat([lower, points, upper])


def _breakpoints(nt: NonTarget, dtype: torch.dtype) -> list[float]:
    m = _rounded(nt, dtype).margin
    if nt.kind in (K.QUADRATIC, K.QUADRATIC_DETACHED):
        return [-m, m]
    if nt.kind == K.FILTERED:
        return [m]
    return []


def _thresholds(nt: NonTarget, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
    """CurricularFace's (2, rows) constants: thresholds ``cos(theta_y + m)`` of random
    target cosines, with -1, 0, 1 and a few representable values among them; random t
    per row (the kernels read it per row)."""
    if nt.kind != K.CURRICULAR:
        return None
    target_cos = torch.rand(rows, dtype=torch.float64) * 2 - 1
    thresholds = nt.threshold(target_cos)
    fixed = torch.tensor([-1.0, 0.0, 1.0, -0.5, 0.375, 0.75], dtype=torch.float64)
    thresholds[: len(fixed)] = fixed
    t = torch.rand(rows, dtype=torch.float64)
    return torch.stack([thresholds, t]).to(dtype)


def grid(nt: NonTarget, dtype: torch.dtype, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(u, thresholds)``: u (rows, N) in ``dtype``, every row holding the shared grid and
    every row's breakpoints with their neighbours (so each CurricularFace row meets its
    own threshold); N is not a multiple of the CPU's vector width (the scalar tail runs)."""
    if nt.kind == K.CURRICULAR:
        rows = max(rows, 8)
    thresholds = _thresholds(nt, rows, dtype)
    points = [-1.0, 0.0, 1.0, *(math.cos(math.pi - m) for m in ANGULAR_MARGINS), *_breakpoints(nt, dtype)]
    base = torch.tensor(points, dtype=torch.float64).to(dtype)
    if thresholds is not None:
        base = torch.cat([base, thresholds[0]])
    spread = torch.linspace(-1.0, 1.0, 29, dtype=torch.float64).to(dtype)
    random = (torch.rand(10, dtype=torch.float64) * 2 - 1).to(dtype)
    u = torch.cat([_with_neighbours(base), spread, random])
    if u.numel() % 8 == 0:
        u = torch.cat([u, (torch.rand(3, dtype=torch.float64) * 2 - 1).to(dtype)])
    return u.expand(rows, -1).contiguous(), thresholds


def definition(nt: NonTarget, u: torch.Tensor, thresholds: torch.Tensor | None):
    """``(T(u), T'(u))`` of the Python definition, in float64, with the constants rounded
    to ``u``'s dtype."""
    exact = _rounded(nt, u.dtype)
    u64 = u.double()
    th64 = None if thresholds is None else thresholds.double()
    return exact.value(u64, th64), exact.derivative(u64, th64)


def assert_conforms(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got = got.detach().cpu().double()
    assert got.shape == want.shape, what
    assert torch.isfinite(want).all()
    zero = want == 0
    assert (got[zero] == 0).all(), f"{what}: nonzero where the definition is exactly zero: {got[zero & (got != 0)]}"
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    err = (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item()
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


KINDS = sorted(TRANSFORMS)
needs_ext = pytest.mark.skipif(_ext.load_error() is not None, reason="fused_margin._C not built")


def test_grid_reaches_every_branch():
    """The grid exercises both sides of every kind's breakpoints (the test can fail)."""
    for name, nt in TRANSFORMS.items():
        u, thresholds = grid(nt, torch.float32)
        value, derivative = definition(nt, u, thresholds)
        if nt.kind in (K.QUADRATIC, K.QUADRATIC_DETACHED, K.FILTERED):
            assert (derivative == 0).any() and (derivative != 0).any(), name
        if nt.kind == K.CURRICULAR:
            above = u > thresholds[0, :, None]
            assert above.any() and (~above).any()
            up = torch.nextafter(thresholds[0], torch.full_like(thresholds[0], math.inf))
            for b in range(u.shape[0]):  # each row meets its own threshold, and one ulp above it
                assert (u[b] == thresholds[0, b]).any() and (u[b] == up[b]).any(), b

# ---------------------------------------------------------------------------------
# The Python definition
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KINDS)
def test_derivative_is_the_gradient_of_value(name):
    """``derivative`` is autograd's derivative of ``value`` (the constants held fixed),
    at the breakpoints too (both take the same side)."""
    nt = TRANSFORMS[name]
    u, thresholds = grid(nt, torch.float64)
    leaf = u.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nt.value(leaf, thresholds).sum(), leaf)
    torch.testing.assert_close(nt.derivative(u, thresholds), grad, rtol=1e-14, atol=1e-15)
    assert nt.apply(u, thresholds).equal(nt.value(u, thresholds))


def test_value_propagates_nan_and_checks_thresholds():
    u = torch.tensor([[math.nan, 0.5]], dtype=torch.float64)
    thresholds = torch.tensor([[0.1], [0.2]], dtype=torch.float64)
    for name, nt in TRANSFORMS.items():
        assert nt.value(u, thresholds)[0, 0].isnan(), name
    with pytest.raises(ValueError, match="needs thresholds"):
        TRANSFORMS["curricular"].value(u)
    with pytest.raises(ValueError, match=r"thresholds must have shape \(2, 1\)"):
        TRANSFORMS["curricular"].derivative(u, thresholds[:, [0, 0]])


# ---------------------------------------------------------------------------------
# Direct evaluation: the C++ header and the Triton helpers
# ---------------------------------------------------------------------------------


def _hook(nt: NonTarget, u: torch.Tensor, thresholds: torch.Tensor | None):
    return _ext.ops().non_target_transform(u, thresholds, int(nt.kind), nt.alpha, nt.delta, nt.margin)


def _check_hook(name: str, dtype: torch.dtype, device: str) -> None:
    nt = TRANSFORMS[name]
    u, thresholds = grid(nt, dtype, rows=3)
    want_value, want_derivative = definition(nt, u, thresholds)
    u_in = u.to(device)
    th_in = None if thresholds is None else thresholds.to(device)
    u_copy = u_in.clone()
    value, derivative = _hook(nt, u_in, th_in)
    assert value.dtype == dtype and value.device == u_in.device
    assert u_in.equal(u_copy)
    assert_conforms(value, want_value, dtype, f"{name} T")
    assert_conforms(derivative, want_derivative, dtype, f"{name} T'")
    nan = torch.full((1, 9), math.nan, dtype=dtype, device=device)
    nan_th = None if th_in is None else th_in[:, :1].contiguous()
    assert _hook(nt, nan, nan_th)[0].isnan().all(), name


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", KINDS)
def test_cpp_header_on_cpu(name, dtype):
    _check_hook(name, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", KINDS)
def test_cpp_header_on_cuda(name, dtype):
    if not _ext.has_cuda_kernels():
        pytest.skip("fused_margin._C built without CUDA kernels")
    _check_hook(name, dtype, "cuda")


@needs_ext
def test_hook_rejects_bad_arguments():
    ops = _ext.ops()
    u = torch.rand(2, 3)
    with pytest.raises(RuntimeError, match="kind must be a NonTargetKind .* got 9"):
        ops.non_target_transform(u, None, 9, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"u must have shape \(rows, cols\)"):
        ops.non_target_transform(u[0], None, 0, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="CurricularFace kind needs row_threshold"):
        ops.non_target_transform(u, None, int(K.CURRICULAR), 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"row_threshold must have shape \(2, 2\)"):
        ops.non_target_transform(u, torch.rand(2, 3), int(K.CURRICULAR), 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="u must be float32 or float64"):
        ops.non_target_transform(u.half(), None, 0, 1.0, 0.0, 0.0)


@triton.jit
def _triton_transform_kernel(u_ptr, threshold_ptr, t_ptr, value_ptr, derivative_ptr, cols, alpha, delta, margin,
                             KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    u = tl.load(u_ptr + row * cols + offs, mask=mask, other=0.0)
    threshold = tl.load(threshold_ptr + row)
    t = tl.load(t_ptr + row)
    tl.store(value_ptr + row * cols + offs, _non_target(u, threshold, alpha, delta, margin, t, KIND), mask=mask)
    tl.store(derivative_ptr + row * cols + offs, _non_target_grad(u, threshold, alpha, margin, t, KIND), mask=mask)


def _triton_eval(nt: NonTarget, u: torch.Tensor, thresholds: torch.Tensor | None):
    rows, cols = u.shape
    terms = thresholds if thresholds is not None else torch.rand(2, rows, dtype=u.dtype)  # unused by the kind
    terms = terms.to(u.device).contiguous()
    value, derivative = torch.empty_like(u), torch.empty_like(u)
    _triton_transform_kernel[(rows,)](u, terms[0], terms[1], value, derivative, cols, nt.alpha, nt.delta,
                                      nt.margin, KIND=int(nt.kind), BLOCK=triton.next_power_of_2(cols))
    return value, derivative


def _triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", KINDS)
def test_triton_helpers(name):
    nt = TRANSFORMS[name]
    u, thresholds = grid(nt, torch.float32, rows=3)
    want_value, want_derivative = definition(nt, u, thresholds)
    value, derivative = _triton_eval(nt, u.to(_triton_device()), thresholds)
    assert_conforms(value, want_value, torch.float32, f"{name} T")
    assert_conforms(derivative, want_derivative, torch.float32, f"{name} T'")


# ---------------------------------------------------------------------------------
# Through the op: T from the forward, T' from the backward
# ---------------------------------------------------------------------------------


def _through_op(nt: NonTarget, u: torch.Tensor, thresholds: torch.Tensor | None, backend: str, device: str):
    """``(lse_neg / s, dx[:, 0] / ((g + h) * s), g + h)`` for rows of one cosine each."""
    dtype = u.dtype
    batch = u.shape[0]
    rho = torch.rand(batch, dtype=dtype) + 0.5
    x = torch.stack([u, rho], dim=1).to(device).requires_grad_(True)
    weight = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype, device=device)  # target, negative
    labels = torch.zeros(batch, dtype=torch.int64, device=device)
    th = None if thresholds is None else thresholds.to(device)
    params = KernelParams(normalize_x=False, normalize_w=False, scale=SCALE, kind=nt.kind, alpha=nt.alpha,
                          delta=nt.delta, margin=nt.margin)
    x_copy = x.detach().clone()
    lse_neg, target_u, sum_neg, *_ = margin_lse(*forward_args(x, weight, labels, None, None, th, params,
                                                             OpOptions(backend)))
    torch.testing.assert_close(target_u, rho.to(device), rtol=0, atol=0)
    g = torch.randn(batch, dtype=dtype, device=device)
    h = torch.randn(batch, dtype=dtype, device=device)
    (grad_x,) = torch.autograd.grad((lse_neg, sum_neg), (x,), (g, h))
    assert x.detach().equal(x_copy)
    upstream = g.double().cpu() + h.double().cpu()
    return lse_neg.detach().cpu().double(), sum_neg.detach().cpu().double(), grad_x[:, 0].cpu().double(), upstream


BACKENDS = [
    pytest.param("reference", [torch.float32, torch.float64], id="reference"),
    pytest.param("cpu", [torch.float32, torch.float64], id="cpu", marks=needs_ext),
    pytest.param("triton", [torch.float32], id="triton"),
    pytest.param("cuda", [torch.float32, torch.float64], id="cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend, dtypes", BACKENDS)
@pytest.mark.parametrize("name", KINDS)
def test_through_the_op(backend, dtypes, name):
    device = {"reference": "cpu", "cpu": "cpu", "triton": _triton_device(), "cuda": "cuda"}[backend]
    if backend == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip("fused_margin._C built without CUDA kernels")
    nt = TRANSFORMS[name]
    for dtype in dtypes:
        u, thresholds = grid(nt, dtype, rows=1)
        if thresholds is not None:  # one row per (threshold, cosine) pair
            rows, cols = u.shape
            thresholds = thresholds.repeat_interleave(cols, dim=1)
        u = u.reshape(-1)
        want_value, want_derivative = definition(nt, u[:, None], thresholds)
        lse_neg, sum_neg, dx0, upstream = _through_op(nt, u, thresholds, backend, device)
        what = f"{backend} {dtype} {name}"
        assert_conforms(lse_neg, SCALE * want_value[:, 0], dtype, f"{what} lse_neg")
        assert_conforms(sum_neg, SCALE * want_value[:, 0], dtype, f"{what} sum_neg")
        assert_conforms(dx0, upstream * SCALE * want_derivative[:, 0], dtype, f"{what} dx")
