"""NormFace (Wang et al. 2017): ``z_j = s * c_j`` for every class."""

from __future__ import annotations

from ..spec import MarginSpec
from .base import MarginHead


class NormFaceLoss(MarginHead):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 30.0,
        interclass_filtering_threshold: float = 0.0,
        **kwargs,
    ) -> None:
        self._spec = MarginSpec.normface(scale, interclass_filtering_threshold=interclass_filtering_threshold)
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale = scale

    def spec(self) -> MarginSpec:
        return self._spec
