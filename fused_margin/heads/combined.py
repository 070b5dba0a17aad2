"""InsightFace's combined margin: ``z_y = s * (cos(m1 * theta_y + m2) - m3)``.

With ``m1 == 1`` the ArcFace fallback applies where ``theta_y + m2 > pi``; otherwise the
formula is used as written (``theta`` from ``acos`` of the clamped cosine)."""

from __future__ import annotations

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
        **kwargs,
    ) -> None:
        self._spec = MarginSpec.combined(scale, tuple(margins))
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale, self.margins = scale, tuple(margins)

    def spec(self) -> MarginSpec:
        return self._spec
