import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads
# TRITON_INTERPRET when a function is decorated (its own tl.* helpers when triton is
# first imported), so it must be set before anything imports triton: here, before any
# test module is collected (`import fused_margin` pulls triton in through torch._dynamo).
# `import torch` alone does not import triton, so probing CUDA here is safe.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _reseed():
    # Fresh random inputs per test, reproducible per test.
    torch.manual_seed(1234)
    yield


def pytest_collection_modifyitems(config, items):
    # GPU tests skip cleanly without CUDA (probed at run time, not at import).
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
