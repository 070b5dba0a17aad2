"""Which class weights have an optimizer fused into the backward, found from the weight
itself (an attribute on the parameter: readable by ``torch.compile`` as a constant)."""

from __future__ import annotations

import itertools
import weakref

from torch import Tensor

__all__ = ["ATTRIBUTE", "any_registered", "fused_optimizer_handle", "live_owner", "lookup", "register", "unregister"]

#: the parameter attribute that holds its handle (an int > 0)
ATTRIBUTE = "_fused_margin_optimizer"

_handles = itertools.count(1)
_registry: dict[int, weakref.ref] = {}


def fused_optimizer_handle(weight: Tensor) -> int:
    """The handle of the fused optimizer that updates ``weight`` in the backward; 0: none.
    A view of a registered parameter (``W.t()``: pytorch-metric-learning's layout) has
    its parameter's handle."""
    handle = getattr(weight, ATTRIBUTE, 0)
    if not handle:
        base = weight._base
        if base is not None:
            handle = getattr(base, ATTRIBUTE, 0)
    return handle


def register(weight: Tensor, owner) -> int:
    """Attaches ``owner`` (what applies the update) to ``weight``; returns the handle."""
    handle = next(_handles)
    _registry[handle] = weakref.ref(owner)
    setattr(weight, ATTRIBUTE, handle)
    return handle


def unregister(weight: Tensor) -> None:
    """Forgets ``weight``'s handle: its backward forms its gradient again."""
    handle = weight.__dict__.pop(ATTRIBUTE, 0)
    _registry.pop(handle, None)


def any_registered() -> bool:
    return bool(_registry)


def live_owner(weight: Tensor):
    """The optimizer that updates ``weight`` (itself, not a view) in the backward, or None."""
    handle = getattr(weight, ATTRIBUTE, 0)
    owner = _registry.get(handle) if handle else None
    return None if owner is None else owner()


def lookup(handle: int):
    owner = _registry.get(handle)
    owner = None if owner is None else owner()
    if owner is None:
        raise RuntimeError(
            f"the optimizer in the backward (handle {handle}) of this weight no longer exists (it was removed, or "
            "garbage-collected): a graph compiled while it existed must be compiled again (torch._dynamo.reset())"
        )
    return owner
