"""AdaFace (Kim et al. 2022): the margin adapts to the feature norm as a proxy of image
quality. With ``g = clip((||x|| - mu) / (sigma + eps) * h, -1, 1)`` (``mu, sigma`` EMAs
of the batch's norm statistics, momentum ``t_alpha``), the target logit is
``s * (cos(clip(theta_y - m*g, eps, pi - eps)) - (m + m*g))``; non-targets ``s * c_j``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import prepare_labels
from ..spec import AdaptiveMarginTarget, MarginSpec, StraightThroughTarget, _filtering, _finite, _flag, _positive
from .base import MarginHead


class AdaFaceLoss(MarginHead):
    batch_mean: Tensor
    batch_std: Tensor

    _STATE_INIT = {**MarginHead._STATE_INIT, "batch_mean": 20.0, "batch_std": 100.0}

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        interclass_filtering_threshold: float = 0.0,
        straight_through: bool = False,
        **kwargs,
    ) -> None:
        _positive("scale", scale)
        _finite("margin", margin)
        _positive("h", h)
        if not 0.0 < t_alpha <= 1.0:
            raise ValueError(f"t_alpha must lie in (0, 1], got {t_alpha!r}")
        super().__init__(num_classes, embedding_size, **kwargs)
        self.scale, self.margin, self.h, self.t_alpha = scale, margin, h, t_alpha
        device = self.weight.device
        # The authors' initial statistics.
        self.register_buffer("batch_mean", torch.full((), self._STATE_INIT["batch_mean"], device=device))
        self.register_buffer("batch_std", torch.full((), self._STATE_INIT["batch_std"], device=device))
        # The target reads the statistics through this bound method, so the spec stays
        # one constant object (and follows the buffers across .to(device)).
        target = AdaptiveMarginTarget(scale, margin, self.norm_scaler)
        if _flag("straight_through", straight_through):
            target = StraightThroughTarget(target, scale)
        self._spec = MarginSpec(scale, target, _filtering(interclass_filtering_threshold), name="adaface")

    def update_state(self, embeddings: Tensor, labels: Tensor) -> None:
        internal = prepare_labels(labels, self.num_classes, self.ignore_index)
        norms = torch.linalg.vector_norm(embeddings.float(), dim=1).clamp(0.001, 100.0)
        # Masked statistics (no boolean indexing: data-dependent shapes would break
        # torch.compile); a batch with fewer than two labelled rows leaves them as they are.
        valid = (internal >= 0).float()
        count = valid.sum()
        mean = (norms * valid).sum() / count.clamp_min(1.0)
        std = torch.sqrt(((norms - mean) ** 2 * valid).sum() / (count - 1.0).clamp_min(1.0))
        rate = torch.where(count > 1, self.t_alpha, 0.0)
        self.batch_mean.lerp_(mean, rate)
        self.batch_std.lerp_(std, rate)

    def norm_scaler(self, norms: Tensor) -> Tensor:
        """``g = clip((||x|| - mu) / (sigma + eps) * h, -1, 1)`` for detached norms (B,)."""
        norms = norms.clamp(0.001, 100.0)
        mean, std = self.batch_mean.to(norms.dtype), self.batch_std.to(norms.dtype)
        return ((norms - mean) / (std + 1e-3) * self.h).clamp(-1.0, 1.0)

    def spec(self) -> MarginSpec:
        return self._spec
