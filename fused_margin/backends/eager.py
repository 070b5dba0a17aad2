"""The eager backend: the whole loss in plain PyTorch autograd, as a user writes it.

It runs outside the custom op (:attr:`Backend.autograd_native`): the (B, C) logits are
materialized and autograd differentiates through them, so it supports double backward
and ``torch.func`` transforms. With bf16/fp16 inputs of one dtype the (B, C) GEMM runs
in that dtype (tensor cores, as a user's ``F.linear`` does) and only the softmax side in
fp32. The benchmarks' eager baseline. Never chosen by ``'auto'``.
"""

from __future__ import annotations

from ..reference import margin_lse_terms
from . import Backend


class EagerBackend(Backend):
    name = "eager"
    autograd_native = True

    def terms(self, x, weight, labels, bias, class_index, row_threshold, params):
        # 16-bit GEMMs in the input dtype, the softmax in fp32
        return margin_lse_terms(x, weight, labels, bias, class_index, row_threshold, params, native_gemm=True)


BACKEND = EagerBackend()
