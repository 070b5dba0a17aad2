"""fused_margin: fused margin-based softmax heads without the (batch x classes) logits."""

from . import reference
from .backends import BackendUnavailableError, available_backends
from .functional import margin_cross_entropy
from .heads import *  # noqa: F403
from .heads import __all__ as _heads_all
from .kernel_params import KernelParams
from .spec import MarginSpec, NonTarget, NonTargetKind, TargetContext

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "KernelParams",
    "MarginSpec",
    "NonTarget",
    "NonTargetKind",
    "TargetContext",
    "available_backends",
    "margin_cross_entropy",
    "reference",
    *_heads_all,
]
