"""Independent cross-check against a peer: pytorch-metric-learning (PML).

PML stores the class weights as (D, C); we hand it the transpose of ours. Everything
runs in float64. Where the definitions agree the losses and both gradients must match
to float64 round-off; where they differ, the tests below pin the difference down.
"""

from __future__ import annotations

import math

import pytest
import torch

import fused_margin as fm
from fused_margin import MarginSpec
from tests.utils import assert_rel_close, make_inputs

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def _pml(loss_cls, w: torch.Tensor, **kwargs):
    num_rows, dim = w.shape
    num_classes = num_rows // kwargs.get("sub_centers", 1)
    loss = loss_cls(num_classes=num_classes, embedding_size=dim, **kwargs).double()
    with torch.no_grad():
        loss.W.copy_(w.T)
    return loss


def _ours_and_theirs(spec, pml_loss, x, w, labels):
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours = fm.margin_cross_entropy(xa, wa, labels, spec, backend="reference")
    ours.backward()
    xb = x.clone().requires_grad_()
    theirs = pml_loss(xb, labels)
    theirs.backward()
    return (ours, xa.grad, wa.grad), (theirs, xb.grad, pml_loss.W.grad.T)


CASES = {
    "arcface": (MarginSpec.arcface(64.0, math.radians(28.6)), pml_losses.ArcFaceLoss, {"margin": 28.6, "scale": 64}),
    "cosface": (MarginSpec.cosface(64.0, 0.35), pml_losses.CosFaceLoss, {"margin": 0.35, "scale": 64}),
    "normface": (MarginSpec.normface(20.0), pml_losses.NormalizedSoftmaxLoss, {"temperature": 0.05}),
    # PML's SphereFace and Large-Margin Softmax have no annealed lambda: lambda = 0.
    "sphereface": (MarginSpec.sphereface(4, lam=0.0), pml_losses.SphereFaceLoss, {"margin": 4, "scale": 1}),
    "lsoftmax_m2": (MarginSpec.lsoftmax(2, lam=0.0), pml_losses.LargeMarginSoftmaxLoss, {"margin": 2, "scale": 1}),
    "lsoftmax_m4": (MarginSpec.lsoftmax(4, lam=0.0), pml_losses.LargeMarginSoftmaxLoss, {"margin": 4, "scale": 1}),
    "subcenter_arcface": (
        MarginSpec.arcface(64.0, math.radians(28.6), num_subcenters=3),
        pml_losses.SubCenterArcFaceLoss,
        {"margin": 28.6, "scale": 64, "sub_centers": 3},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_pytorch_metric_learning(name):
    spec, loss_cls, kwargs = CASES[name]
    k = spec.num_subcenters
    x, w, labels = make_inputs(13, 9, 7, num_subcenters=k)
    if not spec.normalize_embeddings:
        x = x * 1.7
    pml_loss = _pml(loss_cls, w, **kwargs)
    ours, theirs = _ours_and_theirs(spec, pml_loss, x, w, labels)
    for what, a, b in zip(("loss", "dx", "dW"), ours, theirs):
        assert_rel_close(a, b, 1e-10, f"{name} {what}")


def test_arcface_fallback_region_agrees_and_is_documented():
    """Both libraries switch to ``s * (c - m sin m)`` beyond theta + m > pi. Put rows
    there (theta close to pi) and check the losses still agree: the definitions match."""
    m_deg = 28.6
    x, w, labels = make_inputs(6, 5, 4)
    x = -w[labels] + 0.05 * torch.randn(6, 4, dtype=torch.float64)  # theta near pi
    cos = torch.nn.functional.cosine_similarity(x, w[labels])
    assert (torch.acos(cos) + math.radians(m_deg) > math.pi).all()
    pml_loss = _pml(pml_losses.ArcFaceLoss, w, margin=m_deg, scale=64)
    ours, theirs = _ours_and_theirs(MarginSpec.arcface(64.0, math.radians(m_deg)), pml_loss, x, w, labels)
    for what, a, b in zip(("loss", "dx", "dW"), ours, theirs):
        assert_rel_close(a, b, 1e-10, f"fallback {what}")


def test_difference_at_exactly_aligned_embeddings():
    """Where the definitions differ: at c_y = 1 exactly PML differentiates acos at 1
    (its gradient is non-finite), while our gradient floors 1 - c^2 at SIN2_EPS
    (docs/design.md section 6: exact gradients, never NaN). The loss values still agree."""
    x, w, labels = make_inputs(5, 4, 3)
    x = 2.0 * w[labels].clone()
    pml_loss = _pml(pml_losses.ArcFaceLoss, w, margin=28.6, scale=64)
    ours, theirs = _ours_and_theirs(MarginSpec.arcface(64.0, math.radians(28.6)), pml_loss, x, w, labels)
    # c_y is 1 only up to float64 rounding (~1e-16), which acos turns into theta ~ 1e-8:
    # the two formulas then agree to about s * sin(m) * 1e-8.
    assert_rel_close(ours[0], theirs[0], 1e-6, "loss at c_y = 1")
    assert torch.isfinite(ours[1]).all() and torch.isfinite(ours[2]).all()
    assert not (torch.isfinite(theirs[1]).all() and torch.isfinite(theirs[2]).all())
