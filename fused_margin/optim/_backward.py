"""The backward of the fused op with the weight updated in place instead of returning its
gradient: the checks that come first, the generic path (backends whose kernels do not
apply updates: the gradient in PyTorch, then the update chunk by chunk of rows) and the
rows that a sampled step (``class_index``) does not reach."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..kernel_params import IGNORED_LABEL, KernelParams, SavedTensors, UpstreamGrads
from .update import WeightUpdate, apply_update_

__all__ = ["CHUNK_ELEMENTS", "fused_backward", "inputs_are_finite"]

#: the rows updated at a time by the PyTorch paths hold about this many elements
CHUNK_ELEMENTS = 1 << 22


def _rows_per_chunk(dim: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, dim))


def _used_rows(class_index: Tensor, k: int) -> Tensor:
    return (class_index[:, None] * k + torch.arange(k, device=class_index.device)).reshape(-1)


@torch.no_grad()
def inputs_are_finite(grads: UpstreamGrads, saved: SavedTensors, target_u: Tensor | None = None) -> bool:
    """Whether the backward's inputs are finite where they take part: the upstream
    gradients, the rows of ``x`` not ignored, ``lse_neg`` (``-inf`` is allowed: a row
    without negatives) and ``target_u`` when saved. One host synchronization."""
    valid = saved.labels != IGNORED_LABEL
    checks = [torch.isfinite(g).all() for g in (grads.grad_lse, grads.grad_target_u, grads.grad_sum)]
    x = torch.where(valid[:, None], saved.x, torch.zeros((), dtype=saved.x.dtype, device=saved.x.device))
    checks.append(torch.isfinite(x).all())
    lse = saved.lse_neg
    checks.append(~(torch.isnan(lse) | (lse == float("inf"))).any())
    if target_u is not None:
        target_u = torch.where(valid, target_u, torch.zeros_like(target_u))
        checks.append(torch.isfinite(target_u).all())
    return bool(torch.stack(checks).all())


def _weight_view(t: Tensor, view: Tensor, base: Tensor) -> Tensor:
    """``t`` (shaped and strided like the parameter ``base``) seen as ``view`` sees ``base``."""
    if view.shape == base.shape and view.stride() == base.stride() and view.storage_offset() == base.storage_offset():
        return t
    if t.stride() != base.stride():
        raise RuntimeError("an optimizer state tensor does not have its weight's strides")
    offset = t.storage_offset() + view.storage_offset() - base.storage_offset()
    return t.as_strided(view.shape, view.stride(), offset)


def _check_alias(weight: Tensor, param: Tensor) -> None:
    same = weight.device == param.device and (
        weight.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    )
    if not same or weight.numel() != param.numel():
        raise RuntimeError(
            "the weight reaching the fused backward is not the parameter its optimizer was given (a copy of the "
            "head?): call apply_optimizer_in_backward on the weight that is trained"
        )


def _check_unique(class_index: Tensor) -> None:
    if torch.unique(class_index).numel() != class_index.numel():
        sorted_index, _ = torch.sort(class_index)
        repeated = sorted_index[1:][sorted_index[1:] == sorted_index[:-1]]
        raise ValueError(
            f"class_index repeats class {int(repeated[0])}: with an optimizer in the backward each class may be "
            "sampled once per step (its row would be updated twice)"
        )


def _update_rows_(update: WeightUpdate, weight: Tensor, rows: Tensor, grad: Tensor | None, acc: torch.dtype) -> None:
    """``update`` on the rows ``rows`` of ``weight`` (and of its state), chunk by chunk;
    ``grad``: their gradient rows (None: a zero gradient)."""
    step = _rows_per_chunk(weight.shape[1])
    for start in range(0, rows.numel(), step):
        index = rows[start:start + step]
        w = weight.index_select(0, index)
        state = tuple(s.index_select(0, index) for s in update.state)
        g = (torch.zeros(index.numel(), weight.shape[1], dtype=acc, device=weight.device) if grad is None
             else grad.index_select(0, index))
        apply_update_(update, w, state, g)
        weight.index_copy_(0, index, w)
        for s, rows_s in zip(update.state, state):
            s.index_copy_(0, index, rows_s)


def _update_all_rows_(update: WeightUpdate, weight: Tensor, grad: Tensor) -> None:
    step = _rows_per_chunk(weight.shape[1])
    for start in range(0, weight.shape[0], step):
        end = min(start + step, weight.shape[0])
        apply_update_(update, weight[start:end], tuple(s[start:end] for s in update.state), grad[start:end])


@torch.no_grad()
def fused_backward(optimizer, param: Tensor, group: dict[str, Any], backend, grads: UpstreamGrads,
                   saved: SavedTensors, params: KernelParams, target_u: Tensor | None = None
                   ) -> tuple[Tensor, Tensor | None, bool]:
    """``(grad_x, grad_bias, updated)``, the weight and its optimizer's state updated in
    place (``updated`` False: the inputs were not finite, nothing was changed)."""
    weight = saved.weight
    _check_alias(weight, param)
    class_index = saved.class_index
    if class_index is not None:
        _check_unique(class_index)
    if not inputs_are_finite(grads, saved, target_u):
        # no step: the weight and the state stay as they are (the loss is not finite either)
        grad_x, _grad_w, grad_b = backend.backward(grads, saved, params)
        return grad_x, grad_b, False
    update, commit = optimizer._begin_update(param, group)
    # the state as the kernels index it: like the weight they read
    update = replace(update, state=tuple(_weight_view(s, weight, param) for s in update.state))
    # the update writes the parameter's storage directly (.data: the weight's version
    # counter stays, so saved references to it elsewhere in the graph remain valid)
    weight = weight.data
    update = replace(update, state=tuple(s.data for s in update.state))
    saved = replace(saved, weight=weight)
    acc = torch.float64 if weight.dtype == torch.float64 or saved.x.dtype == torch.float64 else torch.float32
    rows = None if class_index is None else _used_rows(class_index, params.num_subcenters)

    if getattr(backend, "fused_updates", False):
        grad_x, grad_w, grad_b = backend.backward(grads, saved, params, update=update)
        if grad_w is not None:
            raise RuntimeError(f"backend {backend.name!r} returned a weight gradient although it applied the update")
        if rows is not None and not optimizer.sparse:
            # rows not sampled: a zero gradient, but momentum, weight decay and moments apply
            unused = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            unused[rows] = False
            _update_rows_(update, weight, unused.nonzero().squeeze(1), None, acc)
    else:
        grad_x, grad_w, grad_b = backend.backward(grads, saved, params)
        if rows is not None and optimizer.sparse:
            _update_rows_(update, weight, rows, grad_w, acc)
        else:
            _update_all_rows_(update, weight, grad_w)
        del grad_w
    commit()
    return grad_x, grad_b, True
