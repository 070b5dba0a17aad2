"""The reference backend: eager PyTorch, materializes (B, C). Runs anywhere, any dtype."""

from __future__ import annotations

from ..reference import margin_lse_terms, reference_backward
from . import Backend


class ReferenceBackend(Backend):
    name = "reference"
    # Last resort for 'auto' on every device.
    auto_priority = {"cpu": 100, "cuda": 100, "meta": 100}

    def forward(self, x, weight, labels, bias, class_index, row_threshold, params):
        outputs = margin_lse_terms(x, weight, labels, bias, class_index, row_threshold, params)
        return tuple(t.detach() for t in outputs)

    def backward(self, grads, saved, params, update=None):
        return reference_backward(grads, saved, params)


BACKEND = ReferenceBackend()
