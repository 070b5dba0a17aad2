"""L-Softmax (Liu et al. 2016):
``z_y = ||w_y|| ||x|| * (lambda * c_y + psi_m(theta_y)) / (1 + lambda)``,
``z_j = <x, w_j>``, nothing normalized; ``lambda`` annealed as in the authors' code."""

from __future__ import annotations

from ..spec import MarginSpec
from ._annealed import AnnealedAngularHead


class LSoftmaxLoss(AnnealedAngularHead):
    _factory = staticmethod(MarginSpec.lsoftmax)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        margin: int = 2,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 2.5e-5,
        lambda_power: float = 35.0,
        lambda_min: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(
            num_classes, embedding_size, margin=margin, lambda_base=lambda_base, lambda_gamma=lambda_gamma,
            lambda_power=lambda_power, lambda_min=lambda_min, **kwargs,
        )
