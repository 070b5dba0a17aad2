"""Bad values: NaN and inf propagate identically on every backend, ignored rows are not
part of the computation whatever they hold, rows of W outside ``class_index`` get
exactly zero gradient, running statistics stay fp32 and finite (docs/bad-values.md)."""

from __future__ import annotations

import math

import pytest
import torch

import fused_margin as fm
import fused_margin.heads as heads
from fused_margin import MarginSpec, NonTarget, NonTargetKind
from fused_margin.functional import fused_terms
from tests.utils import HEAD_SPECS, assert_rel_close, given, loss_and_grads, make_inputs, settings, st, tolerance

#: every backend CI can run (Triton under its interpreter), with the dtype each runs in
BACKENDS = {"cpu": torch.float64, "reference": torch.float64, "eager": torch.float64, "triton": torch.float32}
TOL = {dtype: tolerance("reliability", dtype) for dtype in (torch.float64, torch.float32)}
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _grads_all_finite(*grads) -> bool:
    return all(g is None or bool(torch.isfinite(g).all()) for g in grads)


# ---- non-finite values that take part propagate ---------------------------------------


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("where", ["embedding", "non_target_weight", "bias"])
def test_non_finite_input_gives_non_finite_loss(backend, value, where):
    # A class that is nobody's target still takes part as a negative: a bad value there
    # must not give 0.0 (an empty row) or a finite loss without that class.
    dtype = BACKENDS[backend]
    x, w, labels = make_inputs(6, 9, 7, dtype=dtype)
    labels = labels.clamp_max(7)  # class 8 is nobody's target
    bias = torch.randn(9, dtype=dtype) if where == "bias" else None
    spec = HEAD_SPECS["softmax" if where == "bias" else "arcface"]
    if where == "embedding":
        x[2, 3] = BAD[value]
    elif where == "non_target_weight":
        w[8, 1] = BAD[value]
    else:
        bias[8] = BAD[value]
    loss, dx, dw, db = loss_and_grads(x, w, labels, spec, backend=backend, bias=bias)
    assert not bool(torch.isfinite(loss)), f"{backend}: loss {float(loss)}"
    assert not _grads_all_finite(dx, dw, db)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_row_without_negatives_keeps_minus_inf(backend):
    # One class: lse_neg = -inf is the only "no term" value, and the loss stays finite (0).
    dtype = BACKENDS[backend]
    x, w, labels = make_inputs(4, 1, 5, dtype=dtype)
    loss, dx, dw, _ = loss_and_grads(x, w, labels, HEAD_SPECS["cosface"], backend=backend)
    assert bool(torch.isfinite(loss)) and _grads_all_finite(dx, dw)
    lse_neg = fused_terms(x, w, labels, HEAD_SPECS["cosface"], backend=backend)[0]
    assert bool((lse_neg == float("-inf")).all())


# ---- ignored rows ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("head", ["arcface", "softmax", "curricularface", "subcenter_arcface", "lsoftmax"])
def test_ignored_rows_are_not_part_of_the_computation(backend, value, head):
    dtype = BACKENDS[backend]
    spec = HEAD_SPECS[head]
    batch, ignored = 7, 3
    x, w, labels = make_inputs(batch, 11, 9, num_subcenters=spec.num_subcenters, dtype=dtype, ignore_rows=ignored,
                               peaked_rows=1)
    bias = torch.randn(11, dtype=dtype) if head == "softmax" else None
    x[-ignored:] = BAD[value]  # garbage padding rows
    x[-2, 0] = 1.0
    upstream = torch.randn(batch, dtype=dtype)
    loss, dx, dw, db = loss_and_grads(x, w, labels, spec, backend=backend, bias=bias, upstream=upstream)
    # exactly zero, elementwise, beside the relative checks below
    assert torch.equal(loss[-ignored:], torch.zeros_like(loss[-ignored:]))
    assert torch.equal(dx[-ignored:], torch.zeros_like(dx[-ignored:]))
    # the same as the batch without those rows, in float64 on the reference
    keep = slice(0, batch - ignored)
    b64 = None if bias is None else bias.double()
    ref = loss_and_grads(x[keep].double(), w.double(), labels[keep], spec, backend="reference", bias=b64,
                         upstream=upstream[keep].double())
    tol = TOL[dtype]
    assert_rel_close(loss[keep], ref[0], tol, f"{backend} loss")
    assert_rel_close(dx[keep], ref[1], tol, f"{backend} dx")
    assert_rel_close(dw, ref[2], tol, f"{backend} dW")
    if bias is not None:
        assert_rel_close(db, ref[3], tol, f"{backend} dbias")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_all_rows_ignored(backend):
    dtype = BACKENDS[backend]
    x, w, labels = make_inputs(4, 5, 6, dtype=dtype, ignore_rows=4)
    x[1] = float("nan")
    loss, dx, dw, _ = loss_and_grads(x, w, labels, HEAD_SPECS["arcface"], backend=backend)
    assert float(loss) == 0.0
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


# ---- rows of W outside class_index -----------------------------------------------------


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_weight_rows_outside_class_index(backend):
    # Rows not in use take no part, whatever they hold: their gradient is exactly 0 and
    # the rest equals the float64 reference on the gathered rows.
    dtype = BACKENDS[backend]
    spec = HEAD_SPECS["subcenter_arcface"]
    k = spec.num_subcenters
    x, w, labels = make_inputs(9, 13, 6, num_subcenters=k, dtype=dtype, ignore_rows=2)
    class_index = torch.tensor([11, 2, 7, 0, 5])
    labels = torch.where(labels >= 0, labels % 5, labels)
    unused = torch.ones(13, dtype=torch.bool)
    unused[class_index] = False
    w.view(13, k, -1)[unused] = float("nan")
    loss, dx, dw, _ = loss_and_grads(x, w, labels, spec, backend=backend, class_index=class_index)
    assert torch.equal(dw.view(13, k, -1)[unused], torch.zeros_like(dw.view(13, k, -1)[unused]))
    rows = (class_index[:, None] * k + torch.arange(k)).reshape(-1)
    ref = loss_and_grads(x.double(), w.double()[rows], labels, spec, backend="reference")
    tol = TOL[dtype]
    assert_rel_close(loss, ref[0], tol, f"{backend} loss")
    assert_rel_close(dx, ref[1], tol, f"{backend} dx")
    assert_rel_close(dw[rows], ref[2], tol, f"{backend} dW")


# ---- random positions (hypothesis) -----------------------------------------------------


@st.composite
def _injections(draw):
    batch = draw(st.integers(2, 8))
    num_classes = draw(st.integers(2, 9))
    ignored = draw(st.integers(0, batch - 1))  # at least one row takes part
    sampled = draw(st.booleans())
    positions = draw(st.lists(
        st.tuples(st.sampled_from(["used_row", "ignored_row", "class", "unused_class", "bias"]),
                  st.integers(0, 10**6), st.sampled_from(sorted(BAD))),
        min_size=0, max_size=3,
    ))
    head = draw(st.sampled_from(["arcface", "softmax", "subcenter_arcface", "so_softmax", "curricularface"]))
    return batch, num_classes, ignored, sampled, positions, head, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=30, deadline=None)
@given(case=_injections())
def test_injected_non_finite_values_agree_with_reference(case):
    batch, num_classes, ignored, sampled, positions, head, seed = case
    torch.manual_seed(seed)
    spec = HEAD_SPECS[head]
    k = spec.num_subcenters
    dim = 5
    x, w, labels = make_inputs(batch, num_classes, dim, num_subcenters=k, ignore_rows=ignored)
    bias = torch.randn(num_classes, dtype=torch.float64) if head == "softmax" else None
    class_index = None
    in_use = list(range(num_classes))
    if sampled and num_classes > 2:
        class_index = torch.randperm(num_classes)[: num_classes - 1]
        in_use = class_index.tolist()
        labels = torch.where(labels >= 0, labels % (num_classes - 1), labels)
    unused = sorted(set(range(num_classes)) - set(in_use))
    used_rows = list(range(batch - ignored))
    ignored_rows = list(range(batch - ignored, batch))
    for kind, r, value in positions:
        v = BAD[value]
        if kind == "used_row":
            x[used_rows[r % len(used_rows)], r % dim] = v
        elif kind == "ignored_row" and ignored_rows:
            x[ignored_rows[r % len(ignored_rows)], r % dim] = v
        elif kind == "class":
            w[in_use[r % len(in_use)] * k + r % k, r % dim] = v
        elif kind == "unused_class" and unused:
            w[unused[r % len(unused)] * k + r % k, r % dim] = v
        elif kind == "bias" and bias is not None:
            bias[r % num_classes] = v
    upstream = torch.randn(batch, dtype=torch.float64)
    kwargs = dict(bias=bias, class_index=class_index, upstream=upstream)
    ref = loss_and_grads(x, w, labels, spec, backend="reference", **kwargs)
    for backend, dtype in BACKENDS.items():
        if backend == "reference":
            continue
        cast = {key: (t.to(dtype) if t is not None and t.is_floating_point() else t) for key, t in kwargs.items()}
        got = loss_and_grads(x.to(dtype), w.to(dtype), labels, spec, backend=backend, **cast)
        what = f"{backend} {head} {positions}"
        assert torch.equal(torch.isfinite(got[0]), torch.isfinite(ref[0])), f"{what}: loss {got[0]} vs {ref[0]}"
        for name, g, r in zip(("dx", "dW", "dbias"), got[1:], ref[1:]):
            if r is None:
                continue
            if backend == "eager" and not bool(torch.isfinite(ref[0]).all()):
                # autograd through the materialized logits: with a non-finite loss it can
                # give NaN (0 * inf) where the fused backward's formula is finite
                continue
            assert bool(torch.isfinite(g).all()) == bool(torch.isfinite(r).all()), f"{what}: {name} finiteness"
            if bool(torch.isfinite(r).all()):
                assert_rel_close(g, r, TOL[dtype], f"{what} {name}", atol=TOL[dtype])
        finite = torch.isfinite(ref[0])
        assert_rel_close(got[0][finite], ref[0][finite], TOL[dtype], f"{what} loss", atol=TOL[dtype])
        assert torch.equal(got[1][ignored_rows], torch.zeros_like(got[1][ignored_rows])), f"{what}: ignored dx"
        if unused and class_index is not None:
            rows = (torch.tensor(unused)[:, None] * k + torch.arange(k)).reshape(-1)
            assert torch.equal(got[2][rows], torch.zeros_like(got[2][rows])), f"{what}: unused rows of dW"


# ---- the same on a GPU ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_non_finite_and_ignored_rows(backend, dtype):
    spec = HEAD_SPECS["arcface"]
    x, w, labels = make_inputs(37, 1003, 67, dtype=torch.float64, ignore_rows=5)
    labels = torch.where(labels >= 0, labels.clamp_max(1001), labels)  # class 1002 is nobody's target
    x[-5:] = float("nan")
    upstream = torch.randn(37, dtype=torch.float64)
    keep = slice(0, 32)
    # the reference on the same rounded inputs: only the kernel's own error is measured
    x, w, upstream = x.to(dtype).double(), w.to(dtype).double(), upstream.to(dtype).double()
    ref = loss_and_grads(x[keep], w, labels[keep], spec, backend="reference", upstream=upstream[keep])
    got = loss_and_grads(x.cuda().to(dtype), w.cuda().to(dtype), labels.cuda(), spec, backend=backend,
                         upstream=upstream.cuda().to(dtype))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert torch.equal(got[1][-5:].cpu(), torch.zeros(5, 67, dtype=dtype))
    assert_rel_close(got[1][keep].cpu(), ref[1], tol, "dx")
    assert_rel_close(got[2].cpu(), ref[2], tol, "dW")
    w_bad = w.clone()
    w_bad[1002, 3] = float("nan")
    got = loss_and_grads(x.cuda().to(dtype), w_bad.cuda().to(dtype), labels.cuda(), spec, backend=backend,
                         upstream=upstream.cuda().to(dtype))
    assert not bool(torch.isfinite(got[0][keep]).any())
    assert not bool(torch.isfinite(got[2]).all())


# ---- head state ---------------------------------------------------------------------------


HEAD_CLASSES = sorted(name for name in heads.__all__ if name not in ("MarginHead", "SpecHead"))  # the heads, not their bases
STATEFUL = {"CurricularFaceLoss": ("t",), "AdaFaceLoss": ("batch_mean", "batch_std")}


def _state(head) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in head.named_buffers() if buf.is_floating_point()}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_ignores_a_non_finite_batch(name):
    head = getattr(heads, name)(11, 8, backend="cpu")
    x, _, labels = make_inputs(9, 11, 8, dtype=torch.float32, ignore_rows=2)
    x = x * 10.0  # norms around 28 (AdaFace's statistics start at 20, 100)
    head(x, labels)
    before = _state(head)
    assert any(not torch.equal(before[key], torch.tensor(init, dtype=torch.float32))
               for key, init in head._STATE_INIT.items() if key in before), "a finite batch moves the state"
    for value in ("nan", "inf"):
        bad = x.clone()
        bad[3, 2] = BAD[value]  # a labelled row
        loss = head(bad, labels)
        assert not bool(torch.isfinite(loss))
        after = _state(head)
        for key in STATEFUL[name]:
            assert torch.equal(after[key], before[key]), f"{key} moved on a {value} batch"
            assert after[key].dtype == torch.float32


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_skips_ignored_rows_holding_garbage(name):
    x, _, labels = make_inputs(9, 11, 8, dtype=torch.float32, ignore_rows=3)
    x = x * 10.0
    clean = getattr(heads, name)(11, 8, backend="cpu")
    garbage = getattr(heads, name)(11, 8, backend="cpu")
    garbage.load_state_dict(clean.state_dict())
    clean(x[:6], labels[:6])
    dirty = x.clone()
    dirty[6:] = float("nan")
    dirty[7] = float("inf")
    loss = garbage(dirty, labels)
    assert bool(torch.isfinite(loss))
    for key in STATEFUL[name]:
        # the same rows summed with zeros in between: rounding only
        torch.testing.assert_close(getattr(garbage, key), getattr(clean, key), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_float16"])
@pytest.mark.parametrize("name", HEAD_CLASSES)
def test_cast_head_keeps_fp32_state_and_trains(name, cast):
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64,
             "to_float16": torch.float16}[cast]
    head = getattr(heads, name)(7, 6, backend="cpu")
    head = head.to(dtype) if cast.startswith("to_") else getattr(head, cast)()
    built = getattr(heads, name)(7, 6, backend="cpu", dtype=dtype)
    assert head.weight.dtype == dtype
    state = {key: buf.dtype for key, buf in head.named_buffers()}
    assert state == {key: buf.dtype for key, buf in built.named_buffers()}
    assert all(d in (torch.float32, torch.int64) for d in state.values()), state
    x, _, labels = make_inputs(5, 7, 6, dtype=dtype)
    x = (x * 10.0).requires_grad_()
    for _ in range(2):  # the state updated once is read by the second step
        loss = head(x, labels)
        loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(head.weight.grad).all())
    assert all(bool(torch.isfinite(buf).all()) for buf in head.buffers())
    assert {key: buf.dtype for key, buf in head.named_buffers()} == state


# ---- one class, label smoothing ---------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_one_class_with_label_smoothing_is_exactly_zero(backend):
    """F.cross_entropy gives exactly 0 with one class, label smoothing or not."""
    dtype = BACKENDS[backend]
    x, w, labels = make_inputs(6, 1, 5, dtype=dtype)
    x.requires_grad_(True)
    loss = fm.margin_cross_entropy(x, w, labels, HEAD_SPECS["arcface"], label_smoothing=0.1, reduction="none",
                                   backend=backend)
    torch_loss = torch.nn.functional.cross_entropy(torch.randn(6, 1, dtype=dtype), labels.clamp_min(0),
                                                   label_smoothing=0.1, reduction="none")
    assert torch.equal(torch_loss, torch.zeros_like(torch_loss))
    assert torch.equal(loss.detach(), torch.zeros_like(loss)), f"{backend}: {loss.tolist()}"


# ---- D = 1: the gradient is exactly 0, the fp32 result is rounding ---------------------


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_one_dimensional_embeddings_gradient_bound(backend):
    """With D = 1 the normalized embedding is a constant (+-1): the exact gradient is 0.
    Each term of the computed one is a difference that vanishes only in exact arithmetic,
    times the target's derivative, which at c = 1 - ulp is s (cos m + sin m / sin theta),
    sin theta = sqrt(2 ulp): ~1400 s in fp32 (ArcFace, m = 0.5). So in fp32 every backend,
    the fp32 reference too, leaves up to a few ulps of that: |dx_b| <= 32 ulp r_b s
    (2 + sin m / sqrt(2 ulp)) / B; in float64 the same is ~1e-14 (docs/bad-values.md)."""
    spec, s, m = HEAD_SPECS["subcenter_arcface"], 64.0, 0.5
    for dtype in (torch.float32, torch.float64) if backend != "triton" else (torch.float32,):
        eps = torch.finfo(dtype).eps
        for seed in range(4):
            torch.manual_seed(seed)
            x, w, labels = torch.randn(8, 1, dtype=dtype), torch.randn(50 * 3, 1, dtype=dtype), torch.randint(0, 50, (8,))
            x.requires_grad_(True)
            fm.margin_cross_entropy(x, w, labels, spec, backend=backend).backward()
            bound = 32 * eps * s * (2 + math.sin(m) / math.sqrt(2 * eps)) / x.abs().detach() / 8
            assert bool((x.grad.abs() <= bound).all()), f"{backend} {dtype} seed {seed}: {x.grad.flatten().tolist()}"


# ---- a custom target's result -----------------------------------------------------------


def _target_in(dtype, device=None):
    def target(ctx):
        return (30.0 * (ctx.cos - 0.2)).to(dtype=dtype, device=device)

    return target


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_lower_precision_target_is_upcast(backend):
    """A bf16 (or fp16) target with fp32 inputs: the loss stays fp32, computed from the
    target's values (their bf16 rounding is the target's own)."""
    x, w, labels = make_inputs(7, 11, 6, dtype=torch.float32, ignore_rows=1)
    want = fm.margin_cross_entropy(x, w, labels, MarginSpec(30.0, lambda ctx: _target_in(torch.bfloat16)(ctx).float(),
                                                            NonTarget(NonTargetKind.IDENTITY)), backend=backend)
    for dtype in (torch.bfloat16, torch.float16):
        got = fm.margin_cross_entropy(x, w, labels, MarginSpec(30.0, _target_in(dtype), NonTarget(NonTargetKind.IDENTITY)),
                                      backend=backend, label_smoothing=0.0)
        assert got.dtype == torch.float32
        if dtype == torch.bfloat16:
            assert torch.equal(got, want)


def test_target_on_another_device_is_refused_naming_it():
    x, w, labels = make_inputs(5, 9, 4, dtype=torch.float32)
    spec = MarginSpec(30.0, _target_in(torch.float32, "meta"), NonTarget(NonTargetKind.IDENTITY))
    with pytest.raises(ValueError, match=r"target .*target must return a tensor on cpu .* got one on meta"):
        fm.margin_cross_entropy(x, w, labels, spec, backend="cpu")


# ---- ShardedMarginLoss's arguments --------------------------------------------------------


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


SHARDED_BAD = [
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer, got 1.5"),
    (dict(ignore_index=True), TypeError, "ignore_index must be an integer, got True"),
    (dict(seed="a"), TypeError, "seed must be an integer, got 'a'"),
    (dict(seed=2.0), TypeError, "seed must be an integer, got 2.0"),
    (dict(return_accuracy="yes"), ValueError, "return_accuracy must be True or False, got 'yes'"),
    (dict(sample_rate=True), TypeError, "sample_rate must be a real number, got True"),
    (dict(sample_rate=0.0), ValueError, r"sample_rate must lie in \(0, 1\], got 0.0"),
    (dict(label_smoothing=True), TypeError, "label_smoothing must be a real number, got True"),
    (dict(backend="nope"), ValueError, "backend must be one of .* got 'nope'"),
    (dict(embedding_grad="mean"), ValueError, "embedding_grad must be one of"),
    (dict(timeout=0), ValueError, "timeout must be positive"),
    (dict(num_classes=10.0), TypeError, "num_classes must be an integer, got 10.0"),
    (dict(embedding_size=True), TypeError, "embedding_size must be an integer, got True"),
]


@pytest.mark.parametrize(("change", "error", "match"), SHARDED_BAD, ids=[str(c) for c, _, _ in SHARDED_BAD])
def test_sharded_head_checks_its_arguments(one_process_group, change, error, match):
    from fused_margin.distributed import ShardedMarginLoss

    kwargs = dict(num_classes=10, embedding_size=4, backend="cpu") | change
    with pytest.raises(error, match=match):
        ShardedMarginLoss(MarginSpec.cosface(), **kwargs)


def test_sharded_head_takes_numpy_and_tensor_scalars(one_process_group):
    import numpy as np

    from fused_margin.distributed import ShardedMarginLoss

    head = ShardedMarginLoss(MarginSpec.cosface(), np.int64(10), torch.tensor(4), ignore_index=np.int32(-1),
                             sample_rate=np.float32(0.5), label_smoothing=torch.tensor(0.1), seed=torch.tensor(3),
                             timeout=np.float64(30.0), backend="cpu")
    assert (head.num_classes, head.embedding_size, head.ignore_index, head.seed) == (10, 4, -1, 3)
    assert type(head.ignore_index) is int and type(head.seed) is int and head.sample_rate == 0.5
    x, labels = torch.randn(6, 4), torch.tensor([0, 1, -1, 3, 1, 9])
    loss = head(x, labels)
    assert bool(torch.isfinite(loss))
