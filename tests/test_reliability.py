"""Bad values: NaN and inf propagate identically on every backend, ignored rows are not
part of the computation whatever they hold, rows of W outside ``class_index`` get
exactly zero gradient, running statistics stay fp32 and finite (README: "Bad values")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_margin.heads as heads
from fused_margin.functional import fused_terms
from tests.utils import HEAD_SPECS, assert_rel_close, loss_and_grads, make_inputs, tolerance

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
