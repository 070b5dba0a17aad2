"""The custom op: torch.library.opcheck, and torch.compile(fullgraph=True) of a training
step with a fused head (no graph break), on the CPU backends."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fused_margin as fm
from fused_margin.kernel_params import IGNORED_LABEL, KernelParams
from fused_margin.ops import margin_lse, prepare_labels
from tests.utils import HEAD_SPECS, assert_rel_close, op_samples


@pytest.mark.parametrize("args", op_samples("reference"))
def test_opcheck(args):
    torch.library.opcheck(margin_lse, args)


def test_opcheck_prepare_labels():
    torch.library.opcheck(prepare_labels, (torch.tensor([0, 3, -100, 2]), 4, -100))
    torch.library.opcheck(prepare_labels, (torch.tensor([0, 3, -100, 2]), 4, -100, torch.tensor([7, 0, 2, 9]), 10))


def _auto_cpu_backend() -> str:
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    from fused_margin.backends import resolve_backend

    return resolve_backend("auto", x, w, KernelParams.from_spec(HEAD_SPECS["cosface"]))


# The annealed heads (SphereFace, L-Softmax) read the step buffer that the training
# forward increments: their compiled backward must still see this step's lambda.
# CurricularFace updates its t buffer in the graph (no host sync, no graph break).
COMPILABLE_HEADS = [
    fm.CSSoftmaxLoss,
    fm.CurricularFaceLoss,
    fm.SphereFaceLoss,
    fm.LSoftmaxLoss,
    fm.AdaFaceLoss,
    fm.SubCenterArcFaceLoss,
    fm.SoftmaxLoss,
]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("head_cls", COMPILABLE_HEADS, ids=lambda c: getattr(c, "__name__", str(c)))
def test_compile_fullgraph_training_step(backend, head_cls):
    """The forward of a training step (backbone + fused head) compiles with
    fullgraph=True — the op is opaque to Dynamo, so there is no graph break — into one
    graph that the step counter does not recompile, and its gradients (through the
    registered backward) match the uncompiled step's."""
    torch._dynamo.reset()
    counters.clear()
    backbone = torch.nn.Linear(8, 5)
    head = head_cls(13, 5, backend=backend)
    params = list(backbone.parameters()) + list(head.parameters())
    x = torch.randn(9, 8)
    labels = torch.randint(0, 13, (9,))
    labels[3] = -100

    def forward(inputs, targets):
        return head(backbone(inputs), targets)

    def step(fn):
        for p in params:
            p.grad = None
        loss = fn(x, labels)
        loss.backward()  # AOTAutograd's compiled backward calls the backward op
        return loss.detach(), [p.grad.clone() for p in params]

    initial_state = {name: buffer.clone() for name, buffer in head.named_buffers()}
    eager_loss, eager_grads = step(forward)
    # aot_eager: Dynamo + AOTAutograd (fake kernels, the registered backward) without
    # Inductor's C++ compile time; fullgraph=True fails on any graph break.
    for name, buffer in head.named_buffers():  # the step counter, CurricularFace's t
        buffer.copy_(initial_state[name])
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grads = step(compiled)
    assert_rel_close(compiled_loss, eager_loss, 1e-6, "loss")
    for a, b in zip(compiled_grads, eager_grads):
        assert_rel_close(a, b, 1e-5, "grad")
    for _ in range(3):
        step(compiled)
    assert int(head.step) == 4
    assert counters["stats"]["unique_graphs"] == 1



@pytest.mark.parametrize("head_cls", [fm.ArcFaceLoss, fm.CurricularFaceLoss], ids=lambda c: c.__name__)
def test_compile_fullgraph_eager_backend(head_cls):
    """backend='eager' runs outside the custom op; looking its backend up in the registry
    traces as a constant, so the loss still compiles with fullgraph=True, and its
    gradients match the uncompiled ones."""
    torch._dynamo.reset()
    head = head_cls(11, 6, backend="eager").double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    labels[2] = -100
    upstream = torch.rand((), dtype=torch.float64) + 0.5
    initial_state = {name: buffer.clone() for name, buffer in head.named_buffers()}

    def step(fn):
        x.grad = head.weight.grad = None
        loss = fn(x, labels)
        loss.backward(upstream)
        return loss.detach(), x.grad.clone(), head.weight.grad.clone()

    want = step(head)
    for name, buffer in head.named_buffers():
        buffer.copy_(initial_state[name])
    got = step(torch.compile(head, fullgraph=True, backend="aot_eager"))
    for what, a, b in zip(("loss", "dx", "dW"), got, want):
        assert_rel_close(a, b, 1e-10, what)


def test_auto_resolves_on_cpu():
    assert _auto_cpu_backend() in fm.available_backends()


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="this torch has no cudagraph_unsafe tag")
def test_label_checks_stay_out_of_cuda_graphs():
    """prepare_labels reads the labels on the host (a sync, which CUDA-graph capture
    forbids): it carries the cudagraph_unsafe tag, so Inductor's cudagraphs
    (torch.compile(mode='reduce-overhead')) leave it out instead of failing in capture.
    The fused op itself has no host sync and no tag."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, labels = torch.randn(6, 4), torch.randn(9, 4), torch.tensor([0, 8, -100, 3, 3, 1])
    graph = make_fx(lambda x, w, y: fm.margin_cross_entropy(x, w, y, HEAD_SPECS["cosface"], backend="reference"))(
        x, w, labels
    )
    node = get_first_incompatible_cudagraph_node(graph)
    assert node is not None and node.target == torch.ops.fused_margin.prepare_labels.default, node
    assert torch.Tag.cudagraph_unsafe not in torch.ops.fused_margin.margin_lse.default.tags


@pytest.fixture
def device_label_checks():
    from fused_margin import ops

    ops.set_label_checks("device")
    yield
    ops._label_checks = None


def test_device_label_checks_keep_the_values(device_label_checks):
    """``set_label_checks('device')`` (no host sync: ``torch._assert_async``) gives the
    labels and the loss of the default host checks, and still refuses a bad label or
    class_index entry (on the CPU the device check raises at once; on a GPU it stops the
    stream)."""
    from fused_margin import ops

    labels = torch.tensor([3, -100, 0, 12])
    assert ops.label_checks() == "device"
    assert prepare_labels(labels, 13, -100).tolist() == [3, IGNORED_LABEL, 0, 12]
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 13\)"):
        prepare_labels(torch.tensor([3, 13]), 13, -100)
    with pytest.raises(RuntimeError, match=r"class_index entries must lie in \[0, 20\)"):
        prepare_labels(labels, 13, -100, torch.tensor([0, 20]), 20)
    x, w = torch.randn(4, 5), torch.randn(13, 5)
    on_device = fm.margin_cross_entropy(x, w, labels, HEAD_SPECS["arcface"], backend="reference")
    ops._label_checks = None
    assert torch.equal(on_device, fm.margin_cross_entropy(x, w, labels, HEAD_SPECS["arcface"], backend="reference"))


def test_label_check_mode_is_validated(monkeypatch):
    from fused_margin import ops

    with pytest.raises(ValueError, match="'host', 'device'"):
        ops.set_label_checks("never")
    monkeypatch.setenv("FUSED_MARGIN_LABEL_CHECKS", "sometimes")
    with pytest.raises(ValueError, match="FUSED_MARGIN_LABEL_CHECKS"):
        ops.label_checks()


@pytest.mark.gpu
def test_device_label_checks_do_not_synchronize(device_label_checks):
    """With 'device' checks a CUDA training step makes no host synchronization."""
    x = torch.randn(64, 32, device="cuda", requires_grad=True)
    w = torch.randn(1000, 32, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device="cuda")
    fm.margin_cross_entropy(x, w, labels, HEAD_SPECS["arcface"]).backward()  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        fm.margin_cross_entropy(x, w, labels, HEAD_SPECS["arcface"]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
