"""Shared base of the multiplicative-angular heads (SphereFace, L-Softmax): the target
blends ``c_y`` and ``psi_m(theta_y)`` with a weight ``lambda`` annealed by the step
(:class:`MultiplicativeAngularTarget`), and the head keeps the schedule's parameters."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import _checks
from ..spec import TargetContext, lambda_schedule, psi_multiple_angle
from .base import SpecHead

__all__ = ["AnnealedAngularHead", "MultiplicativeAngularTarget"]


@dataclass(frozen=True)
class MultiplicativeAngularTarget:
    """SphereFace / L-Softmax: ``z_y = N * (lambda * c + psi_m(theta)) / (1 + lambda)``
    with ``N = ||x||`` (SphereFace) or ``||w_y|| * ||x||`` (L-Softmax)."""

    margin: int
    include_weight_norm: bool
    #: ``lambda(step) = max(lambda_min, lambda_base * (1 + gamma * step)^-power)``;
    #: gamma = 0 gives the constant ``max(lambda_min, lambda_base)``.
    lambda_base: float
    lambda_gamma: float = 0.0
    lambda_power: float = 1.0
    lambda_min: float = 0.0

    @classmethod
    def checked(
        cls, margin: int, include_weight_norm: bool, lam: float, gamma: float, power: float, lam_min: float
    ) -> MultiplicativeAngularTarget:
        """The target from a factory's arguments, checked: ``margin`` a positive integer,
        the schedule's parameters non-negative."""
        try:
            m = _checks.positive_integer("margin", margin)
        except (TypeError, ValueError):
            raise ValueError(f"margin must be a positive integer (the angle multiplier m), got {margin!r}") from None
        schedule = (_checks.non_negative(name, value)
                    for name, value in zip(("lam", "gamma", "power", "lam_min"), (lam, gamma, power, lam_min)))
        return cls(m, include_weight_norm, *schedule)

    def lambda_at(self, step: int | Tensor) -> float | Tensor:
        if isinstance(step, Tensor):  # a head's step buffer: stay on the device, no sync
            decay = (1.0 + self.lambda_gamma * step.double()) ** (-self.lambda_power)
            return (self.lambda_base * decay).clamp_min(self.lambda_min)
        return lambda_schedule(step, self.lambda_base, self.lambda_gamma, self.lambda_power, self.lambda_min)

    def __call__(self, ctx: TargetContext) -> Tensor:
        c = ctx.clamped_cos()
        magnitude = ctx.embedding_norm
        if self.include_weight_norm:
            magnitude = magnitude * ctx.weight_norm
        lam = self.lambda_at(ctx.step)
        if isinstance(lam, Tensor):
            lam = lam.to(c.dtype)
        blended = (lam * c + psi_multiple_angle(c, self.margin)) / (1.0 + lam)
        return magnitude * blended


#: the annealed heads' names of the factories' schedule arguments
_SCHEDULE_KEYWORDS = {"lam": "lambda_base", "gamma": "lambda_gamma", "power": "lambda_power", "lam_min": "lambda_min"}


class AnnealedAngularHead(SpecHead, renames=_SCHEDULE_KEYWORDS):
    """The base of SphereFace and L-Softmax: the factory's ``lam, gamma, power, lam_min``
    are the head's ``lambda_base, lambda_gamma, lambda_power, lambda_min``."""

    def __init__(self, num_classes: int, embedding_size: int, **keywords) -> None:
        super().__init__(num_classes, embedding_size, **keywords)
        self.margin = int(self.margin)

    @property
    def lam(self) -> float:
        """The current ``lambda = max(lambda_min, base * (1 + gamma * step)^-power)``."""
        return lambda_schedule(int(self.step), self.lambda_base, self.lambda_gamma, self.lambda_power, self.lambda_min)
