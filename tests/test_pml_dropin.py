"""fused_margin.pml against pytorch-metric-learning itself.

Each fused loss is a subclass of its pytorch-metric-learning (PML) namesake. Built with
the same constructor arguments, each is compared with PML's own class computing the same
thing: in float64 the loss and the gradients of the embeddings and of ``W`` agree to
1e-10, through PML's reducers, miners, regularizers, statistics and distributed wrapper;
in fp16 and bf16 the dtypes are PML's and the values no less accurate than PML's own.
"""

from __future__ import annotations

import copy
import importlib
import sys
import warnings

import numpy as np
import pytest
import torch

from tests.utils import assert_no_less_accurate_than_eager, assert_rel_close, make_inputs

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers, regularizers  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper  # noqa: E402

from fused_margin import pml  # noqa: E402
from fused_margin.optim import apply_optimizer_in_backward  # noqa: E402

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
TOL = 1e-10


def _pair(name: str, backend: str = "cpu", dtype: torch.dtype = torch.float64, **extra):
    """Ours and PML's, with one weight."""
    kwargs = {**CASES[name], **extra}
    theirs = getattr(pml_losses, name)(num_classes=NUM_CLASSES, embedding_size=DIM, **copy.deepcopy(kwargs))
    ours = getattr(pml, name)(num_classes=NUM_CLASSES, embedding_size=DIM, backend=backend, **kwargs)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _inputs(name: str, dtype: torch.dtype = torch.float64):
    x, _, labels = make_inputs(BATCH, NUM_CLASSES, DIM, num_subcenters=CASES[name].get("sub_centers", 1))
    return (1.7 * x).to(dtype), labels  # the unnormalized losses see the norm


def _loss_and_grads(module, x, labels, *args, upstream: float = 1.0, **kwargs):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    loss = module(x, labels, *args, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), x.grad, module.W.grad.clone()


def _assert_same(ours, theirs, x, labels, what: str, *args, **kwargs) -> None:
    upstream = float(torch.rand(()) + 0.5)
    got = _loss_and_grads(ours, x, labels, *args, upstream=upstream, **kwargs)
    want = _loss_and_grads(theirs, x, labels, *args, upstream=upstream, **kwargs)
    for part, a, b in zip(("loss", "dx", "dW"), got, want):
        assert a.dtype == b.dtype, f"{what} {part}: dtype {a.dtype}, PML's {b.dtype}"
        assert_rel_close(a, b, TOL, f"{what} {part}")


# ---- the class, its state and its numbers ----------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_pytorch_metric_learning(name, backend):
    ours, theirs = _pair(name, backend)
    assert isinstance(ours, getattr(pml_losses, name))
    x, labels = _inputs(name)
    # theirs -> ours (in _pair), strictly; then ours -> theirs with a fresh weight
    for direction in ("theirs->ours", "ours->theirs"):
        _assert_same(ours, theirs, x, labels, f"{name} {direction}")
        with torch.no_grad():
            ours.W.copy_(torch.randn_like(ours.W))
        theirs.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["W"]


def test_weight_is_read_as_a_view():
    """The kernels read ``W.t()``: the transposed view of the parameter, not a copy, so
    its gradient lands in ``W`` directly and nothing of W's size is allocated per call."""
    ours = pml.ArcFaceLoss(num_classes=NUM_CLASSES, embedding_size=DIM).double()
    x, labels = _inputs("ArcFaceLoss")
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_get_logits_is_pmls_bitwise(dtype):
    for name in sorted(CASES):
        ours, theirs = _pair(name, dtype=dtype)
        x, _ = _inputs(name, dtype)
        assert torch.equal(ours.get_logits(x), theirs.get_logits(x)), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_dtypes_follow_pytorch_metric_learning(name, dtype):
    """W is cast to the embeddings' dtype at the forward and the loss comes back in it,
    as PML does; the fused values are no less accurate than PML's own in that dtype,
    both against PML in float64 on the same rounded inputs."""
    ours, theirs = _pair(name, dtype=torch.float32)
    x, labels = _inputs(name, dtype)
    got = _loss_and_grads(ours, x, labels)
    want = _loss_and_grads(theirs, x, labels)
    assert ours.W.dtype == theirs.W.dtype == dtype
    for part, a, b in zip(("loss", "dx", "dW"), got, want):
        assert a.dtype == b.dtype == dtype, f"{part}: {a.dtype}, PML's {b.dtype}"
    exact, _ = _pair(name, dtype=torch.float64)
    exact.load_state_dict({"W": theirs.W.detach().double()})
    truth = _loss_and_grads(exact, x.double(), labels)
    if dtype == torch.float64:
        for part, a, b in zip(("loss", "dx", "dW"), got, want):
            assert_rel_close(a, b, TOL, f"{name} {part}")
        return
    for part, a, b, ref in zip(("loss", "dx", "dW"), got, want, truth):
        assert_no_less_accurate_than_eager(a, b, ref, 1e-3, f"{name} {dtype} {part}")


def test_autocast_keeps_the_master_weight():
    """Under autocast the master W keeps its dtype (PML casts it down outside CUDA's
    autocast) and the loss is fp32, as PML's cross-entropy gives there."""
    ours, _ = _pair("ArcFaceLoss", dtype=torch.float32)
    plain = copy.deepcopy(ours)
    x, labels = _inputs("ArcFaceLoss", torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ours(x, labels)
    assert ours.W.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert ours.W.grad.dtype == torch.float32
    # the same numbers as fp32 outside autocast, from the same bf16 embeddings
    assert_rel_close(loss.detach(), plain(x.float(), labels).detach(), 1e-6, "autocast loss")


# ---- PML's machinery around the loss --------------------------------------------------


@pytest.mark.parametrize("reducer", [reducers.MeanReducer(), reducers.ThresholdReducer(low=1.0, high=60.0),
                                     reducers.AvgNonZeroReducer()], ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("name", ["ArcFaceLoss", "NormalizedSoftmaxLoss"])
def test_reducers(name, reducer):
    ours, theirs = _pair(name, reducer=reducer)
    x, labels = _inputs(name)
    _assert_same(ours, theirs, x, labels, f"{name} {type(reducer).__name__}")


@pytest.mark.parametrize("miner", [miners.BatchHardMiner(), miners.MultiSimilarityMiner(epsilon=0.5)],
                         ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("name", ["CosFaceLoss", "SubCenterArcFaceLoss"])
def test_miners_indices_tuple(name, miner):
    ours, theirs = _pair(name)
    x, labels = _inputs(name)
    indices_tuple = miner(x, labels)
    weights = lmu.convert_to_weights(indices_tuple, labels, dtype=x.dtype)
    assert weights.unique().numel() > 1  # rows weighted differently: the test can see a mix-up
    _assert_same(ours, theirs, x, labels, f"{name} {type(miner).__name__}", indices_tuple)


@pytest.mark.parametrize("regularizer", [
    {"weight_regularizer": regularizers.RegularFaceRegularizer(), "weight_reg_weight": 0.3},
    {"weight_regularizer": regularizers.CenterInvariantRegularizer()},
    {"embedding_regularizer": regularizers.LpRegularizer(), "embedding_reg_weight": 0.2},
], ids=lambda r: type(next(iter(r.values()))).__name__)
@pytest.mark.parametrize("name", ["ArcFaceLoss", "NormalizedSoftmaxLoss"])
def test_regularizers(name, regularizer):
    ours, theirs = _pair(name, **regularizer)
    x, labels = _inputs(name)
    _assert_same(ours, theirs, x, labels, f"{name} {regularizer}")


def test_collect_stats():
    for name in ("ArcFaceLoss", "CosFaceLoss", "LargeMarginSoftmaxLoss", "NormalizedSoftmaxLoss"):
        distance = (distances.DotProductSimilarity if name == "NormalizedSoftmaxLoss" else distances.CosineSimilarity)
        ours, theirs = _pair(name, collect_stats=True, distance=distance(collect_stats=True))
        x, labels = _inputs(name)
        ours(x, labels), theirs(x, labels)
        recorded = [*getattr(theirs, "_record_these_stats", []),
                    *(f"distance.{s}" for s in theirs.distance._record_these_stats)]
        assert ("avg_angle" in recorded) == (name != "NormalizedSoftmaxLoss"), name
        for stat in recorded:
            owner_ours, owner_theirs = (m.distance if stat.startswith("distance.") else m for m in (ours, theirs))
            a, b = (getattr(owner, stat.removeprefix("distance.")) for owner in (owner_ours, owner_theirs))
            assert b != 0 and a == pytest.approx(b, rel=TOL), f"{name} {stat}: {a} vs {b}"


def test_get_outliers_is_pmls():
    ours, theirs = _pair("SubCenterArcFaceLoss", sub_centers=3)
    x, labels = _inputs("SubCenterArcFaceLoss")
    present = labels.unique()  # PML leaves the dominant centers of absent classes uninitialized
    counts = set()
    for threshold in (60, 90, 120):
        got, want = ours.get_outliers(x, labels, threshold=threshold), theirs.get_outliers(x, labels, threshold=threshold)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1][:, present], want[1][:, present])
        counts.add(got[0].numel())
    assert len(counts) > 1  # the thresholds split the batch differently


def test_distributed_loss_wrapper_in_a_world_of_one(world_of_one):
    for name in ("ArcFaceLoss", "SphereFaceLoss"):
        ours, theirs = _pair(name)
        x, labels = _inputs(name)
        wrapped_ours, wrapped_theirs = DistributedLossWrapper(ours), DistributedLossWrapper(theirs)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = wrapped_ours(xa, labels), wrapped_theirs(xb, labels)
        (0.7 * la).backward(), (0.7 * lb).backward()
        for part, a, b in (("loss", la, lb), ("dx", xa.grad, xb.grad), ("dW", ours.W.grad, theirs.W.grad)):
            assert_rel_close(a.detach(), b.detach(), TOL, f"{name} wrapped {part}")


# ---- margins read at every call ------------------------------------------------------


def test_margin_attributes_are_read_at_every_call():
    """A margin schedule written for PML (setting ``loss.margin``, ``loss.scale``,
    ``loss.temperature`` between steps) changes the fused loss as it changes PML's."""
    changes = {
        "ArcFaceLoss": {"margin": 0.2, "scale": 30.0},  # radians, as PML holds it
        "SubCenterArcFaceLoss": {"margin": 0.3},
        "CosFaceLoss": {"margin": 0.1, "scale": 20.0},
        "NormalizedSoftmaxLoss": {"temperature": 0.2},
        "SphereFaceLoss": {"scale": 2.5},
    }
    for name, change in changes.items():
        ours, theirs = _pair(name)
        x, labels = _inputs(name)
        before = ours(x, labels).detach()
        for attribute, value in change.items():
            setattr(ours, attribute, value)
            setattr(theirs, attribute, value)
            after = ours(x, labels).detach()
            assert not torch.equal(after, before), f"{name}.{attribute} changed nothing"
            _assert_same(ours, theirs, x, labels, f"{name}.{attribute} = {value}")
            before = after
    # PML computes the multiple-angle coefficients in init_margin(): after it, both agree
    ours, theirs = _pair("LargeMarginSoftmaxLoss")
    x, labels = _inputs("LargeMarginSoftmaxLoss")
    for module in (ours, theirs):
        module.margin = 2
        module.init_margin()
    _assert_same(ours, theirs, x, labels, "LargeMarginSoftmaxLoss.margin = 2")


def test_bad_margin_attribute_raises_at_the_next_call():
    loss = pml.ArcFaceLoss(num_classes=3, embedding_size=4)
    loss.margin = 3.5
    with pytest.raises(ValueError, match=r"ArcFaceLoss \(margin=3.5, scale=64\): margin must lie in \[0, 3.14"):
        loss(torch.randn(2, 4), torch.tensor([0, 1]))
    loss = pml.NormalizedSoftmaxLoss(num_classes=3, embedding_size=4)
    loss.temperature = -1.0
    with pytest.raises(ValueError, match=r"temperature=-1.0\): temperature must be positive"):
        loss(torch.randn(2, 4), torch.tensor([0, 1]))


# ---- what runs PML's own computation -------------------------------------------------


def test_unfusable_configurations_fall_back_with_one_warning():
    cases = {
        "CosFaceLoss": {"distance": distances.CosineSimilarity(power=2)},
        "NormalizedSoftmaxLoss": {"distance": distances.LpDistance()},
        "ArcFaceLoss": {},
    }
    for name, extra in cases.items():
        ours, theirs = _pair(name, **extra)
        if name == "ArcFaceLoss":
            weights = torch.rand(NUM_CLASSES, dtype=torch.float64)
            for module in (ours, theirs):
                module.cross_entropy = torch.nn.CrossEntropyLoss(weight=weights, reduction="none")
        x, labels = _inputs(name)
        with pytest.warns(UserWarning, match="pytorch-metric-learning's own code") as record:
            _assert_same(ours, theirs, x, labels, f"{name} fallback")
            _assert_same(ours, theirs, x, labels, f"{name} fallback, again")
        assert len([w for w in record if "own code" in str(w.message)]) == 1, name


def test_label_smoothing_cross_entropy_stays_fused():
    ours, theirs = _pair("SubCenterArcFaceLoss")
    for module in (ours, theirs):
        module.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)
    assert ours.unfused_reason() is None
    x, labels = _inputs("SubCenterArcFaceLoss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(ours, theirs, x, labels, "label smoothing")


def test_optimizer_in_the_backward_refuses_what_it_cannot_update():
    ours, _ = _pair("ArcFaceLoss", weight_regularizer=regularizers.RegularFaceRegularizer())
    apply_optimizer_in_backward(torch.optim.SGD, [ours.W], {"lr": 0.1})
    x, labels = _inputs("ArcFaceLoss")
    with pytest.raises(ValueError, match="weight_regularizer=.* outside the fused operation"):
        ours(x, labels)
    ours, _ = _pair("CosFaceLoss", distance=distances.CosineSimilarity(power=2))
    apply_optimizer_in_backward(torch.optim.SGD, [ours.W], {"lr": 0.1})
    with pytest.raises(ValueError, match="power=2.*optimizer in the backward"):
        ours(x, labels)


# ---- arguments ------------------------------------------------------------------------


def test_no_labels_raises_pmls_value_error():
    loss = pml.ArcFaceLoss(num_classes=3, embedding_size=4)
    emb = torch.randn(6, 4)
    pairs = miners.MultiSimilarityMiner()(emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="labels are required"):
        loss(emb, indices_tuple=pairs)


def test_arguments_are_checked_in_the_constructor():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'nope'"):
        pml.CosFaceLoss(num_classes=3, embedding_size=4, backend="nope")
    with pytest.raises(TypeError, match="num_classes must be an integer, got 3.0"):
        pml.CosFaceLoss(num_classes=3.0, embedding_size=4)
    with pytest.raises(ValueError, match="sub_centers must be a positive integer, got 0"):
        pml.SubCenterArcFaceLoss(num_classes=3, embedding_size=4, sub_centers=0)
    with pytest.raises(TypeError, match="margin must be an integer, got 4.5"):
        pml.LargeMarginSoftmaxLoss(num_classes=3, embedding_size=4, margin=4.5)
    with pytest.raises(TypeError, match="margin must be a real number, got True"):
        pml.CosFaceLoss(num_classes=3, embedding_size=4, margin=True)
    with pytest.raises(ValueError, match=r"margin must lie in \[0, 180\), got 200"):
        pml.ArcFaceLoss(num_classes=3, embedding_size=4, margin=200)
    with pytest.raises(ValueError, match="temperature must be positive"):
        pml.NormalizedSoftmaxLoss(num_classes=3, embedding_size=4, temperature=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'margn'"):
        pml.CosFaceLoss(num_classes=3, embedding_size=4, margn=0.2)
    # numpy and 0-dim tensor scalars stand for their values
    loss = pml.SubCenterArcFaceLoss(num_classes=np.int64(3), embedding_size=torch.tensor(4), margin=np.float32(20.0),
                                    scale=torch.tensor(32.0), sub_centers=np.int32(2))
    assert loss.W.shape == (4, 6) and type(loss.num_classes) is int and loss.scale == 32.0
    loss = pml.CosFaceLoss(num_classes=3, embedding_size=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        loss(torch.randn(2, 4), torch.tensor([0, -100]))


def test_import_without_pytorch_metric_learning_names_the_package(monkeypatch):
    for module in [m for m in sys.modules if m.split(".")[0] == "pytorch_metric_learning"]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, "fused_margin.pml")
    with pytest.raises(ImportError, match=r"needs pytorch-metric-learning.*pip install pytorch-metric-learning"):
        importlib.import_module("fused_margin.pml")
    # monkeypatch puts the module (and its classes) back for the other tests
