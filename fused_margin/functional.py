"""The functional API: :func:`margin_cross_entropy`."""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from . import _checks
from .backends import get_backend, resolve_backend
from .kernel_params import IGNORED_LABEL, KernelParams, acc_dtype
from .ops import OpOptions, forward_args, margin_lse, prepare_labels
from .optim.registry import fused_optimizer_handle
from .optim.rules import check_fused_forward, check_target_reads_no_weight
from .spec import MarginSpec, NonTargetKind, TargetContext

__all__ = ["margin_cross_entropy", "fused_terms", "loss_from_terms", "Reduction", "BackendName"]

Reduction = Literal["mean", "sum", "none"]
BackendName = Literal["auto", "reference", "eager", "triton", "cuda", "cpu"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate_inputs(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    spec: MarginSpec,
    bias: Tensor | None,
    class_index: Tensor | None,
    reduction: str,
    label_smoothing: float,
) -> int:
    """Static checks (shapes, dtypes, devices, options); returns the class count C."""
    for name, t in (("embeddings", embeddings), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(spec, MarginSpec):
        raise TypeError(f"spec must be a fused_margin.MarginSpec, got {type(spec).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be a 2-D tensor (batch, embedding_size), got shape {_shape(embeddings)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (num_classes, embedding_size), got shape {_shape(weight)}")
    if embeddings.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"embeddings must be a floating-point tensor, got dtype {embeddings.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class indices), got dtype {labels.dtype}")
    batch, dim = embeddings.shape
    if weight.shape[1] != dim:
        raise ValueError(
            f"weight must have shape (num_classes, {dim}) to match embeddings {_shape(embeddings)}, "
            f"got {_shape(weight)}"
        )
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},) to match embeddings {_shape(embeddings)}, got {_shape(labels)}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias), ("class_index", class_index)):
        if t is not None and t.device != embeddings.device:
            raise ValueError(f"{name} is on {t.device} but embeddings is on {embeddings.device}; move them to one device")
    k = spec.num_subcenters
    if weight.shape[0] % k:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of num_subcenters={k}")
    num_classes_all = weight.shape[0] // k
    if bias is not None:
        if bias.shape != (num_classes_all,):
            raise ValueError(f"bias must have shape ({num_classes_all},), got {_shape(bias)}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bias must be a floating-point tensor, got dtype {bias.dtype}")
    num_classes = num_classes_all
    if class_index is not None:
        if class_index.dim() != 1 or class_index.dtype != torch.int64:
            raise ValueError(f"class_index must be a 1-D int64 tensor, got shape {_shape(class_index)} {class_index.dtype}")
        num_classes = class_index.shape[0]
        if num_classes < 1:
            raise ValueError("class_index must name at least one class, got an empty tensor")
    if num_classes < 1:
        raise ValueError(f"there must be at least one class, got weight of shape {_shape(weight)}")
    _checks.reduction(reduction)
    _checks.label_smoothing(label_smoothing)
    return num_classes


@torch.no_grad()
def detached_target_cos(
    embeddings: Tensor, weight: Tensor, labels: Tensor, spec: MarginSpec, class_index: Tensor | None
) -> Tensor:
    """``c_y`` per row (0 for rows without target), without gradient: an O(B*D) gather.
    CurricularFace needs it before the kernel runs (its threshold and its ``t``)."""
    k = spec.num_subcenters
    safe = labels.clamp_min(0)
    classes = safe if class_index is None else class_index.index_select(0, safe)
    rows = (classes[:, None] * k + torch.arange(k, device=labels.device)).reshape(-1)
    dtype = acc_dtype(embeddings, weight)
    w = weight.index_select(0, rows).to(dtype).view(labels.shape[0], k, weight.shape[1])
    x = torch.nn.functional.normalize(embeddings.to(dtype), dim=1)
    w = torch.nn.functional.normalize(w, dim=2)
    cos = torch.einsum("bd,bkd->bk", x, w).amax(dim=1)
    return torch.where(labels >= 0, cos, torch.zeros_like(cos))


def _target_rows(labels: Tensor, class_index: Tensor | None, k: int) -> Tensor:
    safe = labels.clamp_min(0)
    classes = safe if class_index is None else class_index.index_select(0, safe)
    return classes * k


def fused_terms(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    spec: MarginSpec,
    *,
    bias: Tensor | None = None,
    class_index: Tensor | None = None,
    row_threshold: Tensor | None = None,
    backend: BackendName = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused operation alone: ``(lse_neg, target_u, sum_neg, argmax)`` (B,) each,
    differentiable in the first three (see :mod:`fused_margin.kernel_params`).

    ``labels`` are internal labels: in ``[0, C)``, or -1 for "no target in this row"
    (what :func:`fused_margin.ops.prepare_labels` returns). Building block for callers
    that combine the terms themselves (the class-sharded distributed head).
    ``row_threshold``: CurricularFace's per-row constants (2, B), threshold and ``t``,
    when the caller has them (the sharded head: the target's class may live on another
    rank); else they are computed here from the rows' target cosines.
    """
    params = KernelParams.from_spec(spec)
    # Ignored rows are not part of the computation; zeros (a select: no gradient reaches
    # them, and NaN or inf in padding rows reaches no GEMM).
    embeddings = torch.where((labels <= IGNORED_LABEL)[:, None], torch.zeros_like(embeddings), embeddings)
    handle = fused_optimizer_handle(weight)
    if handle:
        check_fused_forward(weight, backend, embeddings.device.type)
    if row_threshold is None and params.kind == NonTargetKind.CURRICULAR:
        target_cos = detached_target_cos(embeddings, weight, labels, spec, class_index)
        row_threshold = spec.non_target.row_terms(target_cos)
    name = resolve_backend(backend, embeddings, weight, params)
    chosen = get_backend(name)
    if chosen.autograd_native:  # outside the custom op: plain autograd through its terms
        outputs = chosen.terms(embeddings, weight, labels, bias, class_index, row_threshold, params)
    else:
        args = forward_args(embeddings, weight, labels, bias, class_index, row_threshold, params,
                            OpOptions(name, handle))
        if torch.compiler.is_compiling():
            outputs = margin_lse(*args)
        else:
            try:
                outputs = margin_lse(*args)
            except RuntimeError as e:
                if "functorch" not in str(e):
                    raise
                raise RuntimeError(
                    f"torch.func transforms (grad, jacrev, jvp, ...) are not supported through the fused "
                    f"backend {name!r}; backend='eager' supports them (plain autograd through the logits)"
                ) from e
    lse_neg, target_u, sum_neg, argmax, _, _ = outputs
    return lse_neg, target_u, sum_neg, argmax


@overload
def margin_cross_entropy(
    embeddings: Tensor, weight: Tensor, labels: Tensor, spec: MarginSpec, *,
    bias: Tensor | None = ..., class_index: Tensor | None = ..., reduction: Reduction = ...,
    ignore_index: int = ..., label_smoothing: float = ..., return_accuracy: Literal[False] = ...,
    backend: BackendName = ..., step: int | Tensor = ...,
) -> Tensor: ...


@overload
def margin_cross_entropy(
    embeddings: Tensor, weight: Tensor, labels: Tensor, spec: MarginSpec, *,
    bias: Tensor | None = ..., class_index: Tensor | None = ..., reduction: Reduction = ...,
    ignore_index: int = ..., label_smoothing: float = ..., return_accuracy: Literal[True],
    backend: BackendName = ..., step: int | Tensor = ...,
) -> tuple[Tensor, Tensor]: ...


def margin_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    spec: MarginSpec,
    *,
    bias: Tensor | None = None,
    class_index: Tensor | None = None,
    reduction: Reduction = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    return_accuracy: bool = False,
    backend: BackendName = "auto",
    step: int | Tensor = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Margin-based softmax cross-entropy without materializing the (B, C) logits.

    Args:
        embeddings: (B, D) float; weight: (C*K, D) float (``nn.Linear.weight`` layout,
            K = ``spec.num_subcenters``); labels: (B,) integer class indices in
            ``[0, C)`` (or into ``class_index``), or ``ignore_index``.
        spec: the head (:class:`MarginSpec`).
        bias: optional (C,) bias added to every logit.
        class_index: optional (C',) int64: only these classes take part (negative-class
            sampling); labels then index into ``class_index``.
        reduction: 'mean' (over rows not ignored; 0 if all are), 'sum' or 'none' (B,).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        return_accuracy: also return the top-1 accuracy of the margin-free logits over
            the rows not ignored (computed in the same pass).
        backend: 'auto' | 'reference' | 'eager' | 'triton' | 'cuda' | 'cpu'. 'eager' is
            the reference with plain autograd through the materialized logits (no
            custom op), as a user would write it: with bf16/fp16 inputs the (B, C) GEMM
            runs in that dtype, the softmax in fp32; 'reference' runs the math through
            the custom op with every GEMM in fp32 (fp64 for fp64 inputs).
        step: training step, passed to the target transform (annealed margins).

    Returns the loss in float32 (float64 for float64 inputs), and the accuracy if asked.
    """
    num_classes = validate_inputs(embeddings, weight, labels, spec, bias, class_index, reduction, label_smoothing)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):  # 1.5 is refused, not truncated
        ignore_index = _checks.integer("ignore_index", ignore_index)
    label_smoothing = _checks.label_smoothing(label_smoothing)  # numpy or 0-dim tensor: a float from here on
    internal_labels = prepare_labels(
        labels, num_classes, ignore_index, class_index, weight.shape[0] // spec.num_subcenters
    )
    lse_neg, target_u, sum_neg, argmax = fused_terms(
        embeddings, weight, internal_labels, spec, bias=bias, class_index=class_index, backend=backend
    )
    # Ignored rows add nothing to the loss or to any gradient, whatever they hold: every
    # per-row term is selected away (where, not a product: 0 * NaN is NaN), so the
    # gradients that reach the fused op and the embeddings there are exact zeros.
    valid = internal_labels >= 0
    used_embeddings = torch.where(valid[:, None], embeddings, torch.zeros_like(embeddings))
    zeros = torch.zeros_like(lse_neg)
    lse_neg, sum_neg = torch.where(valid, lse_neg, zeros), torch.where(valid, sum_neg, zeros)
    k = spec.num_subcenters
    ctx = TargetContext(
        target_u, used_embeddings, weight, _target_rows(internal_labels, class_index, k),
        spec.normalize_embeddings, spec.normalize_weight, step,
    )
    target_logit = _checked_row_term(spec.target(ctx), "target", spec.target, target_u)
    target_logit = torch.where(valid, target_logit, torch.zeros_like(target_logit))
    if bias is not None:
        b = bias if class_index is None else bias.index_select(0, class_index)
        target_logit = target_logit + b.index_select(0, internal_labels.clamp_min(0)).to(target_logit.dtype)
    loss = loss_from_terms(target_logit, lse_neg, sum_neg, num_classes, label_smoothing)
    if spec.regularizer is not None:
        term = _checked_row_term(spec.regularizer(ctx), "regularizer", spec.regularizer, target_u)
        loss = loss + torch.where(valid, term, torch.zeros_like(term))
    if fused_optimizer_handle(weight):
        check_target_reads_no_weight(ctx)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        loss = loss.sum() / valid.sum().clamp_min(1).to(loss.dtype)
    elif reduction == "sum":
        loss = loss.sum()
    if not return_accuracy:
        return loss
    correct = ((argmax == internal_labels) & valid).sum().to(loss.dtype)
    accuracy = correct / valid.sum().clamp_min(1).to(loss.dtype)
    return loss, accuracy


def _checked_row_term(value: object, role: str, function: object, like: Tensor) -> Tensor:
    """A spec's target (or regularizer) output, checked: a floating tensor of shape (B,)
    on ``like``'s device, returned in ``like``'s dtype (the accumulation dtype). A (B, 1)
    result would otherwise broadcast the loss to (B, B) without an error, and a bf16
    result would make the whole loss bf16."""
    name = getattr(function, "__qualname__", None) or type(function).__name__
    if not isinstance(value, Tensor):
        raise TypeError(f"the spec's {role} {name} must return a torch.Tensor of shape {_shape(like)}, "
                        f"got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"the spec's {role} {name} must return a floating-point tensor, got dtype {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"the spec's {role} {name} must return a tensor on {like.device} (the embeddings' device), "
                         f"got one on {value.device}")
    if value.shape != like.shape:
        raise ValueError(f"the spec's {role} {name} must return a tensor of shape {_shape(like)} (one value per "
                         f"row), got shape {_shape(value)}")
    # A lower-precision result (a target computed under autocast, or in bf16 on purpose)
    # is upcast: the loss is accumulated in the acc dtype whatever the target's.
    return value.to(like.dtype)


def loss_from_terms(
    target_logit: Tensor, lse_neg: Tensor, sum_neg: Tensor, num_classes: int, label_smoothing: float
) -> Tensor:
    """Per-row cross-entropy from the kernel's terms: ``logaddexp(z_y, lse_neg) - z_y``,
    or with label smoothing ``eps``, ``(1 - eps) (lse - z_y) + eps (lse - mean_j z_j)``
    (``F.cross_entropy``'s form: with one class both terms are exactly 0)."""
    lse_all = torch.logaddexp(target_logit, lse_neg.to(target_logit.dtype))
    if label_smoothing == 0.0:
        return lse_all - target_logit
    mean_logit = (sum_neg.to(target_logit.dtype) + target_logit) / num_classes
    return (1.0 - label_smoothing) * (lse_all - target_logit) + label_smoothing * (lse_all - mean_logit)
