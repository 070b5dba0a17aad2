"""NormFace (Wang et al. 2017): ``z_j = s * c_j`` for every class."""

from __future__ import annotations

from .. import _checks
from ..spec import MarginSpec, NonTarget
from .base import SpecHead
from .softmax import LinearTarget

__all__ = ["NormFaceLoss", "normface_spec"]


@MarginSpec.register_factory("normface")
def normface_spec(scale: float = 30.0, *, interclass_filtering_threshold: float = 0.0) -> MarginSpec:
    s = _checks.positive("scale", scale)
    return MarginSpec(s, LinearTarget(s), NonTarget.interclass_filtering(interclass_filtering_threshold), name="normface")


class NormFaceLoss(SpecHead, factory=normface_spec):
    """NormFace head."""
