"""The backward of the fused op with the weight updated in place instead of returning its
gradient: the checks that come first, the generic path (backends whose kernels do not
apply updates: the gradient in PyTorch, then the update chunk by chunk of rows) and the
rows that a sampled step (``class_index``) does not reach."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..kernel_params import IGNORED_LABEL, KernelParams, SavedTensors, UpstreamGrads
from .update import GUARD_NON_FINITE_INPUTS, WeightUpdate, apply_update_, new_guard

__all__ = ["CHUNK_ELEMENTS", "fused_backward", "held_elsewhere", "inputs_are_finite", "inputs_finite"]

#: the rows updated at a time by the PyTorch paths hold about this many elements
CHUNK_ELEMENTS = 1 << 22


def _rows_per_chunk(dim: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, dim))


def _used_rows(class_index: Tensor, k: int) -> Tensor:
    return (class_index[:, None] * k + torch.arange(k, device=class_index.device)).reshape(-1)


@torch.no_grad()
def inputs_finite(grads: UpstreamGrads, saved: SavedTensors, target_u: Tensor | None = None) -> Tensor:
    """Whether the backward's inputs are finite where they take part, as a 0-dim bool
    tensor on their device (no host sync): the upstream gradients, the rows of ``x`` not
    ignored, ``lse_neg`` (``-inf`` is allowed: a row without negatives) and
    ``target_u`` when saved."""
    valid = saved.labels != IGNORED_LABEL
    checks = [torch.isfinite(g).all() for g in (grads.grad_lse, grads.grad_target_u, grads.grad_sum)]
    x = torch.where(valid[:, None], saved.x, torch.zeros((), dtype=saved.x.dtype, device=saved.x.device))
    checks.append(torch.isfinite(x).all())
    lse = saved.lse_neg
    checks.append(~(torch.isnan(lse) | (lse == float("inf"))).any())
    if target_u is not None:
        target_u = torch.where(valid, target_u, torch.zeros_like(target_u))
        checks.append(torch.isfinite(target_u).all())
    return torch.stack(checks).all()


def inputs_are_finite(grads: UpstreamGrads, saved: SavedTensors, target_u: Tensor | None = None) -> bool:
    """:func:`inputs_finite` read on the host (one synchronization)."""
    return bool(inputs_finite(grads, saved, target_u))


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


#: the use count of a storage (torch's private binding; absent: nothing is deferred, and a
#: stale read still fails loudly through the version counter)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _lone_tensor_use_count() -> int | None:
    """The use count of the storage of a tensor nothing else references, as read below
    (through a Python storage object made for the reading): measured, not assumed, so that
    a torch that counts differently cannot make every step look held or none."""
    if _storage_use_count is None:
        return None
    lone = torch.empty(1)
    return _storage_use_count(lone.untyped_storage()._cdata)


_LONE_TENSOR_USE_COUNT = _lone_tensor_use_count()


def held_elsewhere(weight: Tensor, param: Tensor) -> bool:
    """Whether something besides the parameter and the op's saved weight holds ``param``'s
    memory: a tensor another node of the graph saved (``x @ W.detach().t()`` in another
    loss term), a view kept alive. Every tensor that reads the weight's memory holds its
    storage, so this never misses a reader (it may see a harmless view)."""
    if _LONE_TENSOR_USE_COUNT is None:
        return False
    # the parameter (with the storage object made for the reading), and the saved weight
    # when it is a view (the pytorch-metric-learning drop-ins' W.t())
    expected = _LONE_TENSOR_USE_COUNT + (weight is not param)
    return _storage_use_count(param.untyped_storage()._cdata) > expected


def _bump_versions(param: Tensor, state: tuple[Tensor, ...]) -> None:
    # The kernels write through .data (no autograd op): tell autograd, so that every other
    # saved reference to the weight (another loss term, a retained graph replayed after the
    # step) fails with PyTorch's own "modified by an inplace operation" error, as a plain
    # in-place update would, instead of reading the new weight.
    torch.autograd.graph.increment_version(param)
    for s in state:
        torch.autograd.graph.increment_version(s)


def _non_finite_gradient_skipped(param: Tensor) -> None:
    warnings.warn(
        f"the gradient of a weight of shape {tuple(param.shape)} with an optimizer in the backward was not finite "
        "although the backward's inputs were (an overflow, or the weight was changed since the forward without "
        "autograd seeing it): the weight and its optimizer state are left untouched and the step is not counted",
        RuntimeWarning, stacklevel=2,
    )


def _partly_updated(param: Tensor) -> RuntimeError:
    return RuntimeError(
        f"the gradient of a weight of shape {tuple(param.shape)} with an optimizer in the backward became non-finite "
        "in the middle of the fused backward, after some of its rows had been updated: the weight and its optimizer "
        "state are now partly updated (the rows whose gradient was formed before that point took this step, the "
        "others did not) and the step is not counted. Restore the weight and the optimizer from a checkpoint. (The "
        "backward's inputs were finite: an overflow, or the weight was changed since the forward without autograd "
        "seeing it, e.g. through .data)"
    )


@torch.no_grad()
def fused_backward(optimizer, param: Tensor, group: dict[str, Any], backend, grads: UpstreamGrads,
                   saved: SavedTensors, params: KernelParams, target_u: Tensor | None = None, *,
                   on_done: Callable[[bool], None]) -> tuple[Tensor, Tensor | None]:
    """``(grad_x, grad_bias)``, the weight and its optimizer's state updated in place.
    ``on_done(updated)`` is called once the step is taken (True) or skipped (False: a
    non-finite input or gradient; the weight and the state are untouched): at once, or
    at the end of the backward when the update is deferred (:func:`held_elsewhere`)."""
    weight = saved.weight
    _check_alias(weight, param)
    class_index = saved.class_index
    if class_index is not None:
        _check_unique(class_index)
    deferred = held_elsewhere(weight, param)
    finite = inputs_finite(grads, saved, target_u)  # on the device: read with the guard, one sync
    update, commit = optimizer._begin_update(param, group)
    state = update.state
    # the state as the kernels index it: like the weight they read. The update writes the
    # parameter's storage through .data, and tells autograd itself (_bump_versions).
    update = replace(update, state=tuple(_weight_view(s, weight, param).data for s in state))
    saved = replace(saved, weight=weight.data)
    weight = saved.weight
    acc = torch.float64 if weight.dtype == torch.float64 or saved.x.dtype == torch.float64 else torch.float32
    rows = None if class_index is None else _used_rows(class_index, params.num_subcenters)

    def apply_whole_gradient(grad_w: Tensor) -> bool:
        # the whole gradient is at hand: all of it is checked before any row is written
        if not bool(finite & torch.isfinite(grad_w).all()):
            if bool(finite):
                _non_finite_gradient_skipped(param)
            return False
        if rows is not None and optimizer.sparse:
            _update_rows_(update, weight, rows, grad_w, acc)
        else:
            _update_all_rows_(update, weight, grad_w)
        _bump_versions(param, state)
        commit()
        return True

    if deferred or not getattr(backend, "fused_updates", False):
        grad_x, grad_w, grad_b = backend.backward(grads, saved, params)
        if not deferred:
            on_done(apply_whole_gradient(grad_w))
            return grad_x, grad_b
        # Another node still to run may read the weight (or a view of it is kept): apply the
        # step at the end of the backward, once they have read the old weight. This keeps
        # the gradient until then (the weight's size), for this step only.
        warnings.warn(
            f"a weight of shape {tuple(param.shape)} with an optimizer in the backward is held by another tensor (a "
            "term of the loss that saved it, a view kept alive): its update is applied at the end of the backward, "
            "which keeps its gradient (the weight's size) until then",
            RuntimeWarning, stacklevel=2,
        )

        def apply_at_end() -> None:
            on_done(apply_whole_gradient(grad_w))

        torch.autograd.Variable._execution_engine.queue_callback(apply_at_end)
        return grad_x, grad_b

    guard = new_guard(weight.device, finite)
    grad_x, grad_w, grad_b = backend.backward(grads, saved, params, update=replace(update, guard=guard))
    if grad_w is not None:
        raise RuntimeError(f"backend {backend.name!r} returned a weight gradient although it applied the update")
    status, wrote = guard.tolist()  # the backward's one host synchronization
    if wrote:
        _bump_versions(param, state)
    if status:
        if wrote:
            raise _partly_updated(param)
        if not status & GUARD_NON_FINITE_INPUTS:
            _non_finite_gradient_skipped(param)
        on_done(False)
        return grad_x, grad_b
    if rows is not None and not optimizer.sparse:
        # rows not sampled: a zero gradient, but momentum, weight decay and moments apply
        unused = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        unused[rows] = False
        _update_rows_(update, weight, unused.nonzero().squeeze(1), None, acc)
        if not wrote:
            _bump_versions(param, state)
    commit()
    on_done(True)
    return grad_x, grad_b
