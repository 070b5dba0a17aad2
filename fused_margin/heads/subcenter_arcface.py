"""Sub-center ArcFace (Deng et al. 2020): K sub-centers per class, ArcFace on
``max_k c_{y,k}``, non-targets ``s * max_k c_{j,k}``. Weight rows ``j*K .. j*K+K-1``
belong to class ``j``."""

from __future__ import annotations

from .arcface import ArcFaceLoss

__all__ = ["SubCenterArcFaceLoss"]


class SubCenterArcFaceLoss(ArcFaceLoss, num_subcenters=3):
    """Sub-center ArcFace head: ArcFace with three sub-centers per class by default."""
