"""CurricularFace (Huang et al. 2020): ArcFace target; a non-target ``c_j`` harder than
the target (``c_j > cos(theta_y + m)``) becomes ``c_j * (t + c_j)``, with ``t`` the
exponential moving average (momentum 0.01) of the batch's mean target cosine, updated
before the loss as in the authors' code."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..functional import detached_target_cos
from ..ops import prepare_labels
from ..spec import MarginSpec
from .base import MarginHead


class CurricularFaceLoss(MarginHead):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        momentum: float = 0.01,
        **kwargs,
    ) -> None:
        MarginSpec.curricularface(scale, margin)  # validates
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum!r}")
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale, self.margin, self.momentum = scale, margin, momentum
        self.t = 0.0

    def spec(self) -> MarginSpec:
        return MarginSpec.curricularface(self.scale, self.margin, self.t)

    def update_state(self, embeddings: Tensor, labels: Tensor) -> None:
        internal = prepare_labels(labels, self.num_classes, self.ignore_index)
        valid = internal >= 0
        if not bool(valid.any()):
            return
        cos = detached_target_cos(embeddings, self.weight, internal, self.spec(), None)
        mean_cos = float(cos[valid].mean())
        self.t = self.momentum * mean_cos + (1.0 - self.momentum) * self.t

    # t is a Python float (the kernel takes it as a scalar): it travels in state_dict()
    # as extra state. Reading the batch mean makes one host sync per training step.
    def get_extra_state(self) -> dict[str, Any]:
        return {"t": self.t}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.t = float(state["t"])
