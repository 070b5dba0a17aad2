"""Margin-free logits for inference: what a trained head predicts with."""

from __future__ import annotations

import torch
from torch import Tensor

from .kernel_params import acc_dtype
from .spec import MarginSpec

__all__ = ["margin_free_logits"]

#: the floor of a norm before its reciprocal (a zero row gives zero logits, not NaN)
_NORM_EPS = 1e-12


def margin_free_logits(embeddings: Tensor, weight: Tensor, spec: MarginSpec, bias: Tensor | None = None) -> Tensor:
    """``s * u + bias`` (B, C), with ``u`` the cosine (or the dot product on a side the spec
    does not normalize) and the max over each class's sub-centers. Materializes B x C, in
    the accumulation dtype (float32, float64 for a float64 input); differentiable."""
    dtype = acc_dtype(embeddings, weight)
    x, w = embeddings.to(dtype), weight.to(dtype)
    u = x @ w.T
    if spec.normalize_embeddings:
        u = u * (1.0 / torch.linalg.vector_norm(x, dim=1).clamp_min(_NORM_EPS))[:, None]
    if spec.normalize_weight:
        u = u * (1.0 / torch.linalg.vector_norm(w, dim=1).clamp_min(_NORM_EPS))[None, :]
    k = spec.num_subcenters
    if k > 1:
        u = u.view(u.shape[0], u.shape[1] // k, k).amax(dim=2)
    z = spec.scale * u
    if bias is not None:
        z = z + bias.to(z.dtype)
    return z
