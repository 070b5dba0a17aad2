"""InsightFace's combined margin: ``z_y = s * (cos(m1 * theta_y + m2) - m3)``.

With ``m1 == 1``, ``beyond_pi`` chooses the target logit where ``theta_y + m2 > pi``
(``'fallback'``, ``'easy_margin'`` or ``'none'``, as for ArcFace); otherwise the formula is
used as written (``theta`` from ``acos`` of the clamped cosine). ``straight_through=True``
gives the gradient of ``s * c_y`` (margin in the forward pass only); gradients are exact
otherwise. arcface_torch's own ``CombinedMarginLoss`` is a different computation (for
``m3 > 0`` it is CosFace with ``m3`` alone): :mod:`fused_margin.insightface` reproduces it."""

from __future__ import annotations

from typing import Literal

from ..spec import MarginSpec
from .base import MarginHead


class CombinedMarginLoss(MarginHead):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 64.0,
        margins: tuple[float, float, float] = (1.0, 0.3, 0.2),
        straight_through: bool = False,
        beyond_pi: Literal["fallback", "easy_margin", "none"] = "fallback",
        interclass_filtering_threshold: float = 0.0,
        **kwargs,
    ) -> None:
        self._spec = MarginSpec.combined(
            scale, tuple(margins), straight_through=straight_through, beyond_pi=beyond_pi,
            interclass_filtering_threshold=interclass_filtering_threshold,
        )
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale, self.margins = scale, tuple(margins)

    def spec(self) -> MarginSpec:
        return self._spec
