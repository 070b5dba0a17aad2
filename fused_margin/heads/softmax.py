"""Softmax (linear) head: ``z_j = <x, w_j> + b_j``."""

from __future__ import annotations

from ..spec import MarginSpec
from .base import MarginHead


class SoftmaxLoss(MarginHead):
    """Plain linear softmax cross-entropy (a fused ``nn.Linear`` + ``cross_entropy``)."""

    def __init__(self, num_classes: int, embedding_size: int, *, bias: bool = True, **kwargs) -> None:
        super().__init__(num_classes, embedding_size, bias=bias, **kwargs)
        self._spec = MarginSpec.softmax()

    def spec(self) -> MarginSpec:
        return self._spec
