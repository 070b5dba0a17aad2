"""SphereFace / A-Softmax (Liu et al. 2017):
``z_y = ||x|| * (lambda * c_y + psi_m(theta_y)) / (1 + lambda)``, ``z_j = ||x|| * c_j``,
weights normalized, embeddings not; ``lambda`` annealed as in the authors' code."""

from __future__ import annotations

from ..spec import MarginSpec
from ._annealed import AnnealedAngularHead


class SphereFaceLoss(AnnealedAngularHead):
    _factory = staticmethod(MarginSpec.sphereface)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        margin: int = 4,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
        **kwargs,
    ) -> None:
        super().__init__(
            num_classes, embedding_size, margin=margin, lambda_base=lambda_base, lambda_gamma=lambda_gamma,
            lambda_power=lambda_power, lambda_min=lambda_min, **kwargs,
        )
