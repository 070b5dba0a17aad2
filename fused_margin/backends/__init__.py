"""Backend registry and the ``'auto'`` choice.

Every module in this package that defines a module-level ``BACKEND`` (a
:class:`Backend`) is a backend: adding one is adding one file. Each backend says what
it cannot do (:meth:`Backend.not_supported_reasons`); ``'auto'`` walks the backends in
their declared priority for the input's device and takes the first that has no
reasons, and when all refuse, the error lists each one's reasons. An explicitly named
backend that cannot run raises: it never silently falls back.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..kernel_params import KernelParams, SavedTensors, UpstreamGrads

if TYPE_CHECKING:
    from ..optim.update import WeightUpdate

__all__ = ["Backend", "BackendUnavailableError", "available_backends", "get_backend", "resolve_backend"]


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run these inputs here (the message says why)."""


class Backend:
    """Base class: the interface of :mod:`fused_margin.kernel_params`."""

    #: the name users pass as ``backend=``
    name: str = ""
    #: device type -> priority for ``'auto'`` (lower first); absent: never auto-picked
    auto_priority: dict[str, int] = {}
    #: True for a backend that runs outside the custom op: :meth:`terms` returns the
    #: forward's outputs with autograd through them (no :meth:`forward`/:meth:`backward`)
    autograd_native: bool = False

    def not_supported_reasons(self, x: Tensor, weight: Tensor, params: KernelParams) -> list[str]:
        return []

    def forward(
        self,
        x: Tensor,
        weight: Tensor,
        labels: Tensor,
        bias: Tensor | None,
        class_index: Tensor | None,
        row_threshold: Tensor | None,
        params: KernelParams,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The forward's outputs (see :mod:`fused_margin.kernel_params`), run by the custom op."""
        raise NotImplementedError

    #: The forward's outputs, differentiable: what an :attr:`autograd_native` backend
    #: defines instead of :meth:`forward`, with the same arguments and outputs (a backend
    #: that defines only :meth:`forward` has none: the base method raises).
    terms = forward

    def backward(
        self, grads: UpstreamGrads, saved: SavedTensors, params: KernelParams, update: WeightUpdate | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(grad_x, grad_weight, grad_bias)``. With ``update`` (a fused optimizer,
        :mod:`fused_margin.optim`), the backend applies it to the weight rows in use chunk by
        chunk as their gradients are formed, and returns None for the weight's gradient;
        :attr:`fused_updates` says whether a backend can."""
        raise NotImplementedError

    #: whether :meth:`backward` applies a fused optimizer's update itself
    fused_updates: bool = False


#: name -> backend, filled on first use. A plain dict, not a cached function: a compiled
#: graph that looks a backend up (after ``resolve_backend`` has filled it at trace time)
#: reads it as a constant instead of tracing the module discovery.
_REGISTRY: dict[str, Backend] = {}


def _registry() -> dict[str, Backend]:
    if not _REGISTRY:
        found: dict[str, Backend] = {}
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            backend = getattr(module, "BACKEND", None)
            if isinstance(backend, Backend):
                found[backend.name] = backend
        _REGISTRY.update(found)
    return _REGISTRY


def available_backends() -> list[str]:
    """Names of all registered backends (whether or not they can run here)."""
    return sorted(_registry())


def get_backend(name: str) -> Backend:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"backend must be one of {['auto', *sorted(registry)]}, got {name!r}")
    return registry[name]


def resolve_backend(name: str, x: Tensor, weight: Tensor, params: KernelParams) -> str:
    """The backend that will run: ``name`` itself if it can, the first able one for 'auto'."""
    # The params travel as a tuple of plain values: Dynamo (torch 2.11) cannot pass a
    # frozen dataclass to an assume_constant_result function. Their floats stay out: no
    # backend chooses by them, and in a graph recompiled for a changed margin (a margin
    # schedule) Dynamo makes them symbolic, which such a function cannot take.
    return _resolve(name, x, weight, params.choice_key())


# Resolution depends only on device, dtypes and the installed packages: a constant for a
# compiled graph, so Dynamo runs it once at trace time instead of tracing the registry.
@torch.compiler.assume_constant_result
def _resolve(name: str, x: Tensor, weight: Tensor, choice_key: tuple) -> str:
    params = KernelParams.from_choice_key(choice_key)
    if name != "auto":
        reasons = get_backend(name).not_supported_reasons(x, weight, params)
        if reasons:
            raise BackendUnavailableError(f"backend {name!r} cannot run these inputs: " + "; ".join(reasons))
        return name
    device_type = x.device.type
    candidates = sorted(
        (b for b in _registry().values() if device_type in b.auto_priority),
        key=lambda b: b.auto_priority[device_type],
    )
    refusals = []
    for backend in candidates:
        reasons = backend.not_supported_reasons(x, weight, params)
        if not reasons:
            return backend.name
        refusals.append(f"{backend.name}: " + "; ".join(reasons))
    raise BackendUnavailableError(
        f"no backend can run inputs on device {x.device} ({x.dtype}, {weight.dtype}): " + " | ".join(refusals)
    )

