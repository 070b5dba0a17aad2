"""SO-Softmax (Zhang et al., Pattern Recognition 131, 2022).

Reconstructed from the paper's abstract only: goal-centred quadratic transforms pull
the positive similarity toward 1 and the negatives toward 0,
``z_y = s * (m^2 - (1 - c_y)^2)`` and ``z_j = s * [c_j + m]_+ * (c_j - m)``, with exact
gradients (the Circle-loss form without its detached weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _checks
from ..spec import MarginSpec, NonTarget, NonTargetKind, TargetContext
from .base import SpecHead

__all__ = ["GoalOrientedTarget", "SOSoftmaxLoss", "so_softmax_spec"]


@dataclass(frozen=True)
class GoalOrientedTarget:
    """SO-Softmax's positive transform ``s * (m^2 - (1 - c)^2)`` (reconstructed from the
    abstract: the positive similarity is pulled toward 1). With ``detached=True`` it is
    the Circle loss proxy form ``s * [1 + m - c]_+ * (c - (1 - m))`` whose weight
    ``[1 + m - c]_+`` carries no gradient (Sun et al. 2020, eq. 4 with O_p = 1 + m)."""

    scale: float
    margin: float
    detached: bool = False

    def __call__(self, ctx: TargetContext) -> Tensor:
        c = ctx.cos
        m = self.margin
        if self.detached:
            return self.scale * torch.relu(1.0 + m - c).detach() * (c - (1.0 - m))
        return self.scale * (m * m - (1.0 - c) ** 2)


@MarginSpec.register_factory("so_softmax")
def so_softmax_spec(scale: float = 64.0, margin: float = 0.25) -> MarginSpec:
    s = _checks.positive("scale", scale)
    m = _checks.real("margin", margin)
    return MarginSpec(s, GoalOrientedTarget(s, m), NonTarget(NonTargetKind.QUADRATIC, margin=m), name="so_softmax")


class SOSoftmaxLoss(SpecHead, factory=so_softmax_spec):
    """SO-Softmax head."""
