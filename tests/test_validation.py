"""Bad input gets a clear error naming the argument and the offending value."""

from __future__ import annotations

import pytest
import torch

import fused_margin as fm
from fused_margin import MarginSpec

SPEC = MarginSpec.cosface()


def _call(x=None, w=None, y=None, **kwargs):
    x = torch.randn(4, 3) if x is None else x
    w = torch.randn(5, 3) if w is None else w
    y = torch.tensor([0, 1, 4, 2]) if y is None else y
    return fm.margin_cross_entropy(x, w, y, SPEC, **kwargs)


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
