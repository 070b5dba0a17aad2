"""The reference itself: gradcheck in float64, closed forms, and the op path vs eager."""

from __future__ import annotations

import math

import pytest
import torch

import fused_margin as fm
from fused_margin import MarginSpec
from fused_margin.spec import TargetContext, lambda_schedule, psi_multiple_angle
from tests.utils import HEAD_SPECS, assert_rel_close, loss_and_grads, make_inputs

ANGULAR = {"arcface", "combined", "sphereface", "lsoftmax", "curricularface", "subcenter_arcface"}


def _functional(spec: MarginSpec, labels, bias=None, backend="eager", **kwargs):
    def fn(x, w, *maybe_bias):
        b = maybe_bias[0] if maybe_bias else None
        return fm.margin_cross_entropy(x, w, labels, spec, bias=b, backend=backend, reduction="none", **kwargs)

    return fn


# Circle's gradient is by definition not the derivative of its loss (the weights
# [.]_+ are detached): it is checked against its frozen-weight form below instead.
@pytest.mark.parametrize("name", sorted(set(HEAD_SPECS) - {"circle"}))
@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_gradcheck_every_head(name, backend):
    spec = HEAD_SPECS[name]
    batch, classes, dim = 6, 5, 4
    x, w, labels = make_inputs(batch, classes, dim, num_subcenters=spec.num_subcenters, ignore_rows=1)
    if name in ("sphereface", "lsoftmax"):
        x = x * 2.0
    inputs = [x.requires_grad_(), w.requires_grad_()]
    if name == "softmax":
        inputs.append(torch.randn(classes, dtype=torch.float64, requires_grad=True))
    torch.autograd.gradcheck(_functional(spec, labels, backend=backend), inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ANGULAR | {"cosface", "so_softmax", "circle", "cs_softmax"}))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cosines_near_plus_minus_one_stay_finite(name, sign):
    """Embeddings (anti)parallel to their class weight: c_y = +-1 exactly and within
    1e-9 of it. Loss and gradients are finite; gradcheck holds just inside the band."""
    spec = HEAD_SPECS[name]
    k = spec.num_subcenters
    x, w, labels = make_inputs(5, 4, 3, num_subcenters=k)
    x = sign * 3.0 * w[labels * k].clone()
    x[1] += 1e-9 * torch.randn(3, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fm.margin_cross_entropy(xr, wr, labels, spec, backend="eager")
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(xr.grad).all() and torch.isfinite(wr.grad).all()
    if name == "circle":
        return  # detached weights: no gradcheck (see the frozen-weight test)
    # Just inside the clamp band the exact gradient is large but finite and correct.
    x2 = sign * 3.0 * w[labels * k].clone() + 3e-3 * torch.randn(5, 3, dtype=torch.float64)
    torch.autograd.gradcheck(
        _functional(spec, labels), [x2.requires_grad_(), w.clone().requires_grad_()], eps=1e-7, atol=1e-4, rtol=1e-3
    )


@pytest.mark.parametrize("name", sorted(HEAD_SPECS))
def test_op_path_matches_eager(name):
    """The custom op with the reference backend (explicit backward formulas) equals plain
    autograd through the eager reference, with every option on."""
    spec = HEAD_SPECS[name]
    k = spec.num_subcenters
    x, w, labels = make_inputs(9, 7, 5, num_subcenters=k, ignore_rows=2, peaked_rows=1)
    bias = torch.randn(7, dtype=torch.float64) if name == "softmax" else None
    upstream = torch.randn(9, dtype=torch.float64)
    kwargs = {"label_smoothing": 0.1}
    if name == "cosface":
        kwargs["class_index"] = torch.tensor([3, 1, 6, 0, 5])
        labels = torch.randint(0, 5, (9,))
    eager = loss_and_grads(x, w, labels, spec, backend="eager", upstream=upstream, bias=bias, **kwargs)
    op = loss_and_grads(x, w, labels, spec, backend="reference", upstream=upstream, bias=bias, **kwargs)
    for what, a, b in zip(("loss", "dx", "dW", "dbias"), op, eager):
        if b is not None:
            assert_rel_close(a, b, 1e-12, f"{name} {what}")


@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_circle_gradient_is_the_frozen_weight_gradient(backend):
    """Circle loss: its gradient at (x0, W0) is that of the loss whose weights
    alpha_p = [1 + m - c_y]_+ and alpha_n = [c_j + m]_+ are frozen at (x0, W0)."""
    s, m = 256.0, 0.25
    x0, w0, labels = make_inputs(6, 5, 4, ignore_rows=1)
    valid = labels >= 0
    with torch.no_grad():
        c0 = torch.nn.functional.normalize(x0, dim=1) @ torch.nn.functional.normalize(w0, dim=1).T
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), 5).bool()
    alpha = torch.where(onehot, torch.relu(1 + m - c0), torch.relu(c0 + m))

    def frozen(x, w):
        c = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
        logits = s * alpha * torch.where(onehot, c - (1 - m), c - m)
        return torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")

    torch.autograd.gradcheck(frozen, [x0.clone().requires_grad_(), w0.clone().requires_grad_()])
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    frozen(xr, wr).backward()
    got = loss_and_grads(x0, w0, labels, MarginSpec.circle(s, m), backend=backend, reduction="sum")
    assert_rel_close(got[0], frozen(x0, w0), 1e-13, "loss")
    assert_rel_close(got[1], xr.grad, 1e-12, "dx")
    assert_rel_close(got[2], wr.grad, 1e-12, "dW")


def test_matches_torch_cross_entropy_with_margins():
    """CosFace through the fused path equals F.cross_entropy on explicitly built logits,
    with ignore_index, label smoothing and each reduction."""
    x, w, labels = make_inputs(11, 9, 6, ignore_rows=2)
    s, m = 30.0, 0.2
    logits = s * torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), 9).bool() & (labels >= 0)[:, None]
    logits = torch.where(onehot, logits - s * m, logits)
    for reduction in ("mean", "sum", "none"):
        expected = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction, label_smoothing=0.15)
        got = fm.margin_cross_entropy(
            x, w, labels, MarginSpec.cosface(s, m), reduction=reduction, label_smoothing=0.15
        )
        assert_rel_close(got, expected, 1e-13, reduction)


def test_single_class_and_all_ignored_rows_are_finite():
    x, w, labels = make_inputs(4, 1, 3)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fm.margin_cross_entropy(xr, wr, labels, MarginSpec.arcface(), backend="reference")
    loss.backward()
    assert loss.item() == 0.0  # the target is the only class
    assert torch.isfinite(xr.grad).all() and torch.isfinite(wr.grad).all()
    ignored = torch.full((4,), -100)
    loss = fm.margin_cross_entropy(x, w, ignored, MarginSpec.arcface())
    assert loss.item() == 0.0


def test_accuracy_is_top1_of_margin_free_logits():
    x, w, labels = make_inputs(40, 6, 8, ignore_rows=5)
    _, acc = fm.margin_cross_entropy(x, w, labels, MarginSpec.arcface(), return_accuracy=True)
    logits = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    valid = labels >= 0
    expected = (logits.argmax(1) == labels)[valid].double().mean()
    assert acc.item() == pytest.approx(expected.item())


# ---- closed forms ---------------------------------------------------------------------


def _target_logit(spec: MarginSpec, cos: float, embedding_norm: float = 1.0, weight_norm: float = 1.0) -> float:
    """Evaluates the spec's target transform for one row with the given geometry."""
    dim = 2
    theta = math.acos(cos)
    x = torch.tensor([[embedding_norm, 0.0]], dtype=torch.float64)
    w = torch.tensor([[weight_norm * math.cos(theta), weight_norm * math.sin(theta)]], dtype=torch.float64)
    u = torch.tensor([cos], dtype=torch.float64)
    if not spec.normalize_weight:
        u = u * weight_norm
    if not spec.normalize_embeddings:
        u = u * embedding_norm
    ctx = TargetContext(u, x.reshape(1, dim), w, torch.tensor([0]), spec.normalize_embeddings, spec.normalize_weight)
    return float(spec.target(ctx))


@pytest.mark.parametrize("theta", [0.3, 1.0, 2.0, 2.9])
def test_closed_form_target_logits(theta):
    c = math.cos(theta)
    assert _target_logit(MarginSpec.normface(30), c) == pytest.approx(30 * c)
    assert _target_logit(MarginSpec.cosface(64, 0.35), c) == pytest.approx(64 * (c - 0.35))
    assert _target_logit(MarginSpec.cs_softmax(30, 0.35, 0.5), c) == pytest.approx(30 * (c - 0.35))
    arc = 64 * math.cos(theta + 0.5) if theta + 0.5 <= math.pi else 64 * (c - 0.5 * math.sin(0.5))
    assert _target_logit(MarginSpec.arcface(64, 0.5), c) == pytest.approx(arc)
    easy = 64 * math.cos(theta + 0.5) if c > 0 else 64 * c
    assert _target_logit(MarginSpec.arcface(64, 0.5, easy_margin=True), c) == pytest.approx(easy)
    combined = 64 * (math.cos(1.2 * theta + 0.3) - 0.2)
    assert _target_logit(MarginSpec.combined(64, (1.2, 0.3, 0.2)), c) == pytest.approx(combined)
    assert _target_logit(MarginSpec.so_softmax(64, 0.25), c) == pytest.approx(64 * (0.25**2 - (1 - c) ** 2))
    circle = 256 * max(1.25 - c, 0) * (c - 0.75)
    assert _target_logit(MarginSpec.circle(256, 0.25), c) == pytest.approx(circle)
    # SphereFace: ||x|| (lam c + psi_4(theta)) / (1 + lam), psi from its definition
    k = math.floor(theta * 4 / math.pi)
    psi = (-1) ** k * math.cos(4 * theta) - 2 * k
    assert _target_logit(MarginSpec.sphereface(4, 5.0), c, embedding_norm=2.5) == pytest.approx(
        2.5 * (5.0 * c + psi) / 6.0
    )
    k2 = math.floor(theta * 2 / math.pi)
    psi2 = (-1) ** k2 * math.cos(2 * theta) - 2 * k2
    assert _target_logit(MarginSpec.lsoftmax(2, 0.0), c, embedding_norm=1.5, weight_norm=0.7) == pytest.approx(
        1.5 * 0.7 * psi2
    )


def test_psi_is_continuous_and_monotonic():
    theta = torch.linspace(1e-4, math.pi - 1e-4, 2001, dtype=torch.float64)
    for m in (1, 2, 3, 4):
        psi = psi_multiple_angle(torch.cos(theta), m)
        assert (psi.diff() < 0).all(), m
        assert psi[0] == pytest.approx(1.0, abs=1e-6)
        assert psi[-1] == pytest.approx(1 - 2 * m, abs=1e-5)


def test_straight_through_arcface_gradient_is_that_of_s_times_c():
    x, w, labels = make_inputs(5, 4, 3)
    st = loss_and_grads(x, w, labels, MarginSpec.arcface(straight_through=True), backend="eager")
    exact = loss_and_grads(x, w, labels, MarginSpec.arcface(), backend="eager")
    assert_rel_close(st[0], exact[0], 1e-14, "same forward")
    # gradient of the loss whose target logit is s*c, but with the margin'd softmax
    # probabilities: build it by hand
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    c = torch.nn.functional.normalize(xr, dim=1) @ torch.nn.functional.normalize(wr, dim=1).T
    arc = MarginSpec.arcface().target.margin_cos(c.clamp(-1, 1))
    onehot = torch.nn.functional.one_hot(labels, 4).bool()
    logits = 64 * torch.where(onehot, c + (arc - c).detach(), c)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert_rel_close(st[1], xr.grad, 1e-12, "dx")
    assert_rel_close(st[2], wr.grad, 1e-12, "dW")


def test_lambda_schedule_values():
    # SphereFace defaults: base 1000, gamma 0.12, power 1, min 5
    assert lambda_schedule(0, 1000, 0.12, 1, 5) == 1000
    assert lambda_schedule(100, 1000, 0.12, 1, 5) == pytest.approx(1000 / 13)
    assert lambda_schedule(10_000, 1000, 0.12, 1, 5) == 5
    # L-Softmax defaults: base 1000, gamma 2.5e-5, power 35, min 0
    assert lambda_schedule(20_000, 1000, 2.5e-5, 35, 0) == pytest.approx(1000 * 1.5**-35)
    head = fm.SphereFaceLoss(5, 3)
    x, _, labels = make_inputs(4, 5, 3, dtype=torch.float32)
    for _ in range(3):
        head(x, labels)
    assert int(head.step) == 3 and head.lam == pytest.approx(1000 / (1 + 0.36))
    head.eval()
    head(x, labels)
    assert int(head.step) == 3  # eval does not advance the schedule


def test_curricular_t_update_and_threshold():
    head = fm.CurricularFaceLoss(6, 4, dtype=torch.float64, ignore_index=-1)
    x, _, labels = make_inputs(8, 6, 4, ignore_rows=2, ignore_index=-1)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(head.weight.detach(), dim=1).T
    valid = labels >= 0
    mean_cos = cos[valid.nonzero()[:, 0], labels[valid]].mean().item()
    head(x, labels)
    assert float(head.t) == pytest.approx(0.01 * mean_cos, rel=1e-6)
    head(x, labels)
    assert float(head.t) == pytest.approx(0.01 * mean_cos + 0.99 * 0.01 * mean_cos, rel=1e-6)
    # a batch without a labelled row leaves t as it is
    before = float(head.t)
    head(x, torch.full_like(labels, -1))
    assert float(head.t) == before
    # t travels with state_dict() (a buffer)
    restored = fm.CurricularFaceLoss(6, 4, dtype=torch.float64, ignore_index=-1)
    restored.load_state_dict(head.state_dict())
    assert float(restored.t) == before
    # the threshold is cos(theta + m)
    c = torch.tensor([0.3, -0.8], dtype=torch.float64)
    th = MarginSpec.curricularface(margin=0.5).non_target.threshold(c)
    assert torch.allclose(th, torch.cos(torch.acos(c) + 0.5))


def test_curricular_spec_follows_the_t_buffer():
    """The head's spec holds its ``t`` buffer itself (built outside a compiled step); it
    follows the buffer when .to(), materialize_state or load_state_dict(assign=True)
    replaces it, and sees the in-place updates of training."""
    head = fm.CurricularFaceLoss(6, 4, ignore_index=-1)
    assert head.spec().non_target.t is head.t
    before = head.t
    head.to(torch.float64)  # the weight only: the running statistic stays fp32 (a new buffer all the same)
    assert head.weight.dtype == torch.float64 and head.t.dtype == torch.float32
    assert head.t is not before and head.spec().non_target.t is head.t
    x, _, labels = make_inputs(8, 6, 4, ignore_rows=2, ignore_index=-1)
    head(x, labels)
    assert float(head.spec().non_target.t) == float(head.t) != 0.0
    state = {name: value.clone() + (0.25 if name == "t" else 0) for name, value in head.state_dict().items()}
    head.load_state_dict(state, assign=True)
    assert head.spec().non_target.t is head.t and float(head.spec().non_target.t) == float(state["t"])
    meta = fm.CurricularFaceLoss(6, 4, device="meta")
    meta.materialize_state("cpu")
    assert meta.spec().non_target.t is meta.t and meta.t.device.type == "cpu"


def test_curricular_matches_explicit_construction():
    t, m, s = 0.3, 0.5, 64.0
    x, w, labels = make_inputs(7, 6, 5)
    spec = MarginSpec.curricularface(s, m, t)
    got = fm.margin_cross_entropy(x, w, labels, spec, reduction="none")
    c = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    cy = c.gather(1, labels[:, None])
    cos_tm = torch.cos(torch.acos(cy) + m)
    hard = c > cos_tm
    logits = torch.where(hard, c * (t + c), c)
    target = torch.where(cy > math.cos(math.pi - m), cos_tm, cy - m * math.sin(m))
    logits = logits.scatter(1, labels[:, None], target)
    expected = torch.nn.functional.cross_entropy(s * logits, labels, reduction="none")
    assert_rel_close(got, expected, 1e-12, "curricular")


# ---- random shapes (hypothesis) ---------------------------------------------------------

from tests.utils import given, settings, st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(set(HEAD_SPECS) - {"circle"})),
    batch=st.integers(1, 7),
    classes=st.integers(1, 7),
    # dim >= 3: in 1-D or 2-D, |c| lands within float64 rounding of 1 often enough that
    # finite differences of sqrt(1 - c^2) turn rounding noise into large "derivatives"
    dim=st.integers(3, 5),
    ignored=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_gradcheck_random_shapes(name, batch, classes, dim, ignored, seed):
    torch.manual_seed(seed)
    spec = HEAD_SPECS[name]
    x, w, labels = make_inputs(batch, classes, dim, num_subcenters=spec.num_subcenters,
                               ignore_rows=min(ignored, batch))
    torch.autograd.gradcheck(
        _functional(spec, labels, backend="reference"),
        [x.requires_grad_(), w.requires_grad_()], eps=1e-6, atol=1e-5, rtol=1e-4,
    )
