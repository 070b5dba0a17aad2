"""CosFace / AM-Softmax (Wang et al. 2018): ``z_y = s * (c_y - m)``, ``z_j = s * c_j``."""

from __future__ import annotations

from .. import _checks
from ..spec import MarginSpec, NonTarget
from .base import SpecHead
from .combined import CosineMarginTarget

__all__ = ["CosFaceLoss", "cosface_spec"]


@MarginSpec.register_factory("cosface")
def cosface_spec(scale: float = 64.0, margin: float = 0.35, *, interclass_filtering_threshold: float = 0.0) -> MarginSpec:
    s = _checks.positive("scale", scale)
    return MarginSpec(
        s, CosineMarginTarget(s, m3=_checks.real("margin", margin)),
        NonTarget.interclass_filtering(interclass_filtering_threshold),
        name="cosface",
    )


class CosFaceLoss(SpecHead, factory=cosface_spec):
    """CosFace / AM-Softmax head."""
