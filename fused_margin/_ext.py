"""Loads the compiled extension ``fused_margin._C`` (torch.ops.fused_margin_C), lazily.

``import fused_margin`` never needs it: the 'cpu' and 'cuda' backends ask here whether it
loaded, and when it did not, the first such request warns once (an explicit request
then raises :class:`~fused_margin.BackendUnavailableError`, 'auto' moves on to the next
backend).
"""

from __future__ import annotations

import warnings
from functools import cache

import torch

__all__ = ["load_error", "has_cuda_kernels", "warn_unavailable", "ops"]

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (without FUSED_MARGIN_NO_EXT=1)"
_warned = False


@cache
def load_error() -> str | None:
    """None when the extension is loaded (its ops registered), else why it is not."""
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except (ImportError, OSError) as error:
        return f"{type(error).__name__}: {error}"
    if not hasattr(torch.ops.fused_margin_C, "margin_lse_fwd"):  # pragma: no cover
        return "fused_margin._C loaded but registered no ops"
    return None


@cache
def has_cuda_kernels() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_margin_C::margin_lse_fwd", "CUDA")


def warn_unavailable(backend: str) -> None:
    """Warns, once per process, that the compiled backends are unavailable."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"fused_margin: the compiled extension fused_margin._C is not available ({load_error()}), so the "
        f"{backend!r} backend cannot run; backend='auto' falls back to the next backend (on CPU the eager "
        f"reference, which materializes the batch x classes logits). To get it, {_BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )


def unavailable_reason() -> str:
    return f"the compiled extension fused_margin._C is not available ({load_error()}); {_BUILD_HINT}"


def ops():
    """``torch.ops.fused_margin_C``, with the extension loaded (raises if it cannot be)."""
    error = load_error()
    if error is not None:
        raise RuntimeError(unavailable_reason())
    return torch.ops.fused_margin_C
