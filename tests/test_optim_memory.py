"""The memory the optimizer in the backward saves, measured in fresh processes: at
C = 262144, D = 512, fp32, SGD with momentum, a training step's peak is at least
0.9 * C * D * 4 bytes (the weight gradient that is never formed) below the step with
the optimizer after the backward."""

from __future__ import annotations

import argparse
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (Linux)")
def test_sgd_step_in_backward_saves_the_weight_gradient():
    from bench import optim_memory

    args = argparse.Namespace(device="cpu", backend="cpu", classes=262144, dim=512, batch=64, steps=2,
                              optimizers="sgd", timeout=900.0)
    [row] = optim_memory.measure(args)["rows"]
    assert row["plain"]["status"] == "ok" and row["fused"]["status"] == "ok", row
    assert row["plain"]["weight_finite"] and row["fused"]["weight_finite"]
    weight_bytes = 262144 * 512 * 4
    assert row["saved_bytes"] >= 0.9 * weight_bytes, (
        f"saved {row['saved_bytes'] / 2**20:.0f} MiB, expected at least {0.9 * weight_bytes / 2**20:.0f} MiB"
    )
