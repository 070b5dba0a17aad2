"""ArcFace (Deng et al. 2019): ``z_y = s * cos(theta_y + m)``, ``z_j = s * c_j``.

``beyond_pi`` chooses the target logit where ``theta_y + m > pi``: ``'fallback'``
(default) ``s * (c_y - m * sin m)`` (InsightFace's former monotonic extension),
``'easy_margin'`` (the margin applies only where ``c_y > 0``; also ``easy_margin=True``),
or ``'none'``: ``s * cos(theta_y + m)`` everywhere, as arcface_torch computes it.
``straight_through=True`` puts the margin in the forward pass only (the gradient of
``s * c_y``); with ``beyond_pi='none'`` that is arcface_torch's ``ArcFace`` exactly.
``interclass_filtering_threshold > 0``: non-target cosines above it count as 0, with no
gradient (arcface_torch's option of that name).
"""

from __future__ import annotations

from typing import Literal

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
        beyond_pi: Literal["fallback", "easy_margin", "none"] = "fallback",
        interclass_filtering_threshold: float = 0.0,
        **kwargs,
    ) -> None:
        self._spec = MarginSpec.arcface(
            scale, margin, easy_margin=easy_margin, straight_through=straight_through,
            num_subcenters=kwargs.get("num_subcenters", 1), beyond_pi=beyond_pi,
            interclass_filtering_threshold=interclass_filtering_threshold,
        )
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale, self.margin = scale, margin

    def spec(self) -> MarginSpec:
        return self._spec
