"""L-Softmax (Liu et al. 2016):
``z_y = ||w_y|| ||x|| * (lambda * c_y + psi_m(theta_y)) / (1 + lambda)``,
``z_j = <x, w_j>``, nothing normalized; ``lambda`` annealed as in the authors' code."""

from __future__ import annotations

from ..spec import MarginSpec
from ._annealed import AnnealedAngularHead, MultiplicativeAngularTarget

__all__ = ["LSoftmaxLoss", "lsoftmax_spec"]


@MarginSpec.register_factory("lsoftmax")
def lsoftmax_spec(
    margin: int = 2, lam: float = 0.0, *, gamma: float = 0.0, power: float = 1.0, lam_min: float = 0.0
) -> MarginSpec:
    """As :func:`~fused_margin.heads.sphereface.sphereface_spec`, for L-Softmax (nothing
    normalized)."""
    target = MultiplicativeAngularTarget.checked(margin, True, lam, gamma, power, lam_min)
    return MarginSpec(1.0, target, normalize_embeddings=False, normalize_weight=False, name="lsoftmax")


class LSoftmaxLoss(AnnealedAngularHead):
    _factory = staticmethod(lsoftmax_spec)

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
