"""Bad input gets a clear error naming the argument and the offending value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fused_margin as fm
from fused_margin import MarginSpec

SPEC = MarginSpec.cosface()


def _call(x=None, w=None, y=None, spec=SPEC, **kwargs):
    x = torch.randn(4, 3) if x is None else x
    w = torch.randn(5, 3) if w is None else w
    y = torch.tensor([0, 1, 4, 2]) if y is None else y
    return fm.margin_cross_entropy(x, w, y, spec, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"y": torch.tensor([0, 1, 5, 2])}, ValueError, r"labels must lie in \[0, 5\).*got 5 at position 2"),
        ({"y": torch.tensor([0, -1, 4, 2])}, ValueError, r"got -1 at position 1"),
        ({"y": torch.tensor([0.0, 1.0, 4.0, 2.0])}, TypeError, r"labels must be an integer tensor.*float32"),
        ({"y": torch.tensor([0, 1, 4])}, ValueError, r"labels must have shape \(4,\).*got \(3\)"),
        ({"w": torch.randn(5, 4)}, ValueError, r"weight must have shape \(num_classes, 3\).*got \(5, 4\)"),
        ({"x": torch.randn(3)}, ValueError, r"embeddings must be a 2-D tensor.*got shape \(3\)"),
        ({"x": torch.randn(4, 3, 2)}, ValueError, r"embeddings must be a 2-D tensor.*got shape \(4, 3, 2\)"),
        ({"w": torch.randn(5)}, ValueError, r"weight must be a 2-D tensor.*got shape \(5\)"),
        ({"x": torch.randint(0, 3, (4, 3))}, TypeError, r"embeddings must be a floating-point tensor.*int64"),
        ({"w": torch.randn(5, 3, device="meta")}, ValueError, r"weight is on meta but embeddings is on cpu"),
        ({"reduction": "avg"}, ValueError, r"reduction must be .*'avg'"),
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must lie in \[0, 1\), got 1.5"),
        ({"backend": "tpu"}, ValueError, r"backend must be one of .*'tpu'"),
        ({"bias": torch.randn(4)}, ValueError, r"bias must have shape \(5,\), got \(4\)"),
        ({"class_index": torch.tensor([0, 1, 2, 3, 5])}, ValueError,
         r"class_index entries must lie in \[0, 5\).*got 5 at position 4"),
        ({"class_index": torch.tensor([4, -1, 2, 3, 0])}, ValueError, r"class_index.*got -1 at position 1"),
        ({"class_index": torch.tensor([0, 1, 2.0])}, ValueError, r"class_index must be a 1-D int64 tensor"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**kwargs)


def test_ignore_index_is_not_out_of_range():
    _call(y=torch.tensor([0, -100, 4, 2]))
    _call(y=torch.tensor([0, 7, 4, 2]), ignore_index=7)
    with pytest.raises(ValueError, match=r"got -100 at position 1"):
        _call(y=torch.tensor([0, -100, 4, 2]), ignore_index=-1)


@pytest.mark.parametrize(
    "factory, pattern",
    [
        (lambda: MarginSpec.cosface(scale=-1.0), r"scale must be positive, got -1.0"),
        (lambda: MarginSpec.arcface(scale=float("nan")), r"scale must be a finite number"),
        (lambda: MarginSpec.arcface(margin=4.0), r"margin must lie in \[0, 3.14159\), got 4.0"),
        (lambda: MarginSpec.sphereface(margin=2.5), r"margin must be a positive integer .* got 2.5"),
        (lambda: MarginSpec.lsoftmax(margin=0), r"margin must be a positive integer .* got 0"),
        (lambda: MarginSpec.cs_softmax(weight_update_factor=0.0), r"weight_update_factor must be positive, got 0.0"),
        (lambda: MarginSpec.combined(margins=(1.0, 0.3)), r"margins must be \(m1, m2, m3\)"),
        (lambda: fm.SphereFaceLoss(10, 4, margin=1.5), r"margin must be a positive integer"),
        (lambda: fm.CosFaceLoss(0, 4), r"num_classes must be a positive integer, got 0"),
        (lambda: fm.CosFaceLoss(10, 4, scale=0), r"scale must be positive, got 0"),
        (lambda: fm.ArcFaceLoss(10, 4, reduction="avg"), r"reduction must be"),
        (lambda: fm.SubCenterArcFaceLoss(10, 4, num_subcenters=0), r"num_subcenters must be a positive integer"),
        (lambda: fm.MagFaceLoss(10, 4, lower_norm=50, upper_norm=20), r"upper_norm \(20\) must exceed lower_norm \(50\)"),
        (lambda: fm.CurricularFaceLoss(10, 4, momentum=2.0), r"momentum must lie in \(0, 1\], got 2.0"),
    ],
)
def test_invalid_spec_parameters(factory, pattern):
    with pytest.raises(ValueError, match=pattern):
        factory()


def test_weight_rows_must_match_subcenters():
    spec = MarginSpec.arcface(num_subcenters=3)
    with pytest.raises(ValueError, match=r"weight has 10 rows, not a multiple of num_subcenters=3"):
        fm.margin_cross_entropy(torch.randn(2, 3), torch.randn(10, 3), torch.tensor([0, 1]), spec)


def test_module_labels_out_of_range():
    head = fm.ArcFaceLoss(10, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*got 10 at position 0"):
        head(torch.randn(2, 4), torch.tensor([10, 1]))


def test_explicit_unavailable_backend_raises_instead_of_falling_back():
    from fused_margin.backends import BackendUnavailableError, get_backend
    from fused_margin.kernel_params import KernelParams

    x, w = torch.randn(4, 3), torch.randn(5, 3)
    for name in fm.available_backends():
        if get_backend(name).not_supported_reasons(x, w, KernelParams.from_spec(SPEC)):
            with pytest.raises(BackendUnavailableError, match=name):
                _call(x=x, w=w, backend=name)


def test_inputs_are_not_modified():
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, -100, 4, 2])
    copies = [t.clone() for t in (x, w, y)]
    for backend in ("eager", "reference", "auto"):
        loss = fm.margin_cross_entropy(
            x.requires_grad_(), w.requires_grad_(), y, SPEC, backend=backend, label_smoothing=0.1
        )
        loss.backward()
        for t, c in zip((x, w, y), copies):
            assert torch.equal(t.detach(), c)


# ---- custom specs: the target and regularizer outputs are checked -----------------------


def _column_target(ctx):
    return ctx.cos[:, None] * 30.0


def _scalar_target(ctx):
    return ctx.cos.sum()


def _integer_target(ctx):
    return (ctx.cos * 30.0).long()


def _list_target(ctx):
    return [0.0] * ctx.cos.shape[0]


@pytest.mark.parametrize("target, error, pattern", [
    (_column_target, ValueError, r"target _column_target must return a tensor of shape \(4\).*got shape \(4, 1\)"),
    (_scalar_target, ValueError, r"target _scalar_target must return a tensor of shape \(4\).*got shape \(\)"),
    (_integer_target, TypeError, r"target _integer_target must return a floating-point tensor.*int64"),
    (_list_target, TypeError, r"target _list_target must return a torch.Tensor.*got list"),
])
@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_custom_target_output_is_checked(target, error, pattern, backend):
    with pytest.raises(error, match=pattern):
        _call(spec=MarginSpec(30.0, target), backend=backend)


def test_custom_regularizer_output_is_checked():
    spec = MarginSpec(30.0, lambda ctx: 30.0 * ctx.cos, regularizer=_column_target)
    with pytest.raises(ValueError, match=r"regularizer _column_target .*shape \(4\).*got shape \(4, 1\)"):
        _call(spec=spec)


# ---- double backward and torch.func through a fused backend -------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_double_backward_says_use_eager(backend):
    x = torch.randn(4, 3, requires_grad=True)
    loss = _call(x=x, backend=backend)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"double backward .*not supported by the fused backend '{backend}'.*"
                                           r"backend='eager' supports it"):
        grad.square().sum().backward()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_func_says_use_eager(backend):
    w, y = torch.randn(5, 3), torch.tensor([0, 1, 4, 2])
    with pytest.raises(RuntimeError, match=rf"torch.func transforms .*fused backend '{backend}'.*backend='eager'"):
        torch.func.grad(lambda x: _call(x=x, w=w, y=y, backend=backend))(torch.randn(4, 3))


def test_eager_backend_supports_double_backward_and_torch_func():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 4, 2])
    loss = _call(x=x, w=w, y=y, backend="eager")
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    grad.square().sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    via_func = torch.func.grad(lambda v: _call(x=v, w=w, y=y, backend="eager"))(x.detach())
    torch.testing.assert_close(via_func, grad.detach())


# ---- constructor arguments ---------------------------------------------------------------


@pytest.mark.parametrize("factory, error, pattern", [
    (lambda: fm.ArcFaceLoss(10, 4, ignore_index=1.5), TypeError, r"ignore_index must be an integer, got 1.5"),
    (lambda: fm.ArcFaceLoss(10, 4, ignore_index=True), TypeError, r"ignore_index must be an integer, got True"),
    (lambda: fm.ArcFaceLoss(10, 4, backend="tpu"), ValueError, r"backend must be one of .*'tpu'"),
    (lambda: fm.ArcFaceLoss(10, 4, label_smoothing=float("nan")), ValueError, r"label_smoothing must be a finite"),
    (lambda: fm.ArcFaceLoss(10.5, 4), ValueError, r"num_classes must be an integer, got 10.5"),
    (lambda: fm.MagFaceLoss(10, 4, regularizer_weight=float("nan")), ValueError,
     r"regularizer_weight must be a finite number, got nan"),
    (lambda: fm.MagFaceLoss(10, 4, regularizer_weight=-1.0), ValueError, r"regularizer_weight must be non-negative"),
    (lambda: fm.MagFaceLoss(10, 4, upper_margin=4.0), ValueError, r"upper_margin must lie in \(0, 3.14159\)"),
    (lambda: fm.AdaFaceLoss(10, 4, margin=float("inf")), ValueError, r"margin must be a finite number, got inf"),
    (lambda: fm.AdaFaceLoss(10, 4, margin=-0.1), ValueError, r"margin must lie in \[0, 3.14159\)"),
    (lambda: fm.AdaFaceLoss(10, 4, t_alpha=float("nan")), ValueError, r"t_alpha must be a finite number"),
    (lambda: fm.CurricularFaceLoss(10, 4, momentum=np.float64(2.0)), ValueError, r"momentum must lie in \(0, 1\]"),
    (lambda: fm.CosFaceLoss(10, 4, margin=float("nan")), ValueError, r"margin must be a finite number"),
    (lambda: fm.CosFaceLoss(10, 4, scale="30"), TypeError, r"scale must be a real number, got '30'"),
])
def test_constructor_arguments_are_validated(factory, error, pattern):
    with pytest.raises(error, match=pattern):
        factory()


def test_numpy_and_zero_dim_scalars_are_accepted():
    x, y = torch.randn(6, 4), torch.tensor([0, 3, -1, 9, 2, 5])
    plain = fm.CosFaceLoss(10, 4, scale=30.0, margin=0.2, ignore_index=-1, label_smoothing=0.1)
    exotic = fm.CosFaceLoss(np.int64(10), torch.tensor(4), scale=np.float32(30.0), margin=torch.tensor(0.2),
                            ignore_index=np.int64(-1), label_smoothing=np.float64(0.1))
    exotic.load_state_dict(plain.state_dict())
    torch.testing.assert_close(exotic(x, y), plain(x, y))
    w = torch.randn(10, 4)
    spec = MarginSpec.cosface(scale=np.float64(30.0), margin=torch.tensor(0.2, dtype=torch.float64))
    got = fm.margin_cross_entropy(x, w, y, spec, ignore_index=torch.tensor(-1), label_smoothing=np.float32(0.1))
    want = fm.margin_cross_entropy(x, w, y, MarginSpec.cosface(30.0, 0.2), ignore_index=-1, label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    assert isinstance(exotic.ignore_index, int) and isinstance(spec.scale, float)
    with pytest.raises(TypeError, match=r"ignore_index must be an integer, got 1.5"):
        fm.margin_cross_entropy(x, w, y, spec, ignore_index=1.5)


# ---- messages name the argument the user passed --------------------------------------------


def test_head_input_errors_name_the_users_argument():
    head = fm.ArcFaceLoss(10, 4)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"embeddings must have shape \(batch, embedding_size=4\), got \(2, 5\)"):
        head(torch.randn(2, 5), y)
    with pytest.raises(ValueError, match=r"embeddings .*embedding_size=4"):
        head.get_logits(torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"embeddings must be a torch.Tensor, got ndarray"):
        head(np.zeros((2, 4), dtype=np.float32), y)
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor, got list"):
        head(torch.randn(2, 4), [0, 1])
    with pytest.raises(TypeError, match=r"embeddings must be a torch.Tensor, got ndarray"):
        fm.margin_cross_entropy(np.zeros((2, 4)), torch.randn(10, 4), y, SPEC)


def test_empty_class_index_is_named():
    with pytest.raises(ValueError, match=r"class_index must name at least one class"):
        _call(class_index=torch.empty(0, dtype=torch.int64))


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), float("inf"), "0.1", True, np.float64(1.5),
                                   torch.tensor(1.0), None])
def test_label_smoothing_is_checked_alike_everywhere(value):
    """One rule for label_smoothing: the functional API and the heads raise the same
    error, naming the argument and the value."""
    errors = []
    for build in (lambda: _call(label_smoothing=value), lambda: fm.CosFaceLoss(5, 3, label_smoothing=value)):
        with pytest.raises((TypeError, ValueError), match=r"^label_smoothing must ") as info:
            build()
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    assert repr(value) in errors[0][1]


@pytest.mark.parametrize("value", ["avg", "MEAN", None, 0])
def test_reduction_is_checked_alike_everywhere(value):
    errors = []
    for build in (lambda: _call(reduction=value), lambda: fm.CosFaceLoss(5, 3, reduction=value)):
        with pytest.raises(ValueError, match=r"^reduction must be 'mean', 'sum' or 'none', got ") as info:
            build()
        errors.append(str(info.value))
    assert errors[0] == errors[1] == f"reduction must be 'mean', 'sum' or 'none', got {value!r}"
