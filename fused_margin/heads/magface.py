"""MagFace (Meng et al. 2021): ArcFace whose margin grows linearly with the clamped
feature norm ``a = clamp(||x||, l_a, u_a)``, ``m(a) = l_m + (u_m - l_m)(a - l_a)/(u_a - l_a)``,
plus the regularizer ``lambda_g * (a / u_a^2 + 1 / a)`` added to every row's loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _checks
from ..spec import MarginSpec, NonTarget, StraightThroughTarget, TargetContext, sin_from_cos
from .base import SpecHead

__all__ = ["MagFaceLoss", "MagFaceRegularizer", "MagnitudeAwareTarget", "magface_spec"]


@dataclass(frozen=True)
class MagnitudeAwareTarget:
    """MagFace (Meng et al. 2021): ArcFace with margin ``m(a)`` growing linearly in the
    clamped feature norm ``a = clamp(||x||, l_a, u_a)``, with the ArcFace fallback."""

    scale: float
    lower_norm: float
    upper_norm: float
    lower_margin: float
    upper_margin: float

    def margin_of(self, ctx: TargetContext) -> Tensor:
        a = ctx.embedding_norm.clamp(self.lower_norm, self.upper_norm)
        slope = (self.upper_margin - self.lower_margin) / (self.upper_norm - self.lower_norm)
        return slope * (a - self.lower_norm) + self.lower_margin

    def __call__(self, ctx: TargetContext) -> Tensor:
        c = ctx.clamped_cos()
        m = self.margin_of(ctx)
        sin_theta = sin_from_cos(c)
        arc = c * torch.cos(m) - sin_theta * torch.sin(m)
        fallback = c - m * torch.sin(m)
        return self.scale * torch.where(c > torch.cos(math.pi - m), arc, fallback)


@dataclass(frozen=True)
class MagFaceRegularizer:
    """MagFace's ``lambda_g * g(a)`` with ``g(a) = a / u_a^2 + 1 / a``."""

    weight: float
    lower_norm: float
    upper_norm: float

    def __call__(self, ctx: TargetContext) -> Tensor:
        a = ctx.embedding_norm.clamp(self.lower_norm, self.upper_norm)
        return self.weight * (a / self.upper_norm**2 + 1.0 / a)


@MarginSpec.register_factory("magface")
def magface_spec(
    scale: float = 64.0,
    lower_norm: float = 10.0,
    upper_norm: float = 110.0,
    lower_margin: float = 0.45,
    upper_margin: float = 0.8,
    regularizer_weight: float = 35.0,
    *,
    interclass_filtering_threshold: float = 0.0,
    straight_through: bool = False,
) -> MarginSpec:
    """Norms ``l_a < u_a`` positive, margins angles in (0, pi), ``lambda_g >= 0``."""
    upper, lower = _checks.positive("upper_norm", upper_norm), _checks.positive("lower_norm", lower_norm)
    if upper <= lower:
        raise ValueError(f"upper_norm ({upper_norm!r}) must exceed lower_norm ({lower_norm!r})")
    s = _checks.positive("scale", scale)
    # margins are angles: (0, pi)
    lower_m = _checks.in_range("lower_margin", lower_margin, 0.0, math.pi, low_open=True)
    upper_m = _checks.in_range("upper_margin", upper_margin, 0.0, math.pi, low_open=True)
    weight = _checks.non_negative("regularizer_weight", regularizer_weight)
    target = MagnitudeAwareTarget(s, lower, upper, lower_m, upper_m)
    if _checks.flag("straight_through", straight_through):
        target = StraightThroughTarget(target, s)
    reg = MagFaceRegularizer(weight, lower, upper)
    return MarginSpec(
        s, target, NonTarget.interclass_filtering(interclass_filtering_threshold), regularizer=reg, name="magface"
    )


class MagFaceLoss(SpecHead, factory=magface_spec):
    """MagFace head."""
