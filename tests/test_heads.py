"""The nn.Module heads: construction, state, inference, and the stateful heads' math."""

from __future__ import annotations

import io
import math
import os

import pytest
import torch

import fused_margin as fm
from fused_margin.heads.adaface import AdaptiveMarginTarget
from tests.utils import assert_rel_close, make_inputs

ALL_HEADS = [
    fm.SoftmaxLoss, fm.NormFaceLoss, fm.CosFaceLoss, fm.ArcFaceLoss, fm.CombinedMarginLoss, fm.SphereFaceLoss,
    fm.LSoftmaxLoss, fm.CSSoftmaxLoss, fm.SOSoftmaxLoss, fm.CircleLoss, fm.CurricularFaceLoss,
    fm.SubCenterArcFaceLoss, fm.AdaFaceLoss, fm.MagFaceLoss,
]


@pytest.mark.parametrize("head_cls", ALL_HEADS, ids=lambda c: c.__name__)
def test_head_trains_and_round_trips_state(head_cls):
    head = head_cls(11, 6, dtype=torch.float64, return_accuracy=True)
    assert head.weight.shape == (11 * head.num_subcenters, 6)
    x, _, labels = make_inputs(9, 11, 6, ignore_rows=1)
    x = x * 15.0  # MagFace/AdaFace care about norms
    x_before, labels_before = x.clone(), labels.clone()
    xr = x.clone().requires_grad_()
    loss, acc = head(xr, labels)
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= acc.item() <= 1.0
    assert torch.isfinite(xr.grad).all() and torch.isfinite(head.weight.grad).all()
    assert torch.equal(x, x_before) and torch.equal(labels, labels_before)  # nothing modified in place
    head(x, labels)  # second step: statistics move

    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    clone = head_cls(11, 6, dtype=torch.float64, return_accuracy=True)
    clone.load_state_dict(torch.load(buffer))
    assert int(clone.step) == int(head.step) == 2
    for attr in ("t", "lam"):
        if hasattr(head, attr):
            assert getattr(clone, attr) == getattr(head, attr)
    head.eval(), clone.eval()
    assert torch.equal(head(x, labels)[0], clone(x, labels)[0])


@pytest.mark.parametrize("head_cls", ALL_HEADS, ids=lambda c: c.__name__)
def test_get_logits_are_margin_free(head_cls):
    head = head_cls(7, 5, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    logits = head.get_logits(x)
    assert logits.shape == (4, 7)
    spec = head.spec()
    xs = torch.nn.functional.normalize(x, dim=1) if spec.normalize_embeddings else x
    w = head.weight.detach()
    ws = torch.nn.functional.normalize(w, dim=1) if spec.normalize_weight else w
    expected = spec.scale * (xs @ ws.T).view(4, 7, -1).amax(2)
    if head.bias is not None:
        expected = expected + head.bias.detach()
    assert_rel_close(logits, expected, 1e-12, head_cls.__name__)


def test_constructor_names_and_defaults():
    cs = fm.CSSoftmaxLoss(10, 4)
    assert (cs.scale, cs.margin, cs.weight_update_factor) == (30.0, 0.35, 1.0)
    assert cs.spec().non_target.alpha == 1.0
    assert fm.CSSoftmaxLoss(10, 4, weight_update_factor=0.5).spec().non_target.alpha == 0.5
    assert fm.CombinedMarginLoss(10, 4).margins == (1.0, 0.3, 0.2)
    assert fm.SubCenterArcFaceLoss(10, 4).weight.shape == (30, 4)
    assert fm.SoftmaxLoss(10, 4).bias.shape == (10,)
    assert fm.ArcFaceLoss(10, 4).bias is None
    assert fm.ArcFaceLoss(10, 4, dtype=torch.bfloat16).weight.dtype == torch.bfloat16
    assert "num_classes=10" in repr(fm.CosFaceLoss(10, 4))


def test_adaface_margin_follows_norm_statistics():
    head = fm.AdaFaceLoss(5, 4, dtype=torch.float64)
    x, _, labels = make_inputs(6, 5, 4)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True) * torch.tensor([5.0, 10, 20, 30, 40, 50])[:, None]
    norms = torch.linalg.vector_norm(x, dim=1)
    head.eval()  # statistics stay at the authors' initial (20, 100)
    loss = head(x, labels)
    scaler = ((norms - 20.0) / (100.0 + 1e-3) * 0.333).clamp(-1, 1)
    c = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(head.weight.detach(), dim=1).T
    cy = c.gather(1, labels[:, None]).squeeze(1)
    theta = (torch.acos(cy) - 0.4 * scaler).clamp(1e-3, math.pi - 1e-3)
    target = 64 * (torch.cos(theta) - (0.4 + 0.4 * scaler))
    logits = (64 * c).scatter(1, labels[:, None], target[:, None])
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert_rel_close(loss, expected, 1e-12, "adaface")
    head.train()
    head(x, labels)
    assert head.batch_mean.item() == pytest.approx(0.99 * 20 + 0.01 * norms.mean().item())
    assert head.batch_std.item() == pytest.approx(0.99 * 100 + 0.01 * norms.std().item())


def test_magface_margin_and_regularizer():
    head = fm.MagFaceLoss(5, 4, dtype=torch.float64, reduction="none")
    x, _, labels = make_inputs(6, 5, 4)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True) * torch.tensor([5.0, 10, 40, 80, 110, 200])[:, None]
    a = torch.linalg.vector_norm(x, dim=1).clamp(10, 110)
    m = 0.45 + (0.8 - 0.45) * (a - 10) / 100
    c = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(head.weight.detach(), dim=1).T
    cy = c.gather(1, labels[:, None]).squeeze(1)
    arc = torch.where(cy > torch.cos(math.pi - m), torch.cos(torch.acos(cy) + m), cy - m * torch.sin(m))
    logits = (64 * c).scatter(1, labels[:, None], 64 * arc[:, None])
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none") + 35 * (a / 110**2 + 1 / a)
    assert_rel_close(head(x, labels), expected, 1e-12, "magface")


@pytest.mark.parametrize("head_cls", [fm.AdaFaceLoss, fm.MagFaceLoss], ids=lambda c: c.__name__)
def test_gradcheck_norm_aware_heads(head_cls):
    head = head_cls(5, 4, dtype=torch.float64, reduction="sum").eval()
    x, _, labels = make_inputs(6, 5, 4, ignore_rows=1)
    x = x * 20.0
    spec = head.spec()
    if head_cls is fm.AdaFaceLoss:
        # AdaFace's margin scaler g(||x||) is detached by design (as in the authors'
        # code): its gradient is that of the loss with g frozen at the evaluation point.
        g = head.norm_scaler(torch.linalg.vector_norm(x, dim=1))
        spec = fm.MarginSpec(64.0, AdaptiveMarginTarget(64.0, 0.4, lambda _norms: g))

    def fn(xx, ww):
        return fm.margin_cross_entropy(xx, ww, labels, spec, reduction="sum")

    torch.autograd.gradcheck(fn, [x.requires_grad_(), head.weight.detach().clone().requires_grad_()])


@pytest.mark.parametrize("backend", ["reference", "eager", "cpu", "triton"])
@pytest.mark.parametrize("head_cls", ALL_HEADS, ids=lambda c: c.__name__)
def test_empty_batch(head_cls, backend):
    """A batch of zero rows (a data-parallel rank with nothing left, say): loss 0, zero
    gradients of the right shapes, and the head's state stays finite."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs CPU tensors only under its interpreter")
    head = head_cls(11, 6, backend=backend)
    x = torch.randn(0, 6, requires_grad=True)
    loss = head(x, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0
    assert x.grad.shape == (0, 6)
    assert head.weight.grad.shape == head.weight.shape and not head.weight.grad.any()
    for name, value in head.state_dict().items():
        values = value.values() if isinstance(value, dict) else [value]  # extra state: a dict
        for v in values:
            if isinstance(v, float) or (torch.is_tensor(v) and v.is_floating_point()):
                assert torch.isfinite(torch.as_tensor(v)).all(), (name, v)
