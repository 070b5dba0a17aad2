"""Optimizers fused into the backward of the class weights.

:func:`apply_optimizer_in_backward` (the signature of PyTorch's
``torch.distributed.optim._apply_optimizer_in_backward``) makes the backward of the fused
op update the class weights chunk by chunk as each chunk's gradient is formed: the
weight's gradient is never allocated. It returns the optimizer that holds the state, a
real ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (LR schedulers and ``state_dict()`` work
as usual). :func:`remove_optimizer_in_backward` detaches it again (``del optimizer`` does
not: the weight keeps its optimizer alive, as PyTorch's in-backward optimizers do).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._backward import inputs_are_finite
from ._optimizers import FusedAdam, FusedAdamW, FusedSGD, InBackwardOptimizer
from .registry import ATTRIBUTE, fused_optimizer_handle, lookup, unregister
from .update import UPDATE_ADAM, UPDATE_SGD, WeightUpdate, apply_update_

__all__ = [
    "UPDATE_ADAM",
    "UPDATE_SGD",
    "FusedAdam",
    "FusedAdamW",
    "FusedSGD",
    "InBackwardOptimizer",
    "WeightUpdate",
    "apply_optimizer_in_backward",
    "apply_update_",
    "fused_optimizer_handle",
    "inputs_are_finite",
    "remove_optimizer_in_backward",
    "run_fused_backward",
]

_FUSED = {torch.optim.SGD: FusedSGD, torch.optim.Adam: FusedAdam, torch.optim.AdamW: FusedAdamW}
_OPTIONS = {
    torch.optim.SGD: ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach",
                      "differentiable", "fused"),
    torch.optim.Adam: ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                       "differentiable", "fused", "decoupled_weight_decay"),
    torch.optim.AdamW: ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                        "differentiable", "fused"),
}


def apply_optimizer_in_backward(
    optimizer_class: type[torch.optim.Optimizer],
    params: Iterable[Tensor] | Tensor,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    *,
    sparse: bool = False,
) -> InBackwardOptimizer:
    """Updates ``params`` (class weights of fused heads: a head's ``weight``, or
    ``ShardedMarginLoss.weight``) inside the backward of the fused op with
    ``optimizer_class(params, **optimizer_kwargs)``'s rule, and returns that optimizer: an
    instance of a subclass of ``optimizer_class`` holding the state (``state_dict()``,
    ``load_state_dict()``, LR schedulers). Read at each backward from its ``param_groups``.

    After ``loss.backward()`` the weights hold what ``optimizer.step()`` of the plain class
    (``foreach=False``) would give from the same gradient; ``weight.grad`` stays None and
    the returned optimizer's ``step()`` does nothing to them (call it, and
    ``zero_grad()``, as usual: a second backward before either is refused).

    Supported: ``torch.optim.SGD`` (lr, momentum, dampening, nesterov, weight_decay,
    maximize), ``torch.optim.Adam`` and ``torch.optim.AdamW`` (lr, betas, eps,
    weight_decay, maximize); foreach / fused / capturable / differentiable / amsgrad must
    stay off (refused here, and when they arrive later through ``load_state_dict`` or
    ``param_groups``). ``sparse``: with sampled classes (``class_index``), update only the sampled
    rows (like ``torch.optim.SparseAdam``); by default every row is updated exactly as the
    plain optimizer would.
    """
    plain = optimizer_class
    for base, fused in _FUSED.items():
        if optimizer_class is fused:
            plain = base
    if plain not in _FUSED:
        name = getattr(optimizer_class, "__qualname__", repr(optimizer_class))
        raise ValueError(
            f"optimizer_class must be torch.optim.SGD, torch.optim.Adam or torch.optim.AdamW for an optimizer in the "
            f"backward, got {name}"
        )
    kwargs = dict(optimizer_kwargs or {})
    unknown = sorted(set(kwargs) - set(_OPTIONS[plain]))
    if unknown:
        raise ValueError(
            f"optimizer_kwargs: {plain.__name__} in the backward does not take option(s) {unknown}; "
            f"supported: {list(_OPTIONS[plain])}"
        )
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be a bool, got {type(sparse).__name__}")
    if isinstance(params, Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty: pass the class weights to update in the backward")
    for p in params:
        if isinstance(p, Mapping):
            raise TypeError("params must be class weights (tensors), not parameter groups")
    return _FUSED[plain](params, sparse=sparse, **kwargs)


def remove_optimizer_in_backward(params: Iterable[Tensor] | Tensor) -> None:
    """Detaches the optimizer in the backward from ``params`` (weights given to
    :func:`apply_optimizer_in_backward`): their backward forms their gradient again
    (``weight.grad``), for a plain optimizer. The optimizer keeps their state, so its
    ``state_dict()`` loads into the plain class, but no longer updates them.

    Until then ``del optimizer`` changes nothing (the weight keeps its optimizer alive and
    every backward updates it), and a plain optimizer's ``step()`` over the weight raises.
    A function compiled while it was attached is recompiled (Dynamo guards on the mark)."""
    if isinstance(params, Tensor):
        params = [params]
    for p in list(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params must hold class weights (tensors), got {type(p).__name__}")
        handle = getattr(p, ATTRIBUTE, 0)
        if not handle:
            raise ValueError(f"the weight of shape {tuple(p.shape)} has no optimizer in the backward")
        try:
            owner = lookup(handle)
        except RuntimeError:  # its optimizer no longer exists: only the mark is left
            unregister(p)
            p.__dict__.pop("_fused_margin_optimizer_object", None)
        else:
            owner._detach(handle)


def run_fused_backward(backend, grads, saved, params, handle: int, target_u: Tensor | None = None):
    """The backward with the weight updated in place by its fused optimizer:
    ``(grad_x, grad_bias)`` (``target_u``: the forward's, for the finiteness check)."""
    return lookup(handle)._fused_backward(handle, backend, grads, saved, params, target_u)
