"""Drop-in replacements for pytorch-metric-learning's classification losses, on the
fused kernels.

Change the import and nothing else::

    # from pytorch_metric_learning.losses import ArcFaceLoss
    from fused_margin.pml import ArcFaceLoss

    loss_func = ArcFaceLoss(num_classes=10_000, embedding_size=512, margin=28.6, scale=64)
    loss = loss_func(embeddings, labels)

**pytorch-metric-learning's own classes.** Each class here is a subclass of
pytorch-metric-learning's class of the same name (the package must be installed:
``pip install pytorch-metric-learning``). Its code gives the constructor and every
attribute, ``W`` ``(embedding_size, num_classes)`` and the ``state_dict()`` (loaded
both ways, strictly), ``get_logits``, ``cast_types``, ``get_outliers``, the statistics
(``collect_stats``), the ``distance``, ``reducer``, ``weight_regularizer``,
``embedding_regularizer`` and miners' ``indices_tuple``, and
``DistributedLossWrapper``. Only one thing is replaced: the per-row cross-entropy
(``reduction='none'``, before the miners' weights and the reducer) comes from the fused
operation instead of the ``B x C`` logits. The kernels read ``W.t()``, a view: the
Triton kernels read it in place, the CPU backend one bounded chunk of classes at a
time, the CUDA C++ backend makes a row-major copy inside each call (a transient
``C x D`` buffer).

**Read at every call.** The margin is built from the current ``margin``, ``scale`` and
``temperature`` attributes (and ``sub_centers``) at each forward, as
pytorch-metric-learning reads them: a margin schedule that sets ``loss.margin`` works.
``margin`` holds what pytorch-metric-learning holds: radians for ``ArcFaceLoss`` and
``SubCenterArcFaceLoss`` (given in degrees to the constructor), the integer multiplier
for ``LargeMarginSoftmaxLoss`` and ``SphereFaceLoss``. A value the fused margin cannot
take (a negative scale, an ArcFace margin outside [0, pi)) raises at the next forward,
naming the attribute. pytorch-metric-learning itself computes the multiple-angle
coefficients of ``LargeMarginSoftmaxLoss`` and ``SphereFaceLoss`` once, in
``init_margin()``; here a new ``margin`` applies whole (call ``init_margin()`` after
changing it for the same result from both).

**The same numbers.** The loss is pytorch-metric-learning's (its definitions, not this
library's core heads where they differ): ``SphereFaceLoss`` and ``LargeMarginSoftmaxLoss``
have no annealed lambda (lambda = 0) and multiply every logit by ``scale``; ``ArcFaceLoss``
falls back to ``c - m sin m`` beyond ``theta + m > pi``. One difference, on purpose: at
``c_y = +-1`` exactly its gradient (through ``acos``) is not finite; here it is
(:data:`fused_margin.spec.SIN2_EPS`).

**dtypes**, as pytorch-metric-learning: each forward casts ``W`` to the embeddings' dtype
and device (``cast_types``), and the loss comes back in the embeddings' dtype; the fused
kernels accumulate in fp32 (fp64 for fp64) inside. One difference, on purpose: under
``torch.autocast`` the master ``W`` keeps its own dtype (pytorch-metric-learning casts
it to fp16 when the autocast is not CUDA's, and its users found the fp16 master weight
costs accuracy: its issues 309 and 209); the loss is then fp32, as its cross-entropy
gives under autocast.

**Falling back.** A configuration the fused operation does not compute (a ``distance``
other than the loss's own cosine or dot product, or one with ``power != 1`` or
``p != 2``; ``normalize_embeddings=False`` on the angular losses; a replaced
``cross_entropy`` other than ``torch.nn.CrossEntropyLoss(reduction='none')`` with at most
``label_smoothing``) runs pytorch-metric-learning's own computation, with a warning,
once per loss and reason, that says why. A regularizer on ``W`` (``weight_regularizer``)
and the fallback cannot run with an optimizer in the backward on ``W``
(:mod:`fused_margin.optim`): both raise at the forward.

Beyond pytorch-metric-learning's arguments, each class takes ``backend=`` (``'auto'``,
``'cpu'``, ``'triton'``, ...; checked in the constructor).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from .backends import available_backends
from .functional import BackendName, detached_target_cos, margin_cross_entropy
from .heads.softmax import LinearTarget
from .ops import _refuse_any, label_checks
from .optim.registry import fused_optimizer_handle
from .spec import MarginSpec, TargetContext

try:
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
    from pytorch_metric_learning.utils import common_functions as c_f
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
except ModuleNotFoundError as error:
    if error.name is None or error.name.split(".")[0] != "pytorch_metric_learning":
        raise
    raise ImportError(
        "fused_margin.pml needs pytorch-metric-learning, which is not installed: "
        "pip install pytorch-metric-learning (or pip install 'fused_margin[pml]')"
    ) from error

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


@dataclasses.dataclass(frozen=True)
class _ScaledTarget:
    """``factor * target(ctx)``: pytorch-metric-learning's ``scale`` on the multiplicative
    margins, which multiplies every logit."""

    target: Any
    factor: float

    def __call__(self, ctx: TargetContext) -> Tensor:
        return self.factor * self.target(ctx)


class _FusedCrossEntropy:
    """Mixed in before a pytorch-metric-learning loss: its ``compute_loss`` with the
    per-row cross-entropy from the fused operation."""

    #: the distances whose computation the fused operation reproduces
    _fused_distances: tuple[type, ...] = (CosineSimilarity,)
    #: whether the fused margin needs normalized embeddings (the angular ones do)
    _angular: bool = True
    #: the margin's attributes, read at each call
    _margin_attributes: tuple[str, ...] = ("margin", "scale")

    W: nn.Parameter

    def __init__(self, *args: Any, backend: BackendName = "auto", **kwargs: Any) -> None:
        backend = _checks.choice("backend", backend, ["auto", *available_backends()])
        super().__init__(*args, **kwargs)
        self.backend = backend
        self._warned: set[str] = set()
        self._spec_cache: tuple[tuple, MarginSpec] | None = None
        self.spec()  # the margin's values, checked now

    # ---- what the subclasses define ------------------------------------------------

    def _make_spec(self) -> MarginSpec:
        raise NotImplementedError

    @property
    def _num_subcenters(self) -> int:
        return 1

    @property
    def _num_classes(self) -> int:
        # its angular losses keep the class count; NormalizedSoftmaxLoss records 0 there
        return self.num_classes

    # ---- the margin, from the current attributes -------------------------------------

    def spec(self) -> MarginSpec:
        """The loss as the fused operation runs it, from the current attributes."""
        key = (*(getattr(self, name) for name in self._margin_attributes), self._num_subcenters,
               self.distance.normalize_embeddings)
        if self._spec_cache is None or self._spec_cache[0] != key:
            try:
                spec = self._make_spec()
            except (TypeError, ValueError) as e:
                values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._margin_attributes)
                raise type(e)(f"{type(self).__name__} ({values}): {e}") from None
            self._spec_cache = (key, spec)
        return self._spec_cache[1]

    def _label_smoothing(self) -> float | None:
        """``cross_entropy``'s label smoothing, or None when it is not one the fused
        operation computes."""
        ce = self.cross_entropy
        plain = (type(ce) is nn.CrossEntropyLoss and ce.reduction == "none" and ce.weight is None
                 and ce.ignore_index == -100)
        return float(ce.label_smoothing) if plain else None

    def unfused_reason(self) -> str | None:
        """Why the current configuration runs pytorch-metric-learning's own computation
        (None: it runs on the fused operation)."""
        distance = self.distance
        if type(distance) not in self._fused_distances:
            names = " or ".join(d.__name__ for d in self._fused_distances)
            return f"distance={type(distance).__name__}: the fused operation computes {names} only"
        if distance.power != 1 or distance.p != 2:
            return f"distance has power={distance.power!r}, p={distance.p!r}: the fused operation computes power=1, p=2"
        if not distance.normalize_embeddings and self._angular:
            return "distance.normalize_embeddings=False: the fused angular margins need normalized embeddings"
        if self._label_smoothing() is None:
            return (f"cross_entropy={self.cross_entropy!r}: the fused operation computes "
                    f"torch.nn.CrossEntropyLoss(reduction='none', label_smoothing=...) only")
        return None

    # ---- the loss ----------------------------------------------------------------------

    def compute_loss(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any, ref_emb: Tensor,
                     ref_labels: Tensor) -> dict[str, Any]:
        reason = self.unfused_reason()
        fused_optimizer = fused_optimizer_handle(self.W)
        if fused_optimizer and self.weight_regularizer is not None:
            raise ValueError(
                f"{type(self).__name__}: weight_regularizer={type(self.weight_regularizer).__name__}() sends a "
                f"gradient to W outside the fused operation, which its optimizer in the backward would never apply"
            )
        if reason is not None:
            if fused_optimizer:
                raise ValueError(
                    f"{type(self).__name__}: {reason}; this configuration runs pytorch-metric-learning's own "
                    f"computation, which an optimizer in the backward on W cannot update"
                )
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(
                    f"{type(self).__name__}: {reason}; computing it with pytorch-metric-learning's own code "
                    f"(the batch x classes logits in memory)",
                    stacklevel=5,
                )
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        dtype, device = embeddings.dtype, embeddings.device
        autocast = torch.is_autocast_enabled(device.type)
        # pytorch-metric-learning's cast, except under autocast: the master W keeps its dtype
        self.cast_types(self.W.dtype if autocast else dtype, device)
        spec = self.spec()
        self._check_labels(labels)
        if self.W.shape[1] != self._num_classes * self._num_subcenters:
            raise ValueError(
                f"{type(self).__name__}: W has {self.W.shape[1]} columns, but num_classes={self._num_classes} "
                f"with {self._num_subcenters} sub-center(s) needs {self._num_classes * self._num_subcenters}"
            )
        weight = self.W.t()
        if self.collect_stats or self.distance.collect_stats:
            self._collect_stats(embeddings, weight, labels, spec)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
        unweighted_loss = margin_cross_entropy(
            embeddings, weight, labels, spec, reduction="none", ignore_index=_NO_IGNORE,
            label_smoothing=self._label_smoothing(), backend=self.backend,
        )
        if not autocast:
            unweighted_loss = unweighted_loss.to(dtype)
        loss_dict = {
            "loss": {
                "losses": unweighted_loss * miner_weights,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def _check_labels(self, labels: Tensor) -> None:
        # the fused operation's own refusal, in its mode (FUSED_MARGIN_LABEL_CHECKS=device: no
        # host sync), worded for pytorch-metric-learning, which has no ignored rows
        _refuse_any((labels < 0) | (labels >= self._num_classes), labels,
                    f"labels must lie in [0, {self._num_classes})", label_checks() == "device",
                    " (every row is a class here, as in pytorch-metric-learning)")

    @torch.no_grad()
    def _collect_stats(self, embeddings: Tensor, weight: Tensor, labels: Tensor, spec: MarginSpec) -> None:
        """The statistics pytorch-metric-learning records, by its own methods: the
        distance's norms, and the angular losses' mean target angle."""
        if self.distance.collect_stats:
            self.distance.reset_stats()
            ref = self._distance_reference(weight)
            self.distance.set_default_stats(embeddings, ref, self.distance.maybe_normalize(embeddings),
                                            self.distance.maybe_normalize(ref))
        if self.collect_stats and hasattr(self, "get_angles"):
            # the target cosines (normalized, max over sub-centers), as its get_cosine gives them
            self.get_angles(detached_target_cos(embeddings, weight, labels, spec, None).to(embeddings.dtype))

    def _distance_reference(self, weight: Tensor) -> Tensor:
        """What the loss hands its distance as the reference embeddings."""
        return weight


def _class_arguments(num_classes: object, embedding_size: object) -> dict[str, int]:
    return {"num_classes": _checks.positive_integer("num_classes", num_classes),
            "embedding_size": _checks.positive_integer("embedding_size", embedding_size)}


def _degrees(name: str, value: Any) -> float:
    return _checks.in_range(name, value, 0.0, 180.0)


def _as_given(rule: Any, name: str, value: Any) -> Any:
    """``value`` checked by ``rule``: a Python int or float is kept as given (the attribute
    holds what pytorch-metric-learning would hold); a numpy or 0-dim tensor scalar becomes
    its value."""
    checked = rule(name, value)
    return value if type(value) in (int, float) else checked


class CosFaceLoss(_FusedCrossEntropy, pml_losses.CosFaceLoss):
    """``s * (c_y - m)`` for the target, ``s * c_j`` for the others; ``margin`` is m (not degrees)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64, *,
                 backend: BackendName = "auto", **kwargs: Any) -> None:
        super().__init__(**_class_arguments(num_classes, embedding_size), margin=_as_given(_checks.real, "margin", margin),
                         scale=_as_given(_checks.positive, "scale", scale), backend=backend, **kwargs)

    def _make_spec(self) -> MarginSpec:
        return MarginSpec.cosface(self.scale, self.margin)


class ArcFaceLoss(_FusedCrossEntropy, pml_losses.ArcFaceLoss):
    """``s * cos(theta_y + m)``, ``s * (c_y - m sin m)`` beyond ``theta_y + m > pi``;
    ``margin`` in degrees (``self.margin`` holds radians, as there)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64, *,
                 backend: BackendName = "auto", **kwargs: Any) -> None:
        super().__init__(**_class_arguments(num_classes, embedding_size),
                         margin=_as_given(_degrees, "margin", margin),
                         scale=_as_given(_checks.positive, "scale", scale), backend=backend, **kwargs)

    def _make_spec(self) -> MarginSpec:
        return MarginSpec.arcface(self.scale, self.margin, num_subcenters=self._num_subcenters)


class SubCenterArcFaceLoss(_FusedCrossEntropy, pml_losses.SubCenterArcFaceLoss):
    """ArcFace on the max over ``sub_centers`` columns per class (columns ``j*K .. j*K+K-1``
    of ``W`` are class ``j``'s)."""

    _margin_attributes = ("margin", "scale", "sub_centers")

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64,
                 sub_centers: int = 3, *, backend: BackendName = "auto", **kwargs: Any) -> None:
        super().__init__(**_class_arguments(num_classes, embedding_size),
                         margin=_as_given(_degrees, "margin", margin),
                         scale=_as_given(_checks.positive, "scale", scale), sub_centers=_checks.positive_integer("sub_centers", sub_centers),
                         backend=backend, **kwargs)

    @property
    def _num_subcenters(self) -> int:
        return self.sub_centers

    def _make_spec(self) -> MarginSpec:
        return MarginSpec.arcface(self.scale, self.margin, num_subcenters=self.sub_centers)


class LargeMarginSoftmaxLoss(_FusedCrossEntropy, pml_losses.LargeMarginSoftmaxLoss):
    """L-Softmax as pytorch-metric-learning defines it: ``scale * ||w_y|| ||x|| psi_m(theta_y)``
    for the target, ``scale * <x, w_j>`` for the others (no lambda); ``margin`` is the
    integer multiplier m."""

    def __init__(self, num_classes: int, embedding_size: int, margin: int = 4, scale: float = 1, *,
                 backend: BackendName = "auto", **kwargs: Any) -> None:
        super().__init__(**_class_arguments(num_classes, embedding_size), margin=_checks.positive_integer("margin", margin),
                         scale=_as_given(_checks.positive, "scale", scale), backend=backend, **kwargs)

    def _make_spec(self) -> MarginSpec:
        weight_norm = not isinstance(self, SphereFaceLoss)
        core = MarginSpec.lsoftmax if weight_norm else MarginSpec.sphereface
        scale = _checks.positive("scale", self.scale)
        target = core(self.margin, 0.0).target  # the core head's target with lambda = 0
        return MarginSpec(scale, _ScaledTarget(target, scale), normalize_embeddings=False,
                          normalize_weight=not weight_norm, name=type(self).__name__)


class SphereFaceLoss(LargeMarginSoftmaxLoss, pml_losses.SphereFaceLoss):
    """SphereFace as pytorch-metric-learning defines it: ``scale * ||x|| psi_m(theta_y)`` and
    ``scale * ||x|| c_j`` (no lambda)."""


class NormalizedSoftmaxLoss(_FusedCrossEntropy, pml_losses.NormalizedSoftmaxLoss):
    """``<x^, w^_j> / temperature`` for every class (NormFace with ``s = 1 / temperature``);
    with ``distance=DotProductSimilarity(normalize_embeddings=False)``, ``<x, w^_j> / temperature``."""

    _fused_distances = (DotProductSimilarity, CosineSimilarity)
    _angular = False
    _margin_attributes = ("temperature",)

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, *,
                 backend: BackendName = "auto", **kwargs: Any) -> None:
        super().__init__(**_class_arguments(num_classes, embedding_size),
                         temperature=_as_given(_checks.positive, "temperature", temperature), backend=backend, **kwargs)

    @property
    def _num_classes(self) -> int:
        return self.W.shape[1]

    def _make_spec(self) -> MarginSpec:
        scale = 1.0 / _checks.positive("temperature", self.temperature)
        return MarginSpec(scale, LinearTarget(scale), normalize_embeddings=self.distance.normalize_embeddings,
                          name="normface")

    def _distance_reference(self, weight: Tensor) -> Tensor:
        return self.distance.normalize(weight, dim=1)

