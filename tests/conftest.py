import pytest
import torch


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
