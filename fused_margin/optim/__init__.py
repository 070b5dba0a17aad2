"""Optimizers fused into the backward of the class weights (work in progress)."""

from __future__ import annotations

from .registry import lookup


def run_fused_backward(backend, grads, saved, params, handle: int):
    """The backward with the weight updated in place by its fused optimizer:
    ``(grad_x, grad_bias)``."""
    return lookup(handle).backward(backend, grads, saved, params)
