"""Inter-class filtering (``NonTargetKind.FILTERED``, arcface_torch's
``interclass_filtering_threshold``) against logits built by hand, on every backend.

The model: ``c = x̂ Ŵᵀ``; a non-target cosine above ``t`` becomes 0 and carries no
gradient (its logit ``s * 0`` stays in the softmax); the target is CosFace's
``s * (c_y - m)``; the loss is ``F.cross_entropy`` of those logits with autograd. The
generic per-kind tests (``HEAD_SPECS['filtered']``) cover the other options.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm
from fused_margin import MarginSpec, NonTarget, NonTargetKind, _ext
from tests.utils import assert_rel_close, loss_and_grads, make_inputs

SCALE, MARGIN, THRESHOLD = 30.0, 0.35, 0.15


def _by_hand(x, w, labels, upstream):
    x = x.detach().double().requires_grad_(True)
    w = w.detach().double().requires_grad_(True)
    c = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    target = torch.zeros_like(c, dtype=torch.bool)
    valid = labels >= 0
    target[valid.nonzero().squeeze(1), labels[valid]] = True
    keep = (c <= THRESHOLD) | target
    z = SCALE * torch.where(keep, c, torch.zeros_like(c))
    z = torch.where(target, z - SCALE * MARGIN, z)
    loss = F.cross_entropy(z, labels.clamp_min(0), reduction="none") * valid
    dx, dw = torch.autograd.grad(loss, (x, w), upstream.double())
    return loss.detach(), dx, dw, (~keep).sum()


def _cases():
    # peaked rows (c_y = 1), ignored rows, a random upstream gradient; D = 5 spreads the
    # cosines so that about a third of the non-targets lie above the threshold
    x, w, labels = make_inputs(23, 41, 5, ignore_rows=3, peaked_rows=2)
    labels = torch.where(labels < 0, -100, labels)
    return x, w, labels, torch.randn(23, dtype=torch.float64)


SPEC = MarginSpec.cosface(SCALE, MARGIN, interclass_filtering_threshold=THRESHOLD)


def test_spec_and_kind():
    assert SPEC.non_target == NonTarget(NonTargetKind.FILTERED, margin=THRESHOLD)
    assert MarginSpec.cosface(interclass_filtering_threshold=0).non_target.kind == NonTargetKind.IDENTITY
    with pytest.raises(ValueError, match="interclass_filtering_threshold must be >= 0"):
        MarginSpec.arcface(interclass_filtering_threshold=-0.1)
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        fm.CosFaceLoss(5, 4, interclass_filtering_threshold=float("nan"))


def _check(backend, dtype, tol, device="cpu"):
    x, w, labels, upstream = _cases()
    want = _by_hand(x, w, labels, upstream)
    assert want[3] > 0.25 * x.shape[0] * w.shape[0]  # the filter is exercised
    got = loss_and_grads(x.to(device, dtype), w.to(device, dtype), labels.to(device), SPEC, backend=backend,
                         upstream=upstream.to(device, dtype))
    for name, g, r in zip(("loss", "dx", "dW"), got, want):
        assert_rel_close(g.cpu(), r, tol, f"{backend} {name}")


@pytest.mark.parametrize("backend", ["reference", "eager", "cpu", "triton"])
def test_matches_logits_by_hand(backend):
    if backend == "triton":
        _check(backend, torch.float32, 1e-5)
    else:
        _check(backend, torch.float64, 1e-12)
        _check(backend, torch.float32, 1e-5)


def test_filtered_gradient_is_exactly_zero_elementwise():
    """A class whose cosine with every row is above the threshold, and that is nobody's
    target, receives an exactly zero gradient (elementwise) on the reference and CPU
    backends; its neighbour, below the threshold for some rows, does not."""
    direction = torch.randn(9, dtype=torch.float64)
    x = 3.0 * direction + 0.3 * torch.randn(17, 9, dtype=torch.float64)
    w = torch.randn(12, 9, dtype=torch.float64)
    w[4] = direction
    labels = torch.randint(0, 12, (17,))
    labels[labels == 4] = 5
    labels[-2:] = -100
    c = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    assert bool((c[:, 4] > THRESHOLD).all()) and bool((c[:, 3] <= THRESHOLD).any())
    upstream = torch.randn(17, dtype=torch.float64)
    for backend, dtype in (("reference", torch.float64), ("cpu", torch.float64), ("cpu", torch.float32)):
        _, _, dw, _ = loss_and_grads(x.to(dtype), w.to(dtype), labels, SPEC, backend=backend,
                                     upstream=upstream.to(dtype))
        assert torch.equal(dw[4], torch.zeros_like(dw[4])), backend
        assert bool((dw[3] != 0).any()), backend


def test_nan_cosine_is_not_filtered_away():
    """A NaN cosine is not 'above the threshold': the filter passes it on, so the loss is
    NaN wherever the unfiltered head's is (the reference: NaN)."""
    x, w, labels, _ = _cases()
    w[3, 0] = float("nan")
    assert torch.isnan(fm.margin_cross_entropy(x, w, labels, SPEC, backend="reference"))
    plain = MarginSpec.cosface(SCALE, MARGIN)
    for backend in ("cpu",):
        filtered = fm.margin_cross_entropy(x.float(), w.float(), labels, SPEC, backend=backend)
        unfiltered = fm.margin_cross_entropy(x.float(), w.float(), labels, plain, backend=backend)
        assert bool(torch.isnan(filtered)) == bool(torch.isnan(unfiltered)), backend


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_matches_logits_by_hand_gpu(backend):
    if backend == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip("fused_margin._C has no CUDA kernels")
    torch.backends.cuda.matmul.allow_tf32 = False
    _check(backend, torch.float32, 1e-5, device="cuda")
