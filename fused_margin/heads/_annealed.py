"""Shared base of the multiplicative-angular heads (SphereFace, L-Softmax): the target
blends ``c_y`` and ``psi_m(theta_y)`` with a weight ``lambda`` annealed by the step."""

from __future__ import annotations

from ..spec import MarginSpec, lambda_schedule
from .base import MarginHead


class AnnealedAngularHead(MarginHead):
    _factory = staticmethod(MarginSpec.sphereface)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        margin: int,
        lambda_base: float,
        lambda_gamma: float,
        lambda_power: float,
        lambda_min: float,
        **kwargs,
    ) -> None:
        # validates margin and the schedule before allocating the weight
        self._spec = self._factory(
            margin, lambda_base, gamma=lambda_gamma, power=lambda_power, lam_min=lambda_min
        )
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin = int(margin)
        self.lambda_base, self.lambda_gamma = lambda_base, lambda_gamma
        self.lambda_power, self.lambda_min = lambda_power, lambda_min

    @property
    def lam(self) -> float:
        """The current ``lambda = max(lambda_min, base * (1 + gamma * step)^-power)``."""
        return lambda_schedule(int(self.step), self.lambda_base, self.lambda_gamma, self.lambda_power, self.lambda_min)

    def spec(self) -> MarginSpec:
        # constant: lambda is computed from the step buffer inside the target transform
        return self._spec
