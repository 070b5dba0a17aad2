"""One rule per kind of argument, shared by every constructor and function.

Each takes the argument's name as the user wrote it and the value, and returns the
value as a plain Python number (or raises a ``TypeError`` / ``ValueError`` naming the
argument and the bad value). numpy scalars and 0-dim tensors are accepted wherever a
Python number is: integers through ``operator.index``, reals through ``numbers.Real``.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable

import torch

__all__ = [
    "flag", "integer", "optional_integer", "positive_integer", "real", "positive", "non_negative", "in_range",
    "choice", "backend", "reduction", "label_smoothing", "REDUCTIONS",
]

#: the loss reductions every loss function and head accepts
REDUCTIONS = ("mean", "sum", "none")


def _scalar(value: object) -> object:
    # a 0-dim tensor or array stands for its value (a host read: constructor time only)
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        if getattr(value, "ndim", None) == 0 and not isinstance(value, bool):
            dtype = value.dtype
            if dtype != torch.bool and str(dtype) != "bool":
                return value.item()
    return value


def flag(name: str, value: object) -> bool:
    """``True`` or ``False`` (not a number standing for one)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def integer(name: str, value: object) -> int:
    """An integer (``int``, numpy integer, 0-dim integer tensor); 1.5 and booleans are refused."""
    value = _scalar(value)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def optional_integer(name: str, value: object) -> int | None:
    """None, or an integer as :func:`integer` takes it."""
    return None if value is None else integer(name, value)


def positive_integer(name: str, value: object) -> int:
    result = integer(name, value)
    if result < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return result


def real(name: str, value: object) -> float:
    """A finite real number (``int``, ``float``, numpy scalar, 0-dim real tensor)."""
    scalar = _scalar(value)
    if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    result = float(scalar)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return result


def positive(name: str, value: object) -> float:
    result = real(name, value)
    if result <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return result


def non_negative(name: str, value: object) -> float:
    result = real(name, value)
    if result < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return result


def in_range(name: str, value: object, low: float, high: float, *, low_open: bool = False,
             high_open: bool = True) -> float:
    """A finite real in ``[low, high)`` (the default), ``(low, high]``, ..."""
    result = real(name, value)
    above = result > low if low_open else result >= low
    below = result < high if high_open else result <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return result


def choice(name: str, value: object, options: Iterable[str]) -> str:
    options = list(options)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def backend(value: object) -> str:
    """A backend name: ``'auto'`` or a registered backend (whether or not it can run here:
    that is decided with the inputs, at the forward)."""
    from .backends import available_backends  # the registry imports more than this module should

    return choice("backend", value, ["auto", *available_backends()])


def reduction(value: object) -> str:
    """A loss reduction: ``'mean'``, ``'sum'`` or ``'none'``."""
    if not isinstance(value, str) or value not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {value!r}")
    return value


def label_smoothing(value: object) -> float:
    """A label smoothing factor, a finite real in ``[0, 1)``."""
    # a Python number in range needs no conversion (and traces as a constant when compiled)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0:
        return float(value)
    return in_range("label_smoothing", value, 0.0, 1.0)
