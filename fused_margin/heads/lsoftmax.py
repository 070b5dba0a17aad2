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


class LSoftmaxLoss(
    AnnealedAngularHead, factory=lsoftmax_spec, lambda_base=1000.0, lambda_gamma=2.5e-5, lambda_power=35.0, lambda_min=0.0
):
    """The lambda schedule's defaults are the authors'; ``head.lam`` is the current lambda."""
