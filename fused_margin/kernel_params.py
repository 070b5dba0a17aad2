"""The contract every backend implements: parameters and the exact math.

**Forward** ``margin_lse(x, weight, labels, bias, class_index, row_threshold, params)``

Inputs
    x            (B, D) float (fp32 / bf16 / fp16 / fp64)
    weight       (R, D) float, R = C_all * K (K = ``num_subcenters``); the rows
                 ``j*K .. j*K+K-1`` are class ``j``'s sub-centers
    labels       (B,) int64; a value in ``[0, C)`` is the row's target class (an index into
                 the classes in use, see ``class_index``); -1 means the row has no target
                 column here (its negatives still count: the class-sharded head, whose
                 target lives on another rank); ``IGNORED_LABEL`` (-2, what the public API
                 passes for ``ignore_index``) means the row is not part of the
                 computation: ``lse_neg = -inf``, ``target_u = sum_neg = 0``, and its
                 logits add nothing to any gradient whatever its upstream gradients
                 (the public API also passes zeros for its embedding, so that the GEMMs
                 see no NaN or inf from it)
    bias         (C_all,) or None, added to every logit (the linear head)
    class_index  (C,) int64 or None: the classes in use are ``class_index[0..C)`` (rows of
                 ``weight`` read through the index; no gathered copy); None means all
                 C = C_all classes
    row_threshold (2, B) float or None: CurricularFace's per-row constants, row 0 the
                 threshold ``thr_b``, row 1 the modulation ``t`` (the same in every row; a
                 tensor, so that a head can keep ``t`` on the device without a host sync)

Math (``acc`` = fp64 if x or weight is fp64, else fp32; all math in ``acc``)
    r_b  = 1/max(||x_b||, 1e-12) if normalize_x else 1                     (B,)
    q_i  = 1/max(||w_i||, 1e-12) if normalize_w else 1  for the R' = C*K rows in use
    u_bj = max_k r_b * q_{jk} * <x_b, w_{jk}>                                (sub-centers)
    z_bj = scale * T(u_bj) + bias_j          (T: see ``NonTargetKind``)
    lse_neg_b  = logsumexp_{j != y_b} z_bj   (-inf when no such j; NaN when a z_bj is
                 NaN, +inf or NaN when one is +inf: non-finite values propagate, as in
                 ``torch.logsumexp``; sub-center maxima propagate NaN too)
    sum_neg_b  = sum_{j != y_b} z_bj         (for label smoothing)
    target_u_b = u_{b, y_b}                  (0 when the row has no target)
    argmax_b   = argmax_j (scale * u_bj + bias_j) over all j, ties to the lowest j
Outputs: ``(lse_neg, target_u, sum_neg, argmax, row_scale, col_scale)`` with
``row_scale`` = r (B,) and ``col_scale`` = q (C*K,) in ``acc`` dtype (saved for the
backward: O(B + C)); argmax int64.

**Backward** given ``grad_lse, grad_target_u, grad_sum`` (B,) (acc dtype)
    dz_bj = grad_lse_b * exp(z_bj - lse_neg_b) + grad_sum_b       for j != y_b, else 0
    dU_bj = dz_bj * scale * T'(u_bj)  (+ grad_target_u_b at j = y_b), routed to the
            sub-center that attained the max
    dx_b  = r_b * (sum_i dU_bi q_i w_i - rho_b * r_b x_b),  rho_b  = sum_i dU_bi u_bi
    dw_i  = q_i * (sum_b dU_bi r_b x_b - kappa_i * q_i w_i), kappa_i = sum_b dU_bi u_bi
            (the second terms only when normalizing), rows not in use get 0
    dbias_j = sum_b dz_bj  (scattered to ``class_index``)
Outputs ``(grad_x, grad_weight, grad_bias)`` in the dtypes and shapes of x, weight, bias
(grad_bias None when bias is None).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .spec import MarginSpec, NonTargetKind

__all__ = ["IGNORED_LABEL", "KernelParams", "SavedTensors", "UpstreamGrads", "acc_dtype", "values"]

#: the kernels' label of a row that is not part of the computation (``ignore_index``)
IGNORED_LABEL = -2


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The ``acc`` dtype above: fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def values(bundle) -> tuple:
    """A bundle's fields in their declared order (``type(bundle)(*values(bundle))``
    rebuilds it): what the flat custom-op schemas of :mod:`fused_margin.ops` carry."""
    return tuple(getattr(bundle, f.name) for f in fields(bundle))


@dataclass(frozen=True)
class KernelParams:
    """The operation's scalar parameters (the math above)."""

    normalize_x: bool
    normalize_w: bool
    scale: float
    kind: NonTargetKind
    alpha: float = 1.0
    delta: float = 0.0
    margin: float = 0.0
    num_subcenters: int = 1

    def __post_init__(self) -> None:
        # a flat schema carries the kind as an int
        object.__setattr__(self, "kind", NonTargetKind(self.kind))

    def choice_key(self) -> tuple:
        """The fields a backend may choose by (not the floats): ``(normalize_x, normalize_w,
        kind, num_subcenters)``, plain Python values."""
        return self.normalize_x, self.normalize_w, int(self.kind), self.num_subcenters

    @classmethod
    def from_choice_key(cls, key: tuple) -> KernelParams:
        """Params with the fields of :meth:`choice_key` and the default floats (scale 1)."""
        normalize_x, normalize_w, kind, num_subcenters = key
        return cls(normalize_x, normalize_w, 1.0, kind, num_subcenters=num_subcenters)

    @classmethod
    def from_spec(cls, spec: MarginSpec) -> KernelParams:
        nt = spec.non_target
        return cls(
            normalize_x=spec.normalize_embeddings,
            normalize_w=spec.normalize_weight,
            scale=float(spec.scale),
            kind=nt.kind,
            alpha=float(nt.alpha),
            delta=float(nt.delta),
            margin=float(nt.margin),
            num_subcenters=int(spec.num_subcenters),
        )


@dataclass(frozen=True)
class UpstreamGrads:
    """The backward's upstream gradients: of the loss w.r.t. ``lse_neg``, ``target_u`` and
    ``sum_neg``, (B,) each in the acc dtype (zeros for an output the loss did not use)."""

    grad_lse: Tensor
    grad_target_u: Tensor
    grad_sum: Tensor


@dataclass(frozen=True)
class SavedTensors:
    """What the backward reads of its forward: the forward's inputs and the saved outputs
    ``lse_neg``, ``row_scale`` and ``col_scale``."""

    x: Tensor
    weight: Tensor
    labels: Tensor
    bias: Tensor | None
    class_index: Tensor | None
    row_threshold: Tensor | None
    lse_neg: Tensor
    row_scale: Tensor
    col_scale: Tensor
