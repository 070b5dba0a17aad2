"""SO-Softmax (Zhang et al., Pattern Recognition 131, 2022).

Reconstructed from the paper's abstract only: goal-centred quadratic transforms pull
the positive similarity toward 1 and the negatives toward 0,
``z_y = s * (m^2 - (1 - c_y)^2)`` and ``z_j = s * [c_j + m]_+ * (c_j - m)``, with exact
gradients (the Circle-loss form without its detached weights)."""

from __future__ import annotations

from ..spec import MarginSpec
from .base import MarginHead


class SOSoftmaxLoss(MarginHead):
    def __init__(
        self, num_classes: int, embedding_size: int, *, scale: float = 64.0, margin: float = 0.25, **kwargs
    ) -> None:
        self._spec = MarginSpec.so_softmax(scale, margin)
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale, self.margin = scale, margin

    def spec(self) -> MarginSpec:
        return self._spec
