"""ArcFace (Deng et al. 2019): ``z_y = s * cos(theta_y + m)``, ``z_j = s * c_j``.

Where ``theta_y + m > pi`` the target logit falls back to ``s * (c_y - m * sin m)``
(InsightFace's monotonic extension), or with ``easy_margin`` the margin applies only
where ``c_y > 0``. ``straight_through=True`` reproduces InsightFace's current
``ArcFace`` head: the margin in the forward pass, the gradient of ``s * c_y``.
"""

from __future__ import annotations

from ..spec import MarginSpec
from .base import MarginHead


class ArcFaceLoss(MarginHead):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
        straight_through: bool = False,
        **kwargs,
    ) -> None:
        self._spec = MarginSpec.arcface(
            scale, margin, easy_margin=easy_margin, straight_through=straight_through,
            num_subcenters=kwargs.get("num_subcenters", 1),
        )
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale, self.margin = scale, margin

    def spec(self) -> MarginSpec:
        return self._spec
