"""ArcFace (Deng et al. 2019): ``z_y = s * cos(theta_y + m)``, ``z_j = s * c_j``.

``beyond_pi`` chooses the target logit where ``theta_y + m > pi``: ``'fallback'``
(default) ``s * (c_y - m * sin m)`` (InsightFace's former monotonic extension),
``'easy_margin'`` (the margin applies only where ``c_y > 0``; also ``easy_margin=True``),
or ``'none'``: ``s * cos(theta_y + m)`` everywhere, as arcface_torch computes it.
``straight_through=True`` puts the margin in the forward pass only (the gradient of
``s * c_y``); with ``beyond_pi='none'`` that is arcface_torch's ``ArcFace`` exactly.
``interclass_filtering_threshold > 0``: non-target cosines above it count as 0, with no
gradient (arcface_torch's option of that name).
"""

from __future__ import annotations

import math

from .. import _checks
from ..spec import MarginSpec, NonTarget
from .base import SpecHead
from .combined import BeyondPi, CosineMarginTarget

__all__ = ["ArcFaceLoss", "arcface_spec"]


@MarginSpec.register_factory("arcface")
def arcface_spec(
    scale: float = 64.0,
    margin: float = 0.5,
    *,
    easy_margin: bool = False,
    straight_through: bool = False,
    num_subcenters: int = 1,
    beyond_pi: BeyondPi = "fallback",
    interclass_filtering_threshold: float = 0.0,
) -> MarginSpec:
    """``beyond_pi``: the target logit where ``theta + m > pi`` (see
    :class:`~fused_margin.heads.combined.CosineMarginTarget`); ``interclass_filtering_threshold``
    > 0: non-target cosines above it count as 0 (:meth:`NonTarget.filtered`; 0 turns it off)."""
    s = _checks.positive("scale", scale)
    target = CosineMarginTarget(
        s,
        m2=_checks.in_range("margin", margin, 0.0, math.pi),
        easy_margin=easy_margin,
        straight_through=_checks.flag("straight_through", straight_through),
        beyond_pi=beyond_pi,
    )
    name = "arcface" if num_subcenters == 1 else "subcenter_arcface"
    return MarginSpec(
        s, target, NonTarget.interclass_filtering(interclass_filtering_threshold), num_subcenters=num_subcenters,
        name=name,
    )


class ArcFaceLoss(SpecHead, factory=arcface_spec):
    """ArcFace head (with ``num_subcenters > 1``, sub-center ArcFace)."""
