"""The heads' spec factories: each head module registers its own on MarginSpec."""

from __future__ import annotations

import importlib

import pytest
import torch

import fused_margin as fm
from fused_margin import MarginSpec

FACTORIES = {
    "softmax": "softmax", "normface": "normface", "cosface": "cosface", "arcface": "arcface",
    "combined": "combined", "sphereface": "sphereface", "lsoftmax": "lsoftmax", "cs_softmax": "cs_softmax",
    "so_softmax": "so_softmax", "circle": "circle", "curricularface": "curricularface", "adaface": "adaface",
    "magface": "magface",
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_each_head_module_registers_its_factory(name):
    module = importlib.import_module(f"fused_margin.heads.{FACTORIES[name]}")
    function = getattr(module, f"{name}_spec")
    assert MarginSpec.factories()[name] is function
    assert getattr(MarginSpec, name) is function


def test_factory_names_are_not_reused():
    with pytest.raises(ValueError, match=r"MarginSpec.arcface is already registered .*arcface_spec"):
        MarginSpec.register_factory("arcface")(lambda: None)
    with pytest.raises(ValueError, match=r"MarginSpec.scale is an attribute of MarginSpec"):
        MarginSpec.register_factory("scale")(lambda: None)
    with pytest.raises(ValueError, match=r"public identifier, got '_hidden'"):
        MarginSpec.register_factory("_hidden")
    assert "scale" not in MarginSpec.factories() and MarginSpec.arcface.__name__ == "arcface_spec"


def test_adaface_and_magface_heads_use_their_factories():
    ada = fm.AdaFaceLoss(7, 5, scale=32.0, margin=0.3, straight_through=True, interclass_filtering_threshold=0.2)
    want = MarginSpec.adaface(32.0, 0.3, norm_scaler=ada.norm_scaler, straight_through=True,
                              interclass_filtering_threshold=0.2)
    assert ada.spec() == want and ada.spec().name == "adaface"
    mag = fm.MagFaceLoss(7, 5, scale=16.0, lower_norm=5.0, upper_norm=50.0, regularizer_weight=3.0)
    assert mag.spec() == MarginSpec.magface(16.0, 5.0, 50.0, regularizer_weight=3.0)


def test_adaface_factory_target_reads_its_norm_scaler():
    """The factory's target applies the g that norm_scaler returns: g = 0 is ArcFace-like
    cos(theta) - m, and the loss depends on g."""
    torch.manual_seed(0)
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 9, (6,))
    losses = []
    for g in (-0.7, 0.0, 0.5):
        spec = MarginSpec.adaface(10.0, 0.4, norm_scaler=lambda norms, g=g: torch.full_like(norms, g))
        losses.append(fm.margin_cross_entropy(x, w, y, spec, reduction="none", backend="eager"))
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    target = 10.0 * (cos.gather(1, y[:, None]).squeeze(1).clamp(-1, 1).acos().clamp(1e-3, 3.14059).cos() - 0.4)
    others = 10.0 * cos.scatter(1, y[:, None], float("-inf"))
    want = torch.logaddexp(target, others.logsumexp(1)) - target
    assert torch.allclose(losses[1], want, rtol=1e-12, atol=0)
    assert not torch.allclose(losses[0], losses[2])


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: MarginSpec.adaface(norm_scaler=3), TypeError, r"norm_scaler must be callable"),
    (lambda: MarginSpec.adaface(norm_scaler=abs, margin=4.0), ValueError, r"margin must lie in \[0, 3.14159\)"),
    (lambda: MarginSpec.magface(lower_norm=50, upper_norm=20), ValueError, r"upper_norm \(20\) must exceed"),
    (lambda: MarginSpec.magface(lower_margin=0.0), ValueError, r"lower_margin must lie in \(0, 3.14159\)"),
    (lambda: MarginSpec.magface(straight_through=1), ValueError, r"straight_through must be True or False"),
])
def test_adaface_and_magface_factories_check_arguments(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
