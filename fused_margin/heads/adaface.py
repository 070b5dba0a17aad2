"""AdaFace (Kim et al. 2022): the margin adapts to the feature norm as a proxy of image
quality. With ``g = clip((||x|| - mu) / (sigma + eps) * h, -1, 1)`` (``mu, sigma`` EMAs
of the batch's norm statistics, momentum ``t_alpha``), the target logit is
``s * (cos(clip(theta_y - m*g, eps, pi - eps)) - (m + m*g))``; non-targets ``s * c_j``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import prepare_labels
from ..spec import AdaptiveMarginTarget, MarginSpec, _finite, _positive
from .base import MarginHead


class AdaFaceLoss(MarginHead):
    batch_mean: Tensor
    batch_std: Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
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
        self.register_buffer("batch_mean", torch.full((), 20.0, device=device))
        self.register_buffer("batch_std", torch.full((), 100.0, device=device))

    def update_state(self, embeddings: Tensor, labels: Tensor) -> None:
        internal = prepare_labels(labels, self.num_classes, self.ignore_index)
        norms = torch.linalg.vector_norm(embeddings.float(), dim=1).clamp(0.001, 100.0)
        valid = norms[internal >= 0]
        if valid.numel() > 1:
            self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * valid.mean())
            self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * valid.std())

    def norm_scaler(self, embeddings: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(embeddings.detach().float(), dim=1).clamp(0.001, 100.0)
        return ((norms - self.batch_mean) / (self.batch_std + 1e-3) * self.h).clamp(-1.0, 1.0)

    def spec(self) -> MarginSpec:
        """The spec at the running mean norm (margin scaler 0)."""
        return MarginSpec(self.scale, AdaptiveMarginTarget(self.scale, self.margin, torch.zeros(())), name="adaface")

    def spec_for(self, embeddings: Tensor) -> MarginSpec:
        target = AdaptiveMarginTarget(self.scale, self.margin, self.norm_scaler(embeddings))
        return MarginSpec(self.scale, target, name="adaface")
