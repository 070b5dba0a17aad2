"""AdaFace (Kim et al. 2022): the margin adapts to the feature norm as a proxy of image
quality. With ``g = clip((||x|| - mu) / (sigma + eps) * h, -1, 1)`` (``mu, sigma`` EMAs
of the batch's norm statistics, momentum ``t_alpha``), the target logit is
``s * (cos(clip(theta_y - m*g, eps, pi - eps)) - (m + m*g))``; non-targets ``s * c_j``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import _checks
from ..ops import prepare_labels
from ..spec import MarginSpec, NonTarget, StraightThroughTarget, TargetContext, safe_acos
from .base import MarginHead, SpecHead

__all__ = ["AdaFaceLoss", "AdaptiveMarginTarget", "adaface_spec"]


@dataclass(frozen=True)
class AdaptiveMarginTarget:
    """AdaFace (Kim et al. 2022, eq. 11): with ``g = norm_scaler(||x||)`` in [-1, 1] (the
    head maps the detached feature norms through its batch statistics),
    ``z_y = s * (cos(clip(theta - m*g, eps, pi - eps)) - (m + m*g))``."""

    scale: float
    margin: float
    norm_scaler: Callable[[Tensor], Tensor] = field(compare=False)

    def __call__(self, ctx: TargetContext) -> Tensor:
        c = ctx.clamped_cos()
        g = self.norm_scaler(ctx.embedding_norm.detach()).to(c.dtype)
        # the authors clip theta to [eps, pi - eps] with eps = 1e-3
        theta = (safe_acos(c) - self.margin * g).clamp(1e-3, math.pi - 1e-3)
        return self.scale * (torch.cos(theta) - (self.margin + self.margin * g))


@MarginSpec.register_factory("adaface")
def adaface_spec(
    scale: float = 64.0,
    margin: float = 0.4,
    *,
    norm_scaler: Callable[[Tensor], Tensor],
    straight_through: bool = False,
    interclass_filtering_threshold: float = 0.0,
) -> MarginSpec:
    """``norm_scaler`` maps the detached feature norms (B,) to ``g`` in [-1, 1]
    (:meth:`AdaFaceLoss.norm_scaler`, from the head's running statistics)."""
    s = _checks.positive("scale", scale)
    m = _checks.in_range("margin", margin, 0.0, math.pi)
    if not callable(norm_scaler):
        raise TypeError(f"norm_scaler must be callable (feature norms -> g in [-1, 1]), got {norm_scaler!r}")
    target = AdaptiveMarginTarget(s, m, norm_scaler)
    if _checks.flag("straight_through", straight_through):
        target = StraightThroughTarget(target, s)
    return MarginSpec(s, target, NonTarget.interclass_filtering(interclass_filtering_threshold), name="adaface")


class AdaFaceLoss(SpecHead, factory=adaface_spec, supplied=("norm_scaler",)):
    """AdaFace head: ``h`` scales the standardized feature norm, ``t_alpha`` is the
    momentum of the batch norm statistics (fp32 buffers, in ``state_dict()``)."""

    batch_mean: Tensor
    batch_std: Tensor

    _STATE_INIT = {**MarginHead._STATE_INIT, "batch_mean": 20.0, "batch_std": 100.0}

    def __init__(self, num_classes: int, embedding_size: int, *, h: float = 0.333, t_alpha: float = 0.01,
                 **keywords) -> None:
        h = _checks.positive("h", h)
        t_alpha = _checks.in_range("t_alpha", t_alpha, 0.0, 1.0, low_open=True, high_open=False)
        super().__init__(num_classes, embedding_size, **keywords)
        self.scale, self.margin, self.h, self.t_alpha = self._spec.scale, _checks.real("margin", self.margin), h, t_alpha
        device = self.weight.device
        # The authors' initial statistics.
        f32 = torch.float32  # running statistics stay fp32 whatever the weight's dtype
        self.register_buffer("batch_mean", torch.full((), self._STATE_INIT["batch_mean"], dtype=f32, device=device))
        self.register_buffer("batch_std", torch.full((), self._STATE_INIT["batch_std"], dtype=f32, device=device))

    def make_spec(self, **arguments) -> MarginSpec:
        # The target reads the statistics through this bound method, so the spec stays
        # one constant object (and follows the buffers across .to(device)).
        return self._factory(norm_scaler=self.norm_scaler, **arguments)

    def update_state(self, embeddings: Tensor, labels: Tensor) -> None:
        internal = prepare_labels(labels, self.num_classes, self.ignore_index)
        raw_norms = torch.linalg.vector_norm(embeddings.float(), dim=1)
        norms = raw_norms.clamp(0.001, 100.0)
        # Masked statistics (no boolean indexing: data-dependent shapes would break
        # torch.compile; selects, not products: an ignored row may hold NaN). A batch with
        # fewer than two labelled rows, or with a labelled row that is not finite (its norm,
        # before the clamp that would hide an inf), leaves them as they are (no warning:
        # compiled graphs stay whole).
        valid = internal >= 0
        count = valid.sum().float()
        mean = torch.where(valid, norms, 0.0).sum() / count.clamp_min(1.0)
        std = torch.sqrt(torch.where(valid, (norms - mean) ** 2, 0.0).sum() / (count - 1.0).clamp_min(1.0))
        finite = torch.where(valid, torch.isfinite(raw_norms), True).all()
        update = (count > 1) & finite & torch.isfinite(mean) & torch.isfinite(std)
        mean_ema = self.batch_mean + self.t_alpha * (mean - self.batch_mean)
        std_ema = self.batch_std + self.t_alpha * (std - self.batch_std)
        self.batch_mean.copy_(torch.where(update, mean_ema, self.batch_mean))
        self.batch_std.copy_(torch.where(update, std_ema, self.batch_std))

    def norm_scaler(self, norms: Tensor) -> Tensor:
        """``g = clip((||x|| - mu) / (sigma + eps) * h, -1, 1)`` for detached norms (B,)."""
        norms = norms.clamp(0.001, 100.0)
        mean, std = self.batch_mean.to(norms.dtype), self.batch_std.to(norms.dtype)
        return ((norms - mean) / (std + 1e-3) * self.h).clamp(-1.0, 1.0)
