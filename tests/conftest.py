import datetime
import os
import signal

import pytest
import torch
import torch.distributed as dist

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads
# TRITON_INTERPRET when a function is decorated (its own tl.* helpers when triton is
# first imported), so it must be set before anything imports triton: here, before any
# test module is collected (`import fused_margin` pulls triton in through torch._dynamo).
# `import torch` alone does not import triton, so probing CUDA here is safe.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

#: FUSED_MARGIN_TEST_TIMEOUT=seconds: a test running longer fails (SIGALRM in the main
#: thread), so that one slow JIT compilation cannot eat a time-capped run. Built in, as
#: the machines that need it may lack pytest-timeout.
TEST_TIMEOUT_S = float(os.environ.get("FUSED_MARGIN_TEST_TIMEOUT", "0") or 0)
#: FUSED_MARGIN_TEST_SHARD=i/n: run only every n-th collected test, from the i-th (0-based):
#: n pytest processes side by side without pytest-xdist.
TEST_SHARD = os.environ.get("FUSED_MARGIN_TEST_SHARD", "")


@pytest.fixture(autouse=True)
def _reseed():
    # Fresh random inputs per test, reproducible per test.
    torch.manual_seed(1234)
    yield


@pytest.fixture
def world_of_one(tmp_path):
    """A Gloo process group of one process, this one, for the test's duration."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    i, n = int(index), int(count)
    if not 0 <= i < n:
        raise pytest.UsageError(f"FUSED_MARGIN_TEST_SHARD must be i/n with 0 <= i < n, got {text!r}")
    return i, n


def pytest_collection_modifyitems(config, items):
    # GPU tests skip cleanly without CUDA (probed at run time, not at import).
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if TEST_SHARD:
        i, n = _shard(TEST_SHARD)
        keep = [item for k, item in enumerate(items) if k % n == i]
        config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % n != i])
        items[:] = keep


class _TestTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if TEST_TIMEOUT_S <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise _TestTimeout(f"{item.nodeid} ran past FUSED_MARGIN_TEST_TIMEOUT={TEST_TIMEOUT_S:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
