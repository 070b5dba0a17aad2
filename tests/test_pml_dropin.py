"""fused_margin.pml against pytorch-metric-learning itself, in float64.

Each fused loss and its pytorch-metric-learning (PML) namesake are built with the same
constructor arguments; the state_dict of one is loaded strictly into the other (both
ways), and the loss and the gradients of the embeddings and of ``W`` must agree.
"""

from __future__ import annotations

import pytest
import torch

from fused_margin import pml
from tests.utils import assert_rel_close, make_inputs

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

# name -> constructor arguments (PML's names and units), non-default values
CASES = {
    "ArcFaceLoss": {"margin": 25.0, "scale": 48},
    "CosFaceLoss": {"margin": 0.3, "scale": 40},
    "SphereFaceLoss": {"margin": 4, "scale": 1.5},
    "LargeMarginSoftmaxLoss": {"margin": 3, "scale": 0.7},
    "NormalizedSoftmaxLoss": {"temperature": 0.07},
    "SubCenterArcFaceLoss": {"margin": 25.0, "scale": 48, "sub_centers": 2},
}
NUM_CLASSES, DIM, BATCH = 9, 7, 13


def _pair(name: str, backend: str):
    kwargs = CASES[name]
    theirs = getattr(pml_losses, name)(num_classes=NUM_CLASSES, embedding_size=DIM, **kwargs).double()
    ours = getattr(pml, name)(num_classes=NUM_CLASSES, embedding_size=DIM, backend=backend, **kwargs).double()
    return ours, theirs


def _loss_and_grads(module, x, labels):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    loss = module(x, labels)
    loss.backward()
    return loss.detach(), x.grad, module.W.grad.clone()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_pytorch_metric_learning(name, backend):
    ours, theirs = _pair(name, backend)
    assert ours.W.shape == theirs.W.shape
    k = CASES[name].get("sub_centers", 1)
    x, _, labels = make_inputs(BATCH, NUM_CLASSES, DIM, num_subcenters=k)
    x = x * 1.7  # the unnormalized losses see the norm
    # theirs -> ours, strictly; then ours -> theirs with a fresh weight
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for direction in ("theirs->ours", "ours->theirs"):
        got, want = _loss_and_grads(ours, x, labels), _loss_and_grads(theirs, x, labels)
        for what, a, b in zip(("loss", "dx", "dW"), got, want):
            assert_rel_close(a, b, 1e-10, f"{name} {direction} {what}")
        with torch.no_grad():
            ours.W.copy_(torch.randn_like(ours.W))
        theirs.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["W"]


def test_weight_is_read_as_a_view():
    """The kernels read ``W.t()``: the transposed view of the parameter, not a copy, so
    its gradient lands in ``W`` directly and nothing of W's size is allocated per call."""
    ours = pml.ArcFaceLoss(num_classes=NUM_CLASSES, embedding_size=DIM).double()
    x, _, labels = make_inputs(BATCH, NUM_CLASSES, DIM)
    seen = []
    original = pml.margin_cross_entropy

    def spy(embeddings, weight, *args, **kwargs):
        seen.append(weight)
        return original(embeddings, weight, *args, **kwargs)

    pml.margin_cross_entropy = spy
    try:
        ours(x, labels)
    finally:
        pml.margin_cross_entropy = original
    (weight,) = seen
    assert weight.data_ptr() == ours.W.data_ptr() and weight.shape == (NUM_CLASSES, DIM)


def test_get_logits_matches():
    for name in ("ArcFaceLoss", "NormalizedSoftmaxLoss", "LargeMarginSoftmaxLoss"):
        ours, theirs = _pair(name, "reference")
        ours.load_state_dict(theirs.state_dict())
        x, _, _ = make_inputs(BATCH, NUM_CLASSES, DIM)
        assert_rel_close(ours.get_logits(x), theirs.get_logits(x), 1e-12, name)


@pytest.mark.parametrize("argument", ["reducer", "distance", "weight_regularizer", "embedding_regularizer"])
def test_unsupported_arguments_are_named(argument):
    with pytest.raises(ValueError, match=f"{argument}=.* is not supported"):
        pml.ArcFaceLoss(num_classes=3, embedding_size=4, **{argument: object()})


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="collect_stats=True is not supported"):
        pml.CosFaceLoss(num_classes=3, embedding_size=4, collect_stats=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'margn'"):
        pml.CosFaceLoss(num_classes=3, embedding_size=4, margn=0.2)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        pml.CosFaceLoss(num_classes=0, embedding_size=4)
    loss = pml.CosFaceLoss(num_classes=3, embedding_size=4)
    with pytest.raises(ValueError, match="indices_tuple is not supported"):
        loss(torch.randn(2, 4), torch.tensor([0, 1]), indices_tuple=(torch.tensor([0]),) * 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        loss(torch.randn(2, 4), torch.tensor([0, -100]))
