"""SphereFace / A-Softmax (Liu et al. 2017):
``z_y = ||x|| * (lambda * c_y + psi_m(theta_y)) / (1 + lambda)``, ``z_j = ||x|| * c_j``,
weights normalized, embeddings not; ``lambda`` annealed as in the authors' code."""

from __future__ import annotations

from ..spec import MarginSpec
from ._annealed import AnnealedAngularHead, MultiplicativeAngularTarget

__all__ = ["SphereFaceLoss", "sphereface_spec"]


@MarginSpec.register_factory("sphereface")
def sphereface_spec(
    margin: int = 4, lam: float = 5.0, *, gamma: float = 0.0, power: float = 1.0, lam_min: float = 0.0
) -> MarginSpec:
    """``lam`` is the constant lambda, or with ``gamma > 0`` the base of the annealing
    ``max(lam_min, lam * (1 + gamma * step)^-power)`` (the step comes from the head)."""
    target = MultiplicativeAngularTarget.checked(margin, False, lam, gamma, power, lam_min)
    return MarginSpec(1.0, target, normalize_embeddings=False, normalize_weight=True, name="sphereface")


class SphereFaceLoss(
    AnnealedAngularHead, factory=sphereface_spec, lambda_base=1000.0, lambda_gamma=0.12, lambda_power=1.0, lambda_min=5.0
):
    """The lambda schedule's defaults are the authors'; ``head.lam`` is the current lambda."""
