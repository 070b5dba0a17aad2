"""CS-Softmax (Zhang et al., J. Computer Research and Development 59(4), 2022).

Reconstructed from the paper's abstract only: positive and negative similarities are
transformed separately, ``z_y = s * (c_y - m)`` and ``z_j = s * alpha * c_j``, where
``alpha`` (``weight_update_factor``) scales the negative similarities and so the updates
of the non-target class weights."""

from __future__ import annotations

from .. import _checks
from ..spec import MarginSpec, NonTarget, NonTargetKind
from .base import SpecHead
from .combined import CosineMarginTarget

__all__ = ["CSSoftmaxLoss", "cs_softmax_spec"]


@MarginSpec.register_factory("cs_softmax")
def cs_softmax_spec(scale: float = 30.0, margin: float = 0.35, weight_update_factor: float = 1.0) -> MarginSpec:
    s = _checks.positive("scale", scale)
    alpha = _checks.positive("weight_update_factor", weight_update_factor)
    return MarginSpec(
        s,
        CosineMarginTarget(s, m3=_checks.real("margin", margin)),
        NonTarget(NonTargetKind.AFFINE, alpha=alpha),
        name="cs_softmax",
    )


class CSSoftmaxLoss(SpecHead, factory=cs_softmax_spec):
    """CS-Softmax head (``weight_update_factor`` is ``alpha``)."""
