"""Micro-benchmarks (pytest-benchmark): forward + backward of the CosFace loss per
backend at one CPU shape, beside the eager baseline and the three-GEMM floor.

    .venv/bin/python -m pytest bench --benchmark-only

Not part of ``make test`` (which runs ``pytest tests``). Every registered backend is a
case; one that cannot run here is skipped with its own reasons.
"""

from __future__ import annotations

import pytest
import torch

import fused_margin as fm
from fused_margin.backends import get_backend
from fused_margin.kernel_params import KernelParams

BATCH, CLASSES, DIM = 128, 8192, 256
SPEC = fm.MarginSpec.cosface()
#: three GEMMs of 2*B*C*D FLOPs: logits, dX, dW (the useful work; see bench_loss.py)
USEFUL_FLOPS = 6 * BATCH * CLASSES * DIM
GROUP = f"cosface B={BATCH} C={CLASSES} D={DIM} float32"


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, DIM, generator=gen)
    w = torch.randn(CLASSES, DIM, generator=gen) * 0.01
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return x, w, labels


@pytest.mark.parametrize("impl", fm.available_backends())
def test_forward_backward(benchmark, inputs, impl):
    x, w, labels = inputs
    reasons = get_backend(impl).not_supported_reasons(x, w, KernelParams.from_spec(SPEC))
    if reasons:
        pytest.skip("; ".join(reasons))
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def step() -> torch.Tensor:
        xr.grad = wr.grad = None
        loss = fm.margin_cross_entropy(xr, wr, labels, SPEC, backend=impl)
        loss.backward()
        return loss.detach()

    benchmark.group = GROUP
    benchmark.extra_info.update(useful_flops=USEFUL_FLOPS, batch=BATCH, classes=CLASSES, dim=DIM)
    loss = benchmark(step)
    expected = fm.margin_cross_entropy(x.double(), w.double(), labels, SPEC, backend="eager")
    assert abs(loss.item() - expected.item()) <= 1e-4 * abs(expected.item())


def test_gemm_floor(benchmark, inputs):
    """The floor: the three GEMMs of the same shapes, with a dense stand-in gradient."""
    x, w, _ = inputs
    grad_logits = torch.randn(BATCH, CLASSES, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        torch.mm(x, w.T)
        torch.mm(grad_logits, w)
        torch.mm(grad_logits.T, x)

    benchmark.group = GROUP
    benchmark.extra_info.update(useful_flops=USEFUL_FLOPS)
    benchmark(step)
