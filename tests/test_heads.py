"""The nn.Module heads: construction, state, inference, and the stateful heads' math."""

from __future__ import annotations

import inspect
import io
import math
import os

import pytest
import torch

import fused_margin as fm
from fused_margin.heads.adaface import AdaptiveMarginTarget
from fused_margin.spec import MarginSpec
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


#: the keywords every head takes after (num_classes, embedding_size), MarginHead's own
HEAD_KEYWORDS = ["num_subcenters", "bias", "reduction", "ignore_index", "label_smoothing", "return_accuracy",
                 "backend", "dtype", "device"]
#: heads whose spec holds state (AdaFace's statistics, CurricularFace's t) next to the factory's arguments
STATEFUL_SPECS = (fm.AdaFaceLoss, fm.CurricularFaceLoss)


@pytest.mark.parametrize("head_cls", ALL_HEADS, ids=lambda c: c.__name__)
def test_head_keywords_are_its_factorys(head_cls):
    """A head's margin keywords are its factory's (under the head's names, with the head's
    defaults): the signature lists them, then MarginHead's; passing each at the default the
    signature shows builds the same head as passing none."""
    assert issubclass(head_cls, fm.SpecHead)
    params = inspect.signature(head_cls).parameters
    assert list(params)[:2] == ["num_classes", "embedding_size"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[2:])
    assert [n for n in params if n in HEAD_KEYWORDS] == HEAD_KEYWORDS
    factory = inspect.signature(head_cls._factory).parameters
    margin = head_cls._margin_keywords
    assert {head_cls._factory_names[n] for n in margin} <= set(factory) and set(margin) <= set(params)
    # the defaults a head sets apart from its factory's: the authors' lambda schedules
    overridden = {
        "SubCenterArcFaceLoss": {"num_subcenters": 3},
        "SphereFaceLoss": {"lambda_base": 1000.0, "lambda_gamma": 0.12, "lambda_min": 5.0},
        "LSoftmaxLoss": {"lambda_base": 1000.0, "lambda_gamma": 2.5e-5, "lambda_power": 35.0},
    }.get(head_cls.__name__, {})
    for name in margin:
        want = overridden.get(name, factory[head_cls._factory_names[name]].default)
        assert params[name].default == want, (name, params[name].default, want)
    assert params["bias"].default is (head_cls is fm.SoftmaxLoss)
    explicit = {n: p.default for n, p in list(params.items())[2:] if n not in ("device",)}
    plain, spelled = head_cls(7, 3), head_cls(7, 3, **explicit)
    assert type(plain.spec()) is MarginSpec
    if head_cls not in STATEFUL_SPECS:
        assert spelled.spec() == plain.spec() == head_cls._factory(**plain.margin_arguments())
    assert repr(spelled) == repr(plain)
    for name in margin:
        if name not in HEAD_KEYWORDS:
            assert getattr(plain, name) == params[name].default, name


def test_head_keyword_errors_name_the_keyword():
    with pytest.raises(TypeError, match=r"ArcFaceLoss\(\) got an unexpected keyword argument 'margn'"):
        fm.ArcFaceLoss(10, 4, margn=0.3)
    # the factory arguments a head fills in itself are not the user's to pass
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'norm_scaler'"):
        fm.AdaFaceLoss(10, 4, norm_scaler=lambda n: n)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 't'"):
        fm.CurricularFaceLoss(10, 4, t=0.5)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'lam'"):  # the head calls it lambda_base
        fm.SphereFaceLoss(10, 4, lam=3.0)
    # checked before the weight is allocated: no 4 TB tensor is asked for
    with pytest.raises(ValueError, match=r"scale must be positive, got 0"):
        fm.CosFaceLoss(10**12, 1024, scale=0)


def _toy_spec(scale: float = 10.0, *, margin: float = 0.1) -> MarginSpec:
    return MarginSpec.cosface(scale, margin)


def test_user_head_from_a_factory():
    """A user's own factory makes a head in one class statement, with the built-in heads'
    keywords, checks and attributes."""

    class ToyLoss(fm.SpecHead, factory=_toy_spec, label_smoothing=0.1):
        pass

    assert list(inspect.signature(ToyLoss).parameters)[2:4] == ["scale", "margin"]
    assert inspect.signature(ToyLoss).parameters["label_smoothing"].default == 0.1
    head = ToyLoss(9, 5, margin=0.25, backend="cpu")
    assert (head.scale, head.margin, head.label_smoothing) == (10.0, 0.25, 0.1)
    twin = fm.CosFaceLoss(9, 5, scale=10.0, margin=0.25, label_smoothing=0.1, backend="cpu")
    twin.load_state_dict(head.state_dict())
    x, y = torch.randn(6, 5), torch.tensor([0, 8, 3, -100, 5, 5])
    torch.testing.assert_close(head(x, y), twin(x, y))
    with pytest.raises(ValueError, match=r"scale must be positive"):
        ToyLoss(9, 5, scale=-1.0)

    def required(*, scale: float) -> MarginSpec:
        return MarginSpec.normface(scale)

    class NeedsScale(fm.SpecHead, factory=required):
        pass

    with pytest.raises(TypeError, match=r"NeedsScale\(\) needs the keyword argument 'scale'"):
        NeedsScale(4, 2)
    assert NeedsScale(4, 2, scale=3.0).spec() == MarginSpec.normface(3.0)
    with pytest.raises(TypeError, match=r"\['nope'\] are not keywords of _toy_spec or MarginHead"):
        type("Bad", (fm.SpecHead,), {}, factory=_toy_spec, nope=1)
    with pytest.raises(TypeError, match=r"must take named arguments only"):
        type("Bad", (fm.SpecHead,), {}, factory=lambda **kw: _toy_spec(**kw))

    def shadowing(weight: float = 1.0, forward: float = 0.0) -> MarginSpec:
        return MarginSpec.normface(weight)

    with pytest.raises(TypeError, match=r"the keywords \['forward', 'weight'\] of shadowing would hide attributes"):
        type("Bad", (fm.SpecHead,), {}, factory=shadowing)
    renamed = type("Renamed", (fm.SpecHead,), {}, factory=shadowing,
                   renames={"weight": "weight_scale", "forward": "offset"})
    head = renamed(4, 2, weight_scale=3.0)
    assert head.weight.shape == (4, 2) and (head.weight_scale, head.offset) == (3.0, 0.0)
    assert head.spec() == MarginSpec.normface(3.0)


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


# a margin keyword of each head and a new value for it
MARGIN_CHANGES = {
    fm.NormFaceLoss: ("scale", 20.0),
    fm.CosFaceLoss: ("margin", 0.2),
    fm.ArcFaceLoss: ("margin", 0.3),
    fm.CombinedMarginLoss: ("margins", (1.0, 0.2, 0.1)),
    fm.SphereFaceLoss: ("margin", 3),
    fm.LSoftmaxLoss: ("lambda_base", 10.0),
    fm.CSSoftmaxLoss: ("weight_update_factor", 0.7),
    fm.SOSoftmaxLoss: ("margin", 0.3),
    fm.CircleLoss: ("scale", 100.0),
    fm.CurricularFaceLoss: ("margin", 0.3),
    fm.SubCenterArcFaceLoss: ("scale", 30.0),
    fm.AdaFaceLoss: ("margin", 0.3),
    fm.MagFaceLoss: ("upper_margin", 0.7),
}


@pytest.mark.parametrize("head_cls", sorted(MARGIN_CHANGES, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_margin_attribute_set_takes_effect(head_cls):
    """``head.margin = m`` (any margin keyword) applies at the next forward: the head then
    computes what a head built with that value computes, bitwise."""
    name, value = MARGIN_CHANGES[head_cls]
    head = head_cls(11, 6, dtype=torch.float64).eval()
    x, _, labels = make_inputs(9, 11, 6)
    x = 15.0 * x
    before = head(x, labels)
    setattr(head, name, value)
    assert getattr(head, name) == value
    fresh = head_cls(11, 6, dtype=torch.float64, **{name: value}).eval()
    fresh.load_state_dict(head.state_dict())
    after = head(x, labels)
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh(x, labels))
    assert head.spec() == fresh.spec() or head_cls in (fm.AdaFaceLoss, fm.CurricularFaceLoss)


def test_bad_margin_attribute_is_refused_and_the_old_value_kept():
    head = fm.ArcFaceLoss(5, 4)
    spec = head.spec()
    with pytest.raises(ValueError, match=r"ArcFaceLoss.margin = 4.0 is refused: margin must lie in \[0, 3.14"):
        head.margin = 4.0
    assert head.margin == 0.5 and head.spec() is spec
    with pytest.raises(ValueError, match=r"SphereFaceLoss.margin = 2.5 is refused: margin must be a positive integer"):
        fm.SphereFaceLoss(5, 4).margin = 2.5
    with pytest.raises(AttributeError, match="num_subcenters cannot change after construction"):
        fm.SubCenterArcFaceLoss(5, 4).num_subcenters = 2


def test_margin_schedule_under_torch_compile():
    """A margin warm-up and a scale change in a compiled step (fullgraph): each value
    is the one used, loss and gradient, as in eager mode (a changed float may recompile)."""
    torch._dynamo.reset()
    head = fm.ArcFaceLoss(11, 6, margin=0.0)
    x, _, labels = make_inputs(9, 11, 6, dtype=torch.float32)
    compiled = torch.compile(lambda x, y: head(x, y), backend="aot_eager", fullgraph=True)
    losses = set()
    for name, value in (("margin", 0.1), ("margin", 0.2), ("margin", 0.3), ("scale", 32.0)):
        setattr(head, name, value)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = compiled(xa, labels), head(xb, labels)
        got.backward(), want.backward()
        assert torch.equal(got, want) and torch.equal(xa.grad, xb.grad), f"{name} = {value}"
        losses.add(float(got))
    assert len(losses) == 4
