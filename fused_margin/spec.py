"""`MarginSpec`: the declarative description of a margin-based softmax head.

A head is split in two (docs/design.md section 1):

* the **non-target** transform ``z_bj = s * T_n(u_bj) (+ bias_j)`` applied to every
  class but the label, chosen from a small closed set (:class:`NonTarget`) that every
  fused kernel implements;
* the **target** transform ``z_y = f(u_y, ||x||, ...)``: any differentiable function
  of B-vectors, evaluated in plain PyTorch with autograd (:class:`TargetContext`).

Because the target side is arbitrary PyTorch, a user can express a new margin as a
`MarginSpec` with their own ``target`` callable and one of the built-in non-target
transforms, without writing a kernel.

This module holds the shared vocabulary only (the spec, the non-target transforms, the
target's context and the numerics of angular targets). Each built-in head lives in one
module of :mod:`fused_margin.heads`, with its target transform and its factory, which
it registers as ``MarginSpec.<name>(...)`` (:meth:`MarginSpec.register_factory`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import _checks

__all__ = [
    "SIN2_EPS",
    "safe_acos",
    "sin_from_cos",
    "MarginSpec",
    "NonTarget",
    "NonTargetKind",
    "RowRegularizer",
    "SpecFactory",
    "StraightThroughTarget",
    "TargetContext",
    "TargetTransform",
    "lambda_schedule",
    "psi_multiple_angle",
]

#: Angular target transforms need ``sin(theta) = sqrt(1 - c^2)`` or ``acos(c)``, whose
#: derivatives are unbounded at ``|c| = 1``. Their forward values are computed exactly
#: (``c`` clamped to [-1, 1]), but their gradients are those of the same functions with
#: ``1 - c^2`` floored at ``SIN2_EPS``: finite (at most ``1/sqrt(SIN2_EPS)`` = 1e6 in
#: magnitude), exact wherever ``1 - c^2 >= SIN2_EPS`` (any fp32 cosine other than
#: exactly +-1), and never NaN, for perfectly aligned embeddings too.
SIN2_EPS: float = 1e-12


def sin_from_cos(c: Tensor) -> Tensor:
    """``sqrt(1 - c^2)`` with an exact forward and a finite gradient (see SIN2_EPS)."""
    one_minus = 1.0 - c * c
    exact = torch.sqrt(one_minus.clamp_min(0.0))
    floored = torch.sqrt(one_minus.clamp_min(SIN2_EPS))
    return floored + (exact - floored).detach()


def safe_acos(c: Tensor) -> Tensor:
    """``acos(c)`` for ``c`` in [-1, 1], exact forward, finite gradient (see SIN2_EPS)."""
    # the band's edge must be representable below 1 in c's dtype (fp32 rounds 1 - 5e-13 to 1)
    bound = min(math.sqrt(1.0 - SIN2_EPS), 1.0 - torch.finfo(c.dtype).eps / 2)
    exact = torch.acos(c.clamp(-1.0, 1.0))
    banded = torch.acos(c.clamp(-bound, bound))
    return banded + (exact - banded).detach()


class NonTargetKind(enum.IntEnum):
    """The closed set of non-target transforms ``T_n`` the kernels implement."""

    IDENTITY = 0  # T(u) = u
    AFFINE = 1  # T(u) = alpha * u + delta
    QUADRATIC = 2  # T(u) = [u + m]_+ * (u - m), exact gradient (SO-Softmax)
    QUADRATIC_DETACHED = 3  # same value, gradient [u + m]_+ (Circle loss, detached weight)
    CURRICULAR = 4  # T(u) = u * (t_b + u) if u > threshold_b else u (CurricularFace; per-row constants)
    FILTERED = 5  # T(u) = u * [u <= t], T'(u) = [u <= t], t = NonTarget.margin (inter-class filtering)


@dataclass(frozen=True)
class NonTarget:
    """Parameters of the non-target transform.

    ``margin`` is the ``m`` of the quadratic forms and CurricularFace's angular margin
    (the per-row threshold is ``cos(theta_y + m)``, treated as a constant, as in the
    paper); ``t`` is CurricularFace's modulation coefficient: a number, or a 0-dim
    tensor (the head's running ``t``, which stays on the device: no host sync). The
    kernels take both CurricularFace constants per row (:meth:`row_terms`).

    ``FILTERED`` (InsightFace's ``interclass_filtering_threshold``) reads its threshold
    ``t`` from ``margin``: a non-target cosine above it becomes 0 (the logit ``s * 0``
    stays in the softmax) and passes no gradient; build it with :meth:`filtered`.
    """

    kind: NonTargetKind = NonTargetKind.IDENTITY
    alpha: float = 1.0
    delta: float = 0.0
    margin: float = 0.0
    t: float | Tensor = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, NonTargetKind):  # no enum call when traced (Dynamo 2.11 can't)
            object.__setattr__(self, "kind", NonTargetKind(self.kind))
        for name in ("alpha", "delta", "margin", "t"):
            value = getattr(self, name)
            if name == "t" and isinstance(value, Tensor):
                # finiteness is not checked: it would read the value (a host sync)
                if value.dim() != 0 or not value.is_floating_point():
                    raise ValueError(f"NonTarget.t must be a number or a 0-dim float tensor, got {value!r}")
                continue
            try:
                object.__setattr__(self, name, _checks.real(f"NonTarget.{name}", value))
            except TypeError as e:
                raise ValueError(str(e)) from None

    @classmethod
    def filtered(cls, threshold: float) -> NonTarget:
        """Inter-class filtering: ``T(u) = u * [u <= threshold]``, ``T'(u) = [u <= threshold]``."""
        return cls(NonTargetKind.FILTERED, margin=_checks.real("interclass_filtering_threshold", threshold))

    @classmethod
    def interclass_filtering(cls, threshold: float) -> NonTarget:
        """The non-target transform of a cosine head: identity, or with ``threshold > 0``
        InsightFace's inter-class filtering (0 turns it off, as in arcface_torch)."""
        t = _checks.real("interclass_filtering_threshold", threshold)
        if t < 0:
            raise ValueError(f"interclass_filtering_threshold must be >= 0 (0: off), got {threshold!r}")
        return cls() if t == 0 else cls.filtered(t)

    def value(self, u: Tensor, thresholds: Tensor | None = None) -> Tensor:
        """``T_n(u)`` for a (B, C) tensor, with autograd: the definition every backend
        implements (``csrc/non_target.h``, ``triton_kernels/common.py``).
        CurricularFace takes its constants from ``thresholds``, the ``row_threshold``
        (2, B) of :meth:`row_terms`. A NaN ``u`` gives NaN."""
        kind = self.kind
        if kind == NonTargetKind.IDENTITY:
            return u
        if kind == NonTargetKind.AFFINE:
            return self.alpha * u + self.delta
        if kind == NonTargetKind.QUADRATIC:
            return torch.relu(u + self.margin) * (u - self.margin)
        if kind == NonTargetKind.QUADRATIC_DETACHED:
            return torch.relu(u + self.margin).detach() * (u - self.margin)
        if kind == NonTargetKind.FILTERED:
            # written as u > t so that a NaN cosine stays NaN
            return torch.where(u > self.margin, torch.zeros_like(u), u)
        threshold, t = self._curricular_terms(u, thresholds)
        return torch.where(u > threshold, u * (t + u), u)

    #: the name the reference used first
    apply = value

    def derivative(self, u: Tensor, thresholds: Tensor | None = None) -> Tensor:
        """``T_n'(u)`` for a (B, C) tensor: the derivative the kernels' backward uses,
        with the paper's constants held fixed (CurricularFace's ``t`` and threshold, the
        rows of ``thresholds``; the Circle weight ``[u + m]_+``), so for
        ``QUADRATIC_DETACHED`` and ``CURRICULAR`` it is not the autograd derivative of
        :meth:`value` in every argument. No autograd graph."""
        kind, m = self.kind, self.margin
        u = u.detach()
        if kind == NonTargetKind.IDENTITY:
            return torch.ones_like(u)
        if kind == NonTargetKind.AFFINE:
            return torch.full_like(u, self.alpha)
        if kind == NonTargetKind.QUADRATIC:
            return torch.where(u > -m, 2.0 * u, torch.zeros_like(u))
        if kind == NonTargetKind.QUADRATIC_DETACHED:
            return torch.relu(u + m)
        if kind == NonTargetKind.FILTERED:
            return torch.where(u > m, torch.zeros_like(u), torch.ones_like(u))
        threshold, t = self._curricular_terms(u, thresholds)
        return torch.where(u > threshold, t + 2.0 * u, torch.ones_like(u))

    @staticmethod
    def _curricular_terms(u: Tensor, thresholds: Tensor | None) -> tuple[Tensor, Tensor]:
        """CurricularFace's per-row ``(threshold, t)`` of ``thresholds`` (2, B), as (B, 1)
        columns in ``u``'s dtype, detached (constants of the transform)."""
        if thresholds is None:
            raise ValueError("the CurricularFace non-target transform needs thresholds (row_threshold, shape (2, B))")
        if thresholds.dim() != 2 or thresholds.shape[0] != 2 or thresholds.shape[1] != u.shape[0]:
            raise ValueError(f"thresholds must have shape (2, {u.shape[0]}), got {tuple(thresholds.shape)}")
        terms = thresholds.detach().to(u.dtype)
        return terms[0, :, None], terms[1, :, None]

    def threshold(self, target_cos: Tensor) -> Tensor:
        """CurricularFace's per-row threshold ``cos(theta_y + m)``, from the detached
        target cosine (no fallback branch: the paper compares with ``cos(theta_y + m)``)."""
        c = target_cos.clamp(-1.0, 1.0)
        return c * math.cos(self.margin) - torch.sqrt((1.0 - c * c).clamp_min(0.0)) * math.sin(
            self.margin
        )

    def row_terms(self, target_cos: Tensor) -> Tensor:
        """CurricularFace's per-row constants as the kernels take them (``row_threshold``
        of :mod:`fused_margin.kernel_params`): (2, B), the threshold and ``t``, in
        ``target_cos``'s dtype and device."""
        threshold = self.threshold(target_cos)
        t = torch.as_tensor(self.t, dtype=threshold.dtype, device=threshold.device)
        return torch.stack([threshold, t.expand_as(threshold)])


#: below this many elements of W a dense gradient costs little, and tools that expect
#: one (torch.autograd.gradcheck) get it
_SPARSE_GRAD_MIN_NUMEL = 1 << 20


class _TargetRowNorm(torch.autograd.Function):
    """``||w_{rows_b}||`` (B,) with a sparse gradient for W: B rows, not W's size.
    ``index_select``'s backward would allocate a dense zero W and scatter into it, and
    autograd would then add it to the kernel's dense dW (2 to 3 times W in extra memory
    for L-Softmax); autograd adds a sparse gradient into the dense one in place."""

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
        picked = weight.index_select(0, rows).to(dtype)
        norm = torch.linalg.vector_norm(picked, dim=1)
        ctx.save_for_backward(picked, norm, rows)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return norm

    @staticmethod
    def backward(ctx, grad: Tensor):
        picked, norm, rows = ctx.saved_tensors
        # d||w||/dw = w / ||w|| (0 for a zero row, as vector_norm's own gradient)
        values = torch.where(norm > 0, grad / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)[:, None] * picked
        grad_w = torch.sparse_coo_tensor(rows[None, :], values.to(ctx.weight_dtype), ctx.weight_shape,
                                         check_invariants=False)
        return grad_w, None, None


class TargetContext:
    """What a target transform may use, all as B-vectors with autograd.

    * ``u``: the kernel's target value ``r_b * q_y * <x_b, w_y>`` (max over sub-centers);
    * ``cos``: the target cosine ``c_y`` (``u`` divided by whichever norms the kernel
      did not fold in), **not** clamped;
    * ``embedding_norm``: ``||x_b||``;
    * ``weight_norm``: ``||w_{y_b}||`` (computed on first use: an O(B*D) gather);
    * ``step``: the head's step counter (for annealed margins).
    """

    def __init__(
        self,
        u: Tensor,
        embeddings: Tensor,
        weight: Tensor,
        target_rows: Tensor,
        normalize_embeddings: bool,
        normalize_weight: bool,
        step: int | Tensor = 0,
    ) -> None:
        self.u = u
        self.step = step
        self._embeddings = embeddings
        self._weight = weight
        self._target_rows = target_rows
        self._normalize_embeddings = normalize_embeddings
        self._normalize_weight = normalize_weight
        self._embedding_norm: Tensor | None = None
        self._weight_norm: Tensor | None = None

    @property
    def embedding_norm(self) -> Tensor:
        if self._embedding_norm is None:
            self._embedding_norm = torch.linalg.vector_norm(
                self._embeddings.to(self.u.dtype), dim=1
            )
        return self._embedding_norm

    @property
    def weight_norm(self) -> Tensor:
        if self._weight_norm is None:
            if (self._weight.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                    and self._weight.numel() >= _SPARSE_GRAD_MIN_NUMEL):
                self._weight_norm = _TargetRowNorm.apply(self._weight, self._target_rows, self.u.dtype)
            else:
                # Under torch.compile the gather's dense gradient is traced and fused instead.
                rows = self._weight.index_select(0, self._target_rows).to(self.u.dtype)
                self._weight_norm = torch.linalg.vector_norm(rows, dim=1)
        return self._weight_norm

    @property
    def cos(self) -> Tensor:
        c = self.u
        if not self._normalize_embeddings:
            c = c / self.embedding_norm.clamp_min(1e-12)
        if not self._normalize_weight:
            c = c / self.weight_norm.clamp_min(1e-12)
        return c

    def clamped_cos(self) -> Tensor:
        """``cos`` clamped to [-1, 1] (rounding can push it slightly outside)."""
        return self.cos.clamp(-1.0, 1.0)


#: A target transform maps a :class:`TargetContext` to the target logits ``z_y`` (B,).
TargetTransform = Callable[[TargetContext], Tensor]
#: An optional per-row term added to the loss (MagFace's regularizer ``g(a)``).
RowRegularizer = Callable[[TargetContext], Tensor]


def psi_multiple_angle(c: Tensor, m: int) -> Tensor:
    """``psi_m(theta) = (-1)^k cos(m*theta) - 2k`` on ``[k*pi/m, (k+1)*pi/m]``.

    Computed from ``c = cos(theta)`` without ``acos``: ``cos(m*theta)`` is the Chebyshev
    polynomial ``T_m(c)`` (by its recurrence), and ``k`` counts the thresholds
    ``cos(j*pi/m)`` (j = 1..m-1) that ``c`` lies at or below (L-Softmax, Liu et al. 2016,
    eq. 6-7). ``k`` is piecewise constant, so it carries no gradient.
    """
    t_prev, t_cur = torch.ones_like(c), c
    if m == 0:
        t_cur = t_prev
    for _ in range(1, m):
        t_prev, t_cur = t_cur, 2.0 * c * t_cur - t_prev
    with torch.no_grad():
        k = torch.zeros_like(c)
        for j in range(1, m):
            k = k + (c <= math.cos(j * math.pi / m)).to(c.dtype)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * t_cur - 2.0 * k


def lambda_schedule(step: int, base: float, gamma: float, power: float, lambda_min: float) -> float:
    """``lambda = max(lambda_min, base * (1 + gamma * step) ** (-power))`` (SphereFace,
    L-Softmax: the annealed weight of the plain cosine in the target logit)."""
    return max(lambda_min, base * (1.0 + gamma * step) ** (-power))


@dataclass(frozen=True)
class StraightThroughTarget:
    """``target``'s value with the gradient of ``scale * c_y``: the margin in the forward
    pass only (as InsightFace's arcface_torch applies it), for any angular target."""

    target: TargetTransform
    scale: float

    def __call__(self, ctx: TargetContext) -> Tensor:
        z = self.target(ctx)
        base = self.scale * ctx.clamped_cos().to(z.dtype)
        return base + (z - base).detach()


@dataclass(frozen=True)
class MarginSpec:
    """A head, as data: what the fused operation and the target transform need.

    Attributes:
        scale: ``s`` of the non-target logits ``s * T_n(u)`` (> 0).
        target: callable ``TargetContext -> z_y`` (B,), evaluated with autograd.
        non_target: the non-target transform (:class:`NonTarget`).
        normalize_embeddings: fold ``1/||x_b||`` into the GEMM.
        normalize_weight: fold ``1/||w_j||`` into the GEMM.
        num_subcenters: ``K``; rows ``j*K .. j*K+K-1`` of the weight are class ``j``'s
            sub-centers and the logit is the max over them.
        regularizer: optional per-row term added to the loss (MagFace).
        name: for reprs and benchmark tables.
    """

    scale: float
    target: TargetTransform
    non_target: NonTarget = NonTarget()
    normalize_embeddings: bool = True
    normalize_weight: bool = True
    num_subcenters: int = 1
    regularizer: RowRegularizer | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _checks.positive("scale", self.scale))
        if not callable(self.target):
            raise TypeError(f"target must be callable (TargetContext -> Tensor), got {self.target!r}")
        if not isinstance(self.non_target, NonTarget):
            raise TypeError(f"non_target must be a NonTarget, got {self.non_target!r}")
        try:
            object.__setattr__(self, "num_subcenters", _checks.positive_integer("num_subcenters", self.num_subcenters))
        except TypeError as e:
            raise ValueError(str(e)) from None

    # ---- factories: one per head, defined and registered by its module in heads/ ----

    @classmethod
    def register_factory(cls, name: str) -> Callable[[SpecFactory], SpecFactory]:
        """Decorator that makes a head module's spec factory ``MarginSpec.<name>(...)``.

        Each module of :mod:`fused_margin.heads` registers its own (importing
        ``fused_margin`` imports them all); registering a name twice, or one that
        :class:`MarginSpec` already uses, raises."""
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"a factory name must be a public identifier, got {name!r}")

        def register(factory: SpecFactory) -> SpecFactory:
            if not callable(factory):
                raise TypeError(f"the factory registered as MarginSpec.{name} must be callable, got {factory!r}")
            known = _FACTORIES.get(name)
            same = known is not None and (known.__module__, known.__qualname__) == (
                factory.__module__, factory.__qualname__)  # the same module imported again
            if known is not None and not same:
                raise ValueError(f"MarginSpec.{name} is already registered (by {known.__module__}.{known.__qualname__})")
            if known is None and (hasattr(cls, name) or name in {f.name for f in fields(cls)}):
                raise ValueError(f"MarginSpec.{name} is an attribute of MarginSpec, not a free factory name")
            _FACTORIES[name] = factory
            setattr(cls, name, staticmethod(factory))
            return factory

        return register

    @staticmethod
    def factories() -> dict[str, SpecFactory]:
        """The registered factories, by name (``MarginSpec.<name>``)."""
        return dict(_FACTORIES)


#: A head's spec factory: its constructor arguments -> :class:`MarginSpec`.
SpecFactory = Callable[..., MarginSpec]
_FACTORIES: dict[str, SpecFactory] = {}
