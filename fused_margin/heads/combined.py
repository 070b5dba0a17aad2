"""InsightFace's combined margin: ``z_y = s * (cos(m1 * theta_y + m2) - m3)``.

With ``m1 == 1``, ``beyond_pi`` chooses the target logit where ``theta_y + m2 > pi``
(``'fallback'``, ``'easy_margin'`` or ``'none'``, as for ArcFace); otherwise the formula is
used as written (``theta`` from ``acos`` of the clamped cosine). ``straight_through=True``
gives the gradient of ``s * c_y`` (margin in the forward pass only); gradients are exact
otherwise. arcface_torch's own ``CombinedMarginLoss`` is a different computation (for
``m3 > 0`` it is CosFace with ``m3`` alone): :mod:`fused_margin.insightface` reproduces it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from .. import _checks
from ..spec import MarginSpec, NonTarget, TargetContext, safe_acos, sin_from_cos
from .base import SpecHead

__all__ = ["BeyondPi", "CombinedMarginLoss", "CosineMarginTarget", "combined_spec"]

#: what an additive angular margin does where ``theta + m > pi`` (:class:`CosineMarginTarget`)
BeyondPi = Literal["fallback", "easy_margin", "none"]

_BEYOND_PI = get_args(BeyondPi)


@dataclass(frozen=True)
class CosineMarginTarget:
    """``z_y = s * (cos(m1 * theta + m2) - m3)``, the InsightFace combined margin.

    With ``m1 = 1``, ``beyond_pi`` says what happens where ``theta + m2 > pi`` (where
    ``cos(theta + m2)`` would grow again as ``theta`` grows): ``'fallback'`` the monotonic
    ``c - m2 * sin m2`` (InsightFace's former ``th``/``mm``), ``'easy_margin'`` (then the
    margin applies only where ``c > 0``), ``'none'`` ``cos(theta + m2)`` as written, as
    InsightFace's arcface_torch computes it. ``easy_margin=True`` is
    ``beyond_pi='easy_margin'``. ``straight_through`` applies the margin in the forward
    pass only (the gradient is that of ``s * c``), as arcface_torch's ArcFace does.
    CosFace and CS-Softmax are ``m1 = 1, m2 = 0``.
    """

    scale: float
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    easy_margin: bool = False
    straight_through: bool = False
    beyond_pi: BeyondPi = "fallback"

    def __post_init__(self) -> None:
        if self.beyond_pi not in _BEYOND_PI:
            raise ValueError(f"beyond_pi must be one of {_BEYOND_PI}, got {self.beyond_pi!r}")
        if self.easy_margin and self.beyond_pi == "none":
            raise ValueError("easy_margin=True contradicts beyond_pi='none'")
        if self.easy_margin or self.beyond_pi == "easy_margin":
            object.__setattr__(self, "easy_margin", True)
            object.__setattr__(self, "beyond_pi", "easy_margin")

    def __call__(self, ctx: TargetContext) -> Tensor:
        c = ctx.clamped_cos() if (self.m1 != 1.0 or self.m2 != 0.0) else ctx.cos
        z = self.margin_cos(c)
        if self.straight_through:
            z = c + (z - c).detach()
        return self.scale * z

    def margin_cos(self, c: Tensor) -> Tensor:
        m1, m2, m3 = self.m1, self.m2, self.m3
        if m1 == 1.0 and m2 == 0.0:
            return c - m3
        if m1 == 1.0:
            # cos(theta + m) = c cos m - sin(theta) sin m, with no acos (exact gradient).
            sin_theta = sin_from_cos(c)
            arc = c * math.cos(m2) - sin_theta * math.sin(m2)
            if self.beyond_pi == "easy_margin":
                arc = torch.where(c > 0, arc, c)
            elif self.beyond_pi == "fallback":
                arc = torch.where(c > math.cos(math.pi - m2), arc, c - m2 * math.sin(m2))
            return arc - m3
        return torch.cos(m1 * safe_acos(c) + m2) - m3


@MarginSpec.register_factory("combined")
def combined_spec(
    scale: float = 64.0,
    margins: tuple[float, float, float] = (1.0, 0.3, 0.2),
    *,
    straight_through: bool = False,
    beyond_pi: BeyondPi = "fallback",
    interclass_filtering_threshold: float = 0.0,
) -> MarginSpec:
    """``z_y = s * (cos(m1 * theta + m2) - m3)``; ``beyond_pi`` applies when ``m1 = 1``
    (:class:`CosineMarginTarget`), ``straight_through`` gives the gradient of ``s * c``."""
    s = _checks.positive("scale", scale)
    if not isinstance(margins, (tuple, list)) or len(margins) != 3:
        raise ValueError(f"margins must be (m1, m2, m3), got {margins!r}")
    m1 = _checks.positive("margins[0] (m1)", margins[0])
    m2 = _checks.in_range("margins[1] (m2)", margins[1], 0.0, math.pi)
    m3 = _checks.real("margins[2] (m3)", margins[2])
    target = CosineMarginTarget(
        s, m1=m1, m2=m2, m3=m3, straight_through=_checks.flag("straight_through", straight_through), beyond_pi=beyond_pi
    )
    return MarginSpec(s, target, NonTarget.interclass_filtering(interclass_filtering_threshold), name="combined")


class CombinedMarginLoss(SpecHead, factory=combined_spec):
    """InsightFace's combined-margin head, ``margins=(m1, m2, m3)``."""
