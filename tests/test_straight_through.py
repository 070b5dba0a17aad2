"""``straight_through=True`` on the angular heads: the margin in the forward pass only.

The loss equals the exact head's; the gradient is that of ``F.cross_entropy`` on logits
``s * c`` whose target entries are shifted by the margin as a constant, built by hand
here for the heads whose target logit has a closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm
from tests.utils import assert_rel_close, make_inputs

HEADS = {
    "arcface": (fm.ArcFaceLoss, {}),
    "arcface_none": (fm.ArcFaceLoss, {"beyond_pi": "none"}),
    "subcenter_arcface": (fm.SubCenterArcFaceLoss, {"num_subcenters": 2}),
    "combined": (fm.CombinedMarginLoss, {"margins": (1.2, 0.3, 0.1)}),
    "curricularface": (fm.CurricularFaceLoss, {}),
    "magface": (fm.MagFaceLoss, {}),
    "adaface": (fm.AdaFaceLoss, {}),
}


def _pair(name, num_classes, dim):
    cls, kwargs = HEADS[name]
    heads = [cls(num_classes, dim, straight_through=st, dtype=torch.float64, backend="reference", **kwargs).eval()
             for st in (True, False)]
    heads[1].load_state_dict(heads[0].state_dict())
    return heads


def _grads(head, x, labels):
    x = x.detach().clone().requires_grad_(True)
    head.zero_grad()
    loss = head(x, labels)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad.clone()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_value_is_the_exact_heads_gradient_is_not(name):
    k = HEADS[name][1].get("num_subcenters", 1)
    x, w, labels = make_inputs(11, 7, 5, num_subcenters=k, ignore_rows=2)
    x = x * 20.0  # MagFace's and AdaFace's margins read the norm
    st, exact = _pair(name, 7, 5)
    with torch.no_grad():
        st.weight.copy_(w)
        exact.weight.copy_(w)
    a, b = _grads(st, x, labels), _grads(exact, x, labels)
    assert_rel_close(a[0], b[0], 1e-12, f"{name} loss")
    assert torch.isfinite(a[1]).all() and torch.isfinite(a[2]).all()
    assert float((a[1] - b[1]).abs().max()) > 1e-6 * float(b[1].abs().max())


def _target_by_hand(name, c):
    if name == "arcface":  # with its default fallback
        m = 0.5
        return torch.where(c > math.cos(math.pi - m), torch.cos(torch.acos(c) + m), c - m * math.sin(m))
    if name == "arcface_none":
        return torch.cos(torch.acos(c) + 0.5)
    return torch.cos(1.2 * torch.acos(c) + 0.3) - 0.1  # combined


@pytest.mark.parametrize("name", ["arcface", "arcface_none", "combined"])
def test_gradient_is_that_of_s_times_c(name):
    x, w, labels = make_inputs(9, 6, 4, ignore_rows=1)
    # rows at theta = 3.0 (beyond pi - m) and theta near 0
    u = F.normalize(w[labels[0]], dim=0)
    v = torch.randn(4, dtype=torch.float64)
    v = F.normalize(v - (v @ u) * u, dim=0)
    x[0] = math.cos(3.0) * u + math.sin(3.0) * v
    x[1] = F.normalize(w[labels[1]], dim=0) + 1e-3 * v
    st, _ = _pair(name, 6, 4)
    with torch.no_grad():
        st.weight.copy_(w)
    got = _grads(st, x, labels)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    c = F.normalize(xr, dim=1) @ F.normalize(wr, dim=1).T
    valid = labels >= 0
    rows, cols = torch.arange(9)[valid], labels[valid]
    shift = torch.zeros_like(c)
    c_y = c.detach()[rows, cols]
    shift[rows, cols] = 64.0 * (_target_by_hand(name, c_y) - c_y)
    loss = F.cross_entropy(64.0 * c + shift, labels, ignore_index=-100)
    loss.backward()
    for what, a, b in zip(("loss", "dx", "dW"), got, (loss.detach(), xr.grad, wr.grad)):
        assert_rel_close(a, b, 1e-10, f"{name} {what}")
