"""Drop-in replacements for pytorch-metric-learning's classification losses, on the
fused kernels.

Change the import and nothing else::

    # from pytorch_metric_learning.losses import ArcFaceLoss
    from fused_margin.pml import ArcFaceLoss

    loss_func = ArcFaceLoss(num_classes=10_000, embedding_size=512, margin=28.6, scale=64)
    loss = loss_func(embeddings, labels)

Each loss takes pytorch-metric-learning's constructor arguments (margins in degrees
where it uses degrees: ``ArcFaceLoss``, ``SubCenterArcFaceLoss``) and owns its parameter
``W`` of shape ``(embedding_size, num_classes)`` (``num_classes * sub_centers`` columns
for the sub-center loss), so its ``state_dict()`` is pytorch-metric-learning's and loads
both ways, strictly. The kernels are handed ``W.t()``, a view: the Triton kernels read
it in place, and the CPU backend copies one bounded chunk of classes at a time (never all
of ``W``); the CUDA C++ backend still makes a row-major copy inside each call (forward and
backward), a transient ``C x D`` buffer. The loss is the mean over the
batch, as its default ``MeanReducer`` gives.

The loss equals pytorch-metric-learning's (its definitions, not this library's core
heads where they differ): ``SphereFaceLoss`` and ``LargeMarginSoftmaxLoss`` have no
annealed lambda (lambda = 0) and multiply every logit by ``scale``; ``ArcFaceLoss`` falls
back to ``c - m sin m`` beyond ``theta + m > pi``. One difference, on purpose: at
``c_y = +-1`` exactly its gradient (through ``acos``) is not finite; here it is
(:data:`fused_margin.spec.SIN2_EPS`).

Only what a fused head can honour is accepted: ``reducer``, ``distance``,
``weight_regularizer``, ``embedding_regularizer`` (and their weights), ``collect_stats``
and miners' ``indices_tuple`` / ``ref_emb`` raise an error naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .functional import BackendName, margin_cross_entropy
from .logits import margin_free_logits
from .spec import MarginSpec, TargetContext

__all__ = [
    "ArcFaceLoss",
    "CosFaceLoss",
    "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
]

# pytorch-metric-learning has no ignore_index: every label must be a class.
_NO_IGNORE = -(2**63)

# pytorch-metric-learning's keyword arguments that change what the loss computes (or
# record statistics), which a fused head cannot honour, with the value that is a no-op
_UNSUPPORTED = {
    "reducer": None,
    "distance": None,
    "weight_regularizer": None,
    "weight_reg_weight": 1,
    "embedding_regularizer": None,
    "embedding_reg_weight": 1,
    "collect_stats": False,
}


@dataclass(frozen=True)
class _ScaledTarget:
    """``factor * target(ctx)``: pytorch-metric-learning's ``scale`` on the multiplicative
    margins, which multiplies every logit."""

    target: Callable[[TargetContext], Tensor]
    factor: float

    def __call__(self, ctx: TargetContext) -> Tensor:
        return self.factor * self.target(ctx)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class _FusedPMLLoss(nn.Module):
    """The shared part: ``W`` (D, C*K), the checks, the forward."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        sub_centers: int = 1,
        weight_init_func: Callable[[Tensor], Any] | None = None,
        backend: BackendName = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        for name, value in kwargs.items():
            if name not in _UNSUPPORTED:
                raise TypeError(f"{type(self).__name__} got an unexpected keyword argument {name!r}")
            if value is not _UNSUPPORTED[name] and value != _UNSUPPORTED[name]:
                raise ValueError(
                    f"{type(self).__name__}: {name}={value!r} is not supported by the fused head (it computes the "
                    f"mean over the batch of the cross-entropy, with cosine similarity, no regularizer); "
                    f"use pytorch_metric_learning.losses.{type(self).__name__} for {name}"
                )
        self.num_classes = _count("num_classes", num_classes)
        self.embedding_size = _count("embedding_size", embedding_size)
        self.sub_centers = _count("sub_centers", sub_centers)
        self.backend = backend
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes * sub_centers))
        (weight_init_func or nn.init.normal_)(self.W)  # pytorch-metric-learning's default: N(0, 1)

    def spec(self) -> MarginSpec:
        raise NotImplementedError

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Any = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Mean loss over the batch for ``(B, embedding_size)`` embeddings and ``(B,)``
        labels in ``[0, num_classes)``."""
        for name, value in (("indices_tuple", indices_tuple), ("ref_emb", ref_emb), ("ref_labels", ref_labels)):
            if value is not None:
                raise ValueError(f"{type(self).__name__}: {name} is not supported by the fused head")
        if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.dtype.is_floating_point:
            bad = (labels < 0) | (labels >= self.num_classes)
            if bool(bad.any()):
                position = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}) (every row is a class here, as in "
                    f"pytorch-metric-learning); got {int(labels[position])} at position {position}"
                )
        return margin_cross_entropy(
            embeddings, self.W.t(), labels, self.spec(), ignore_index=_NO_IGNORE, backend=self.backend
        )

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """Margin-free logits ``(B, num_classes)`` (max over sub-centers). Materializes B x C."""
        return margin_free_logits(embeddings, self.W.t(), self.spec(), None)


class CosFaceLoss(_FusedPMLLoss):
    """``s * (c_y - m)``; ``margin`` is m (not degrees)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin, self.scale = _number("margin", margin), _number("scale", scale)
        self._spec = MarginSpec.cosface(self.scale, self.margin)

    def spec(self) -> MarginSpec:
        return self._spec


class ArcFaceLoss(_FusedPMLLoss):
    """``s * cos(theta_y + m)``, ``c - m sin m`` beyond ``theta + m > pi``; ``margin`` in
    degrees (``self.margin`` holds radians, as there)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin, self.scale = math.radians(_number("margin", margin)), _number("scale", scale)
        self._spec = MarginSpec.arcface(self.scale, self.margin, num_subcenters=self.sub_centers)

    def spec(self) -> MarginSpec:
        return self._spec


class SubCenterArcFaceLoss(ArcFaceLoss):
    """ArcFace on the max over ``sub_centers`` columns per class (columns ``j*K .. j*K+K-1``
    of ``W`` are class ``j``'s)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 sub_centers: int = 3, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, sub_centers=sub_centers, **kwargs)


class LargeMarginSoftmaxLoss(_FusedPMLLoss):
    """L-Softmax as pytorch-metric-learning defines it: ``scale * ||w_y|| ||x|| psi_m(theta_y)``
    for the target, ``scale * <x, w_j>`` for the others (no lambda); ``margin`` is the
    integer multiplier (truncated, as there)."""

    _include_weight_norm = True

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 4, scale: float = 1,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin, self.scale = int(_number("margin", margin)), _number("scale", scale)
        if self.margin < 1:
            raise ValueError(f"margin must be at least 1 (the angle multiplier), got {margin!r}")
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        # the core head's target with lambda = 0 (no annealing)
        core = MarginSpec.lsoftmax if self._include_weight_norm else MarginSpec.sphereface
        target = core(self.margin, 0.0).target
        self._spec = MarginSpec(
            self.scale, _ScaledTarget(target, self.scale), normalize_embeddings=False,
            normalize_weight=not self._include_weight_norm, name=type(self).__name__,
        )

    def spec(self) -> MarginSpec:
        return self._spec


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """SphereFace as pytorch-metric-learning defines it: ``scale * ||x|| psi_m(theta_y)`` and
    ``scale * ||x|| c_j`` (no lambda)."""

    _include_weight_norm = False


class NormalizedSoftmaxLoss(_FusedPMLLoss):
    """``c_j / temperature`` for every class (NormFace with ``s = 1 / temperature``)."""

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, **kwargs: Any) -> None:
        super().__init__(num_classes, embedding_size, **kwargs)
        self.temperature = _number("temperature", temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self._spec = MarginSpec.normface(1.0 / self.temperature)

    def spec(self) -> MarginSpec:
        return self._spec

