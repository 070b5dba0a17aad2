"""CS-Softmax (Zhang et al., J. Computer Research and Development 59(4), 2022).

Reconstructed from the paper's abstract only: positive and negative similarities are
transformed separately, ``z_y = s * (c_y - m)`` and ``z_j = s * alpha * c_j``, where
``alpha`` (``weight_update_factor``) scales the negative similarities and so the updates
of the non-target class weights."""

from __future__ import annotations

from ..spec import MarginSpec
from .base import MarginHead


class CSSoftmaxLoss(MarginHead):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 30.0,
        margin: float = 0.35,
        weight_update_factor: float = 1.0,
        **kwargs,
    ) -> None:
        self._spec = MarginSpec.cs_softmax(scale, margin, weight_update_factor)
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale, self.margin, self.weight_update_factor = scale, margin, weight_update_factor

    def spec(self) -> MarginSpec:
        return self._spec
