"""CosFace / AM-Softmax (Wang et al. 2018): ``z_y = s * (c_y - m)``, ``z_j = s * c_j``."""

from __future__ import annotations

from ..spec import MarginSpec
from .base import MarginHead


class CosFaceLoss(MarginHead):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 64.0,
        margin: float = 0.35,
        interclass_filtering_threshold: float = 0.0,
        **kwargs,
    ) -> None:
        self._spec = MarginSpec.cosface(scale, margin, interclass_filtering_threshold=interclass_filtering_threshold)
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale, self.margin = scale, margin

    def spec(self) -> MarginSpec:
        return self._spec
