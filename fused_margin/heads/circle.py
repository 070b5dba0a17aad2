"""Circle loss, proxy (class-weight) form (Sun et al. 2020, eq. 4):
``z_y = s * [1 + m - c_y]_+ * (c_y - 1 + m)`` and ``z_j = s * [c_j + m]_+ * (c_j - m)``
with the weights ``[.]_+`` detached from the gradient, as in the paper."""

from __future__ import annotations

from .. import _checks
from ..spec import MarginSpec, NonTarget, NonTargetKind
from .base import SpecHead
from .so_softmax import GoalOrientedTarget

__all__ = ["CircleLoss", "circle_spec"]


@MarginSpec.register_factory("circle")
def circle_spec(scale: float = 256.0, margin: float = 0.25) -> MarginSpec:
    s = _checks.positive("scale", scale)
    m = _checks.real("margin", margin)
    return MarginSpec(
        s,
        GoalOrientedTarget(s, m, detached=True),
        NonTarget(NonTargetKind.QUADRATIC_DETACHED, margin=m),
        name="circle",
    )


class CircleLoss(SpecHead, factory=circle_spec):
    """Circle loss head (proxy form)."""
