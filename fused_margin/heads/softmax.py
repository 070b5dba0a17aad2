"""Softmax (linear) head: ``z_j = <x, w_j> + b_j``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..spec import MarginSpec, TargetContext
from .base import SpecHead

__all__ = ["LinearTarget", "SoftmaxLoss", "softmax_spec"]


@dataclass(frozen=True)
class LinearTarget:
    """``z_y = s * u_y``: Softmax (s = 1) and NormFace."""

    scale: float

    def __call__(self, ctx: TargetContext) -> Tensor:
        return self.scale * ctx.u


@MarginSpec.register_factory("softmax")
def softmax_spec() -> MarginSpec:
    return MarginSpec(1.0, LinearTarget(1.0), normalize_embeddings=False, normalize_weight=False, name="softmax")


class SoftmaxLoss(SpecHead, factory=softmax_spec, bias=True):
    """Plain linear softmax cross-entropy (a fused ``nn.Linear`` + ``cross_entropy``)."""
