"""MagFace (Meng et al. 2021): ArcFace whose margin grows linearly with the clamped
feature norm ``a = clamp(||x||, l_a, u_a)``, ``m(a) = l_m + (u_m - l_m)(a - l_a)/(u_a - l_a)``,
plus the regularizer ``lambda_g * (a / u_a^2 + 1 / a)`` added to every row's loss."""

from __future__ import annotations

import math

from .. import _checks
from ..spec import MagFaceRegularizer, MagnitudeAwareTarget, MarginSpec, NonTarget, StraightThroughTarget
from .base import MarginHead


class MagFaceLoss(MarginHead):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 64.0,
        lower_norm: float = 10.0,
        upper_norm: float = 110.0,
        lower_margin: float = 0.45,
        upper_margin: float = 0.8,
        regularizer_weight: float = 35.0,
        interclass_filtering_threshold: float = 0.0,
        straight_through: bool = False,
        **kwargs,
    ) -> None:
        if _checks.positive("upper_norm", upper_norm) <= _checks.positive("lower_norm", lower_norm):
            raise ValueError(f"upper_norm ({upper_norm!r}) must exceed lower_norm ({lower_norm!r})")
        scale, lower_norm, upper_norm = _checks.positive("scale", scale), float(lower_norm), float(upper_norm)
        # margins are angles: (0, pi)
        lower_margin = _checks.in_range("lower_margin", lower_margin, 0.0, math.pi, low_open=True)
        upper_margin = _checks.in_range("upper_margin", upper_margin, 0.0, math.pi, low_open=True)
        regularizer_weight = _checks.non_negative("regularizer_weight", regularizer_weight)
        super().__init__(num_classes, embedding_size, **kwargs)
        target = MagnitudeAwareTarget(scale, lower_norm, upper_norm, lower_margin, upper_margin)
        if _checks.flag("straight_through", straight_through):
            target = StraightThroughTarget(target, scale)
        reg = MagFaceRegularizer(regularizer_weight, lower_norm, upper_norm)
        self._spec = MarginSpec(
            scale, target, NonTarget.interclass_filtering(interclass_filtering_threshold), regularizer=reg, name="magface"
        )

    def spec(self) -> MarginSpec:
        return self._spec
