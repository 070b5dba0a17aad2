"""Sub-center ArcFace (Deng et al. 2020): K sub-centers per class, ArcFace on
``max_k c_{y,k}``, non-targets ``s * max_k c_{j,k}``. Weight rows ``j*K .. j*K+K-1``
belong to class ``j``."""

from __future__ import annotations

from .arcface import ArcFaceLoss


class SubCenterArcFaceLoss(ArcFaceLoss):
    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        num_subcenters: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(
            num_classes, embedding_size, scale=scale, margin=margin, num_subcenters=num_subcenters, **kwargs
        )
