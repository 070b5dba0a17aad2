"""The eager PyTorch reference: materializes the (B, C) logits, written for clarity.

It is the ground truth every backend is tested against (run it in float64):
:func:`margin_lse_terms` computes what a fused kernel computes
(``lse_neg, target_u, sum_neg, argmax, row_scale, col_scale``) with autograd, and
:func:`reference_backward` its backward with the formulas of
:mod:`fused_margin.kernel_params`. The ``'reference'`` backend runs them through the
custom op; the ``'eager'`` backend runs :func:`margin_lse_terms` with plain autograd (the
benchmarks' eager baseline). The target transform and the loss are the functional API's
(:func:`fused_margin.margin_cross_entropy`), the same for every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernel_params import IGNORED_LABEL, KernelParams, SavedTensors, UpstreamGrads, acc_dtype
from .spec import NonTarget

__all__ = [
    "margin_lse_terms",
    "reference_backward",
]

_NORM_EPS = 1e-12


def used_rows(class_index: Tensor | None, k: int, device: torch.device) -> Tensor | None:
    """Row indices of ``weight`` in use, in order (class-major, sub-center minor)."""
    if class_index is None:
        return None
    return (class_index[:, None] * k + torch.arange(k, device=device)).reshape(-1)


def cosine_matrix(
    x: Tensor, weight: Tensor, class_index: Tensor | None, params: KernelParams, native_gemm: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``u`` (B, C) (after the sub-center max), ``row_scale`` (B,), ``col_scale`` (C*K,).

    ``native_gemm``: with 16-bit x and W of one dtype, the (B, C) product runs in that
    dtype (tensor cores, as a user's ``F.linear`` does, under autocast too) and only the
    softmax side in fp32; else the product runs in fp32 (fp64 for fp64 inputs) on the
    upcast inputs, more accurate than any 16-bit GEMM (the reference)."""
    dtype = acc_dtype(x, weight)
    native = native_gemm and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16)
    xf, wf = x.to(dtype), weight.to(dtype)
    w_gemm = weight if native else wf
    rows = used_rows(class_index, params.num_subcenters, x.device)
    if rows is not None:
        wf = wf.index_select(0, rows)
        w_gemm = w_gemm.index_select(0, rows) if native else wf
    ones_b = torch.ones(x.shape[0], dtype=dtype, device=x.device)
    ones_c = torch.ones(wf.shape[0], dtype=dtype, device=x.device)
    r = 1.0 / torch.linalg.vector_norm(xf, dim=1).clamp_min(_NORM_EPS) if params.normalize_x else ones_b
    q = 1.0 / torch.linalg.vector_norm(wf, dim=1).clamp_min(_NORM_EPS) if params.normalize_w else ones_c
    dots = (x @ w_gemm.T).to(dtype) if native else xf @ wf.T
    u = dots * r[:, None] * q[None, :]
    k = params.num_subcenters
    if k > 1:
        u = u.view(u.shape[0], u.shape[1] // k, k).amax(dim=2)
    return u, r, q


def margin_lse_terms(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    class_index: Tensor | None,
    row_threshold: Tensor | None,
    params: KernelParams,
    native_gemm: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused operation's forward, eagerly (see :mod:`fused_margin.kernel_params`;
    ``native_gemm``: see :func:`cosine_matrix`)."""
    ignored = labels <= IGNORED_LABEL
    # Ignored rows are not part of the computation: zeros (a select, not a product, so
    # NaN or inf there reaches neither the outputs nor any gradient).
    x = torch.where(ignored[:, None], torch.zeros_like(x), x)
    u, r, q = cosine_matrix(x, weight, class_index, params, native_gemm)
    num_rows, num_classes = u.shape
    u = torch.where(ignored[:, None], torch.zeros_like(u), u)
    has_target = (labels >= 0) & (labels < num_classes)
    safe_labels = torch.where(has_target, labels, torch.zeros_like(labels))
    target_mask = torch.zeros_like(u, dtype=torch.bool)
    target_mask[torch.arange(num_rows, device=u.device), safe_labels] = has_target
    # the columns that are not negatives: the target, and every column of an ignored row
    not_negative = target_mask | ignored[:, None]
    target_u = torch.where(has_target, u.gather(1, safe_labels[:, None]).squeeze(1), torch.zeros_like(u[:, 0]))

    nt = NonTarget(params.kind, params.alpha, params.delta, params.margin)
    thresholds = None if row_threshold is None else row_threshold.to(u.dtype)
    z = params.scale * nt.value(u, thresholds)
    plain = params.scale * u
    if bias is not None:
        b = bias.to(u.dtype)
        if class_index is not None:
            b = b.index_select(0, class_index)
        z = z + b
        plain = plain + b

    lse_neg = _lse_neg_forward(z, not_negative)
    sum_neg = torch.where(not_negative, torch.zeros_like(z), z).sum(dim=1)
    argmax = plain.argmax(dim=1)
    return lse_neg, target_u, sum_neg, argmax, r, q


@torch.no_grad()
def reference_backward(
    grads: UpstreamGrads, saved: SavedTensors, params: KernelParams
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The backward of :func:`margin_lse_terms`, written out with the formulas of
    :mod:`fused_margin.kernel_params` (the same steps a kernel takes, on whole matrices)."""
    grad_lse, grad_target_u, grad_sum = grads.grad_lse, grads.grad_target_u, grads.grad_sum
    x, weight, labels, bias = saved.x, saved.weight, saved.labels, saved.bias
    class_index, row_threshold = saved.class_index, saved.row_threshold
    dtype = acc_dtype(x, weight)
    k = params.num_subcenters
    ignored = labels <= IGNORED_LABEL
    xf = torch.where(ignored[:, None], torch.zeros((), dtype=dtype, device=x.device), x.to(dtype))
    rows = used_rows(class_index, k, x.device)
    wf = weight.to(dtype) if rows is None else weight.to(dtype).index_select(0, rows)
    r = 1.0 / torch.linalg.vector_norm(xf, dim=1).clamp_min(_NORM_EPS) if params.normalize_x else None
    q = 1.0 / torch.linalg.vector_norm(wf, dim=1).clamp_min(_NORM_EPS) if params.normalize_w else None
    u_full = xf @ wf.T
    if r is not None:
        u_full = u_full * r[:, None]
    if q is not None:
        u_full = u_full * q[None, :]
    u_full = torch.where(ignored[:, None], torch.zeros_like(u_full), u_full)
    num_rows = u_full.shape[0]
    # explicit sizes: a -1 is ambiguous for an empty batch
    u, best = u_full.view(num_rows, u_full.shape[1] // k, k).max(dim=2)
    num_classes = u.shape[1]

    has_target = (labels >= 0) & (labels < num_classes)
    safe_labels = torch.where(has_target, labels, torch.zeros_like(labels))
    target_mask = torch.zeros_like(u, dtype=torch.bool)
    target_mask[torch.arange(num_rows, device=u.device), safe_labels] = has_target
    not_negative = target_mask | ignored[:, None]

    nt = NonTarget(params.kind, params.alpha, params.delta, params.margin)
    thresholds = None if row_threshold is None else row_threshold.to(dtype)
    z = params.scale * nt.value(u, thresholds)
    if bias is not None:
        b = bias.to(dtype) if class_index is None else bias.to(dtype).index_select(0, class_index)
        z = z + b
    lse = _lse_neg_forward(z, not_negative)
    # -inf: no negative class, no softmax term. A NaN lse is not that: it propagates.
    has_negative = lse != float("-inf")
    lse_safe = torch.where(has_negative, lse, torch.zeros_like(lse))
    prob = torch.where(has_negative[:, None], torch.exp(z - lse_safe[:, None]), torch.zeros_like(z))
    dz = grad_lse.to(dtype)[:, None] * prob + grad_sum.to(dtype)[:, None]
    dz = torch.where(not_negative, torch.zeros_like(dz), dz)
    d_u = dz * (params.scale * nt.derivative(u, thresholds))
    d_u = torch.where(not_negative, torch.zeros_like(d_u), d_u)
    d_u = d_u + torch.where(target_mask, grad_target_u.to(dtype)[:, None], torch.zeros_like(d_u))

    # Route each class's gradient to the sub-center that attained the max.
    d_full = torch.zeros_like(u_full).view(num_rows, num_classes, k)
    d_full.scatter_(2, best[:, :, None], d_u[:, :, None])
    d_full = d_full.view(num_rows, num_classes * k)

    w_scaled = wf if q is None else wf * q[:, None]
    x_scaled = xf if r is None else xf * r[:, None]
    grad_x = d_full @ w_scaled
    if r is not None:
        rho = (d_full * u_full).sum(dim=1)
        grad_x = r[:, None] * grad_x - (rho * r * r)[:, None] * xf
    grad_x = torch.where(ignored[:, None], torch.zeros_like(grad_x), grad_x)
    grad_w_used = d_full.T @ x_scaled
    if q is not None:
        kappa = (d_full * u_full).sum(dim=0)
        grad_w_used = q[:, None] * grad_w_used - (kappa * q * q)[:, None] * wf
    if rows is None:
        grad_w = grad_w_used.to(weight.dtype)
    else:
        grad_w = torch.zeros_like(weight).index_add_(0, rows, grad_w_used.to(weight.dtype))
    grad_b = None
    if bias is not None:
        db = dz.sum(dim=0)
        grad_b = db.to(bias.dtype) if class_index is None else torch.zeros_like(bias).index_add_(
            0, class_index, db.to(bias.dtype)
        )
    return grad_x.to(x.dtype), grad_w, grad_b


def _lse_neg_forward(z: Tensor, not_negative: Tensor) -> Tensor:
    # A row whose only class is its target (or an ignored row) has an empty negative set:
    # lse_neg = -inf. The double `where` keeps its gradient finite (zero) instead of NaN.
    has_negative = (~not_negative).any(dim=1)
    z_neg = z.masked_fill(not_negative, float("-inf"))
    z_neg = torch.where(has_negative[:, None], z_neg, torch.zeros_like(z_neg))
    lse_neg = torch.logsumexp(z_neg, dim=1)
    return torch.where(has_negative, lse_neg, torch.full_like(lse_neg, float("-inf")))
