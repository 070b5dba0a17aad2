"""The documentation tests (``pytest --markdown-docs README.md docs``, part of ``make
test``): every fenced Python block of README.md and docs/*.md runs on the CPU, each with
fresh stand-ins for the names a training loop has (``embeddings``, ``labels``,
``weight``, ``backbone``, ``images``, ``loader``), small enough for a 2-core machine. A
block that cannot run here is fenced ``python notest`` and says why in its first line
(``tests/test_docs.py`` checks both)."""

from __future__ import annotations

import pytest

#: the stand-ins' sizes: a small batch, the examples' embedding size, a class count
#: that every example's head covers
BATCH, EMBEDDING_SIZE, CLASSES = 16, 512, 1000


# optional: where pytest-markdown-docs is not installed or not loaded (a machine without
# it, PYTEST_DISABLE_PLUGIN_AUTOLOAD=1), the suite still collects
@pytest.hookimpl(optionalhook=True)
def pytest_markdown_docs_globals() -> dict:
    import torch

    import fused_margin

    torch.manual_seed(0)
    images = torch.randn(BATCH, 3, 8, 8)
    labels = torch.randint(0, CLASSES, (BATCH,))
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, EMBEDDING_SIZE))
    loader = [(torch.randn(BATCH, 3, 8, 8), torch.randint(0, CLASSES, (BATCH,))) for _ in range(3)]
    return {
        "torch": torch,
        "fused_margin": fused_margin,
        "embeddings": torch.randn(BATCH, EMBEDDING_SIZE, requires_grad=True),
        "labels": labels,
        "weight": torch.randn(CLASSES, EMBEDDING_SIZE, requires_grad=True),
        "backbone": backbone,
        "images": images,
        "loader": loader,
    }
