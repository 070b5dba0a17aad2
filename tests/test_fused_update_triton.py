"""The Triton backward with a fused optimizer step (``Backend.backward(..., update)``).

Each test runs the backend's backward twice on the same fresh random problem: once plain
(the weight's gradient dW), once with the update, which must leave W and the optimizer
state as :func:`fused_margin.optim.update.apply_update_` leaves them from that dW, on
the weight rows in use, and return the same grad_x and grad_bias. Without a GPU the
kernels run in Triton's interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from fused_margin.backends.triton import BACKEND
from fused_margin.kernel_params import KernelParams, UpstreamGrads
from fused_margin.optim.update import UPDATE_ADAM, UPDATE_SGD, WeightUpdate
from tests.utils import HEAD_SPECS, fused_update_problem, random_state, rows_in_use, stepped_copies

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"

pytestmark = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="needs a CUDA device or TRITON_INTERPRET=1",
)

SGD = dict(kind=UPDATE_SGD, lr=0.1)
UPDATES = {
    "sgd": dict(SGD),
    "sgd_wd_maximize": dict(SGD, weight_decay=0.05, maximize=True),
    "momentum": dict(SGD, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "momentum_first_step": dict(SGD, momentum=0.9, dampening=0.1, first_step=True),
    "nesterov": dict(SGD, momentum=0.8, nesterov=True, weight_decay=0.02),
    # step t = 3: bias corrections 1 - beta**t
    "adam": dict(kind=UPDATE_ADAM, lr=0.01, weight_decay=0.03, beta1=0.9, beta2=0.99, eps=1e-6,
                 bias_correction1=1 - 0.9**3, bias_correction2_sqrt=(1 - 0.99**3) ** 0.5),
    "adamw_maximize": dict(kind=UPDATE_ADAM, lr=0.02, weight_decay=0.1, decoupled=True, maximize=True,
                           beta1=0.8, beta2=0.95, eps=1e-5, bias_correction1=1 - 0.8**2,
                           bias_correction2_sqrt=(1 - 0.95**2) ** 0.5),
}


def _problem(batch, num_classes, dim, *, head="arcface", k=1, dtype=torch.float32, state_dtype=None,
             config="momentum", bias=False, index=False):
    """A forward's saved tensors, random upstream gradients, the params and an update
    whose state is random (:func:`tests.utils.fused_update_problem`, ``random_state``);
    with ``index``, ``num_classes`` of ``num_classes + 5`` in use."""
    spec = HEAD_SPECS[head] if k == 1 else replace(HEAD_SPECS[head], num_subcenters=k)
    problem = fused_update_problem(
        BACKEND, DEVICE, KernelParams.from_spec(spec), x_dtype=dtype, w_dtype=dtype, batch=batch,
        classes_all=num_classes + 5 if index else num_classes, dim=dim, num_used=num_classes if index else None,
        bias=bias,
    )
    settings = UPDATES[config]
    update = WeightUpdate(**settings, state=random_state(settings, problem.saved.weight, dtype=state_dtype))
    return problem.saved, problem.grads, problem.params, update


def _expected(saved, grads, params, update):
    """The unfused backward, then the PyTorch rule on the rows in use of copies of W and
    the state: ``(grad_x, grad_bias, W, state)``. 'recompute' with sub-centers updates
    through the 'gemm' backward (its dW programs share rows): compared with that one."""
    mode = BACKEND.backward_mode
    if mode == "recompute" and params.num_subcenters > 1:
        BACKEND.backward_mode = "gemm"
    try:
        grad_x, grad_w, grad_b = BACKEND.backward(grads, saved, params)
    finally:
        BACKEND.backward_mode = mode
    rows = rows_in_use(saved.weight, saved.class_index, params.num_subcenters)
    w, state = stepped_copies(update, saved.weight, rows, grad_w[rows])
    return grad_x, grad_b, w, state


def _fused(saved, grads, params, update):
    """The fused backward on copies of W and the state: ``(result, W, state)``."""
    w = saved.weight.clone()
    state = tuple(s.clone() for s in update.state)
    result = BACKEND.backward(grads, replace(saved, weight=w), params, replace(update, state=state))
    return result, w, state


def _assert_step_close(out, ref, before, rows, what, fp32):
    """``out`` matches ``ref`` to the stored dtype's rounding on the rows in use, the
    step moved those rows measurably, and every other row is bitwise unchanged."""
    o, r = out[rows].double(), ref[rows].double()
    if fp32:  # the same fp32 operations: a few ulps (GPU FMA contraction)
        tol = 4e-7 * r.abs() + 1e-7 * r.abs().max()
    else:  # dW is kept in fp32 here, rounded to the 16-bit dtype in the unfused one
        tol = 2e-3 * r.abs() + 2e-3 * r.abs().max()
    bad = (o - r).abs() > tol
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} elements off, max error {float((o - r).abs().max()):.3e}"
    moved = float((r - before[rows].double()).abs().max())
    assert moved > 1e-3, f"{what}: the step did not move it ({moved:.2e}): the test would not see a wrong one"
    others = torch.ones(out.shape[0], dtype=torch.bool, device=out.device)
    others[rows] = False
    assert torch.equal(out[others], before[others]), f"{what}: rows not in use changed"


def _check(saved, grads, params, update):
    before_w = saved.weight.clone()
    before_state = tuple(s.clone() for s in update.state)
    inputs = [t.clone() for t in (saved.x, saved.labels, saved.lse_neg, *[g for g in vars(grads).values()])]
    grad_x, grad_b, w_ref, state_ref = _expected(saved, grads, params, update)
    (fx, fw, fb), w_out, state_out = _fused(saved, grads, params, update)
    assert fw is None
    assert torch.equal(fx, grad_x), "grad_x differs from the unfused backward's"
    assert (fb is None) == (grad_b is None)
    if grad_b is not None:
        assert torch.equal(fb, grad_b), "grad_bias differs from the unfused backward's"
    fp32 = saved.weight.dtype == torch.float32
    rows = rows_in_use(saved.weight, saved.class_index, params.num_subcenters)
    _assert_step_close(w_out, w_ref, before_w, rows, "weight", fp32)
    for i, (s_out, s_ref, s_before) in enumerate(zip(state_out, state_ref, before_state)):
        if update.kind == UPDATE_SGD and update.first_step:
            s_before = torch.full_like(s_before, float("inf"))  # a first step ignores the buffer
        _assert_step_close(s_out, s_ref, s_before, rows, f"state[{i}]", s_out.dtype == torch.float32 and fp32)
    # nothing else the caller passed is modified
    assert torch.equal(saved.weight, before_w)
    assert all(torch.equal(a, b) for a, b in zip(update.state, before_state))
    after = [saved.x, saved.labels, saved.lse_neg, *vars(grads).values()]
    assert all(torch.equal(a, b) for a, b in zip(after, inputs))


@pytest.fixture(params=["gemm", "recompute"])
def mode(request):
    saved_mode, BACKEND.backward_mode = BACKEND.backward_mode, request.param
    yield request.param
    BACKEND.backward_mode = saved_mode


@pytest.mark.parametrize("config", list(UPDATES))
def test_fused_step_matches_the_rule(mode, config):
    _check(*_problem(11, 37, 40, config=config))


@pytest.mark.parametrize("config", ["momentum", "adam"])
def test_fused_step_class_index_bias_subcenters(mode, config):
    _check(*_problem(9, 23, 24, head="softmax", config=config, bias=True, index=True))
    _check(*_problem(9, 19, 20, head="cosface", k=2, config=config, index=True))


@pytest.mark.parametrize("config", ["nesterov", "adamw_maximize"])
def test_fused_step_fp16(mode, config):
    _check(*_problem(10, 29, 32, head="cosface", dtype=torch.float16, config=config, bias=True))
    # fp16 weights with fp32 optimizer state
    _check(*_problem(10, 29, 32, dtype=torch.float16, state_dtype=torch.float32, config=config))


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["momentum", "adam"])
def test_fused_step_bf16(mode, config):
    _check(*_problem(64, 300, 96, dtype=torch.bfloat16, config=config, index=True))


def test_recompute_updates_in_its_dw_kernel(monkeypatch):
    """K = 1 and one D slice: 'recompute' updates in its own dW kernel, not via 'gemm'."""
    from fused_margin.triton_kernels import backward_gemm

    def refuse(*args, **kwargs):
        raise AssertionError("the 'gemm' backward ran")

    monkeypatch.setattr(backward_gemm, "margin_lse_bwd_gemm", refuse)
    monkeypatch.setattr(BACKEND, "backward_mode", "recompute")
    _check(*_problem(7, 21, 18, config="adam"))


def test_atomic_mode_runs_the_gemm_update():
    """'atomic' cannot update in its kernel (many programs add to one row): a fused step
    runs the 'gemm' backward, bitwise the same result."""
    saved, grads, params, update = _problem(8, 17, 16, config="momentum")
    results = {}
    for m in ("gemm", "atomic"):
        BACKEND.backward_mode = m
        try:
            results[m] = _fused(saved, grads, params, update)
        finally:
            BACKEND.backward_mode = None
    (gx, gw, gb), w, state = results["gemm"]
    (ax, aw, ab), aw_out, astate = results["atomic"]
    assert gw is None and aw is None
    assert torch.equal(gx, ax) and torch.equal(w, aw_out) and torch.equal(state[0], astate[0])
    assert not torch.equal(w, saved.weight)


def test_no_rows_still_steps(mode):
    """B = 0: dW = 0, but weight decay and momentum still move the rows in use."""
    saved, grads, params, update = _problem(4, 9, 8, config="momentum", index=True)
    empty = replace(
        saved, x=saved.x[:0], labels=saved.labels[:0], lse_neg=saved.lse_neg[:0], row_scale=saved.row_scale[:0]
    )
    grads = UpstreamGrads(*(g[:0] for g in vars(grads).values()))
    rows = rows_in_use(saved.weight, saved.class_index, 1)
    w_ref, (state_ref,) = stepped_copies(update, saved.weight, rows, torch.zeros_like(saved.weight[rows]))
    (gx, gw, _), w, state = _fused(empty, grads, params, update)
    assert gx.shape == (0, 8) and gw is None
    _assert_step_close(w, w_ref, saved.weight, rows, "weight", True)
    _assert_step_close(state[0], state_ref, update.state[0], rows, "state[0]", True)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(state=()), r"update\.state must be \(momentum_buffer,\)"),
        (dict(kind=3), r"update\.kind must be .* got 3"),
        (dict(lr=float("nan")), r"update\.lr must be a finite number, got nan"),
        (dict(nesterov=True, dampening=0.5), r"update\.nesterov needs .*dampening=0\.5"),
    ],
)
def test_bad_updates_are_refused(change, match):
    saved, grads, params, update = _problem(4, 9, 8, config="momentum")
    w = saved.weight.clone()
    with pytest.raises(ValueError, match=match):
        BACKEND.backward(grads, saved, params, replace(update, **change))
    assert torch.equal(saved.weight, w)


def test_bad_state_tensors_are_refused():
    saved, grads, params, update = _problem(4, 9, 8, config="adam")
    m, v = update.state
    cases = [
        ((m, v[:-1]), r"update\.state\[1\] must have the weight's shape \(9, 8\), got \(8, 8\)"),
        ((m, v.double()), r"update\.state\[1\] dtype must be .* got torch\.float64"),
        ((m, m), r"update\.state\[1\] must not share memory"),
        ((m, v.t().contiguous().t()), r"update\.state\[1\] must have the strides of update\.state\[0\]"),
    ]
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            BACKEND.backward(grads, saved, params, replace(update, state=state))
