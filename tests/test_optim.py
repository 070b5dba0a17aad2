"""The optimizer in the backward (fused_margin.optim) against torch.optim.

A weight trained with ``apply_optimizer_in_backward`` must end where the same weight
trained with the plain optimizer (``foreach=False``) ends, from the same data, step after
step, with the optimizer state equal too; and the rules (no gradient accumulation, no
GradScaler, non-finite inputs skip the step, ...) each raise or hold as documented.
"""

from __future__ import annotations

import copy
import gc
import os
import warnings

import pytest
import torch
from torch import nn

import fused_margin as fm
from fused_margin import optim as fopt
from fused_margin.backends import get_backend
from fused_margin.backends.reference import ReferenceBackend
from fused_margin.kernel_params import IGNORED_LABEL, KernelParams, SavedTensors, UpstreamGrads
from fused_margin.optim import _backward
from fused_margin.optim.update import GUARD_NON_FINITE_GRADIENT, apply_update_
from fused_margin.reference import margin_lse_terms, reference_backward
from tests.utils import HEAD_SPECS, assert_rel_close, rows_in_use

TOL = 1e-5
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

SGD, ADAM, ADAMW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW

#: (name, class, options): every option of each supported class is exercised
CONFIGS = {
    "sgd_plain": (SGD, {"lr": 0.5}),
    "sgd_momentum_wd": (SGD, {"lr": 0.3, "momentum": 0.9, "weight_decay": 1e-2}),
    "sgd_nesterov": (SGD, {"lr": 0.3, "momentum": 0.8, "nesterov": True, "weight_decay": 5e-3}),
    "sgd_dampening_maximize": (SGD, {"lr": 0.2, "momentum": 0.7, "dampening": 0.3, "maximize": True}),
    "adamw": (ADAMW, {"lr": 2e-2, "betas": (0.8, 0.95), "weight_decay": 0.1}),
    "adam_wd": (ADAM, {"lr": 1e-2, "weight_decay": 1e-2, "eps": 1e-6}),
    "adam_maximize": (ADAM, {"lr": 1e-2, "maximize": True}),
}
#: what runs the 20-step comparison besides the CPU backend and a GPU (every configuration
#: with and without class_index): the reference and Triton's interpreter are slow on CPU,
#: so SGD (momentum, nesterov, weight decay) and AdamW, each with and without class_index
SLOW_BACKEND_CASES = (("sgd_nesterov", True), ("sgd_nesterov", False), ("adamw", True), ("adamw", False))

# small problems: the Triton kernels run in the interpreter on CPU
NUM_CLASSES, DIM, BATCH = 24, 16, 10


def _comparison_cases():
    triton_here = INTERPRETED or torch.cuda.is_available()
    for config in CONFIGS:
        for sampled in (False, True):
            tag = f"{config}-{'class_index' if sampled else 'all_classes'}"
            yield pytest.param("cpu", "cpu", config, sampled, id=f"cpu-{tag}")
            yield pytest.param("cuda", "cuda", config, sampled, id=f"cuda-{tag}", marks=pytest.mark.gpu)
            if not INTERPRETED and torch.cuda.is_available():
                yield pytest.param("triton", "cuda", config, sampled, id=f"triton-{tag}", marks=pytest.mark.gpu)
            if (config, sampled) in SLOW_BACKEND_CASES:
                yield pytest.param("reference", "cpu", config, sampled, id=f"reference-{tag}")
                if INTERPRETED or not triton_here:
                    yield pytest.param("triton", "cpu", config, sampled, id=f"triton-{tag}", marks=pytest.mark.skipif(
                        not triton_here, reason="needs a CUDA device or TRITON_INTERPRET=1"))


def _data(steps, *, spec, device, sampled, seed=0):
    """Per step: (x, labels, class_index, upstream), fresh random inputs."""
    gen = torch.Generator().manual_seed(seed)
    k = spec.num_subcenters
    weight = torch.randn(NUM_CLASSES * k, DIM, generator=gen)
    out = []
    for _ in range(steps):
        x = torch.randn(BATCH, DIM, generator=gen)
        num_used = 9 if sampled else NUM_CLASSES
        class_index = torch.randperm(NUM_CLASSES, generator=gen)[:num_used] if sampled else None
        labels = torch.randint(0, num_used, (BATCH,), generator=gen)
        labels[-1] = -100  # an ignored row
        upstream = torch.rand(BATCH, generator=gen) + 0.5
        out.append(tuple(None if t is None else t.to(device) for t in (x, labels, class_index, upstream)))
    return weight.to(device), out


def _loss(x, weight, labels, spec, class_index, backend):
    return fm.margin_cross_entropy(x, weight, labels, spec, class_index=class_index, reduction="none",
                                   backend=backend)


def _train(cls, options, weight0, data, spec, backend, *, fused, sparse=False, on_step=None):
    weight = nn.Parameter(weight0.clone())
    if fused:
        opt = fopt.apply_optimizer_in_backward(cls, [weight], options, sparse=sparse)
    else:
        opt = cls([weight], foreach=False, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.25 * t))  # lr changes every step
    for step, (x, labels, class_index, upstream) in enumerate(data):
        xr = x.clone().requires_grad_(True)
        _loss(xr, weight, labels, spec, class_index, backend).backward(upstream)
        if on_step is not None:
            on_step(step, weight, opt, xr)
        opt.step()
        opt.zero_grad()
        sched.step()
    return weight, opt


def _assert_states_match(fused, plain, what):
    a, b = fused.state_dict()["state"], plain.state_dict()["state"]
    assert a.keys() == b.keys(), what
    for index in b:
        assert a[index].keys() == b[index].keys(), f"{what}: state keys"
        for key, want in b[index].items():
            got = a[index][key]
            if key == "step":
                assert got.dtype == want.dtype and got.device == want.device and float(got) == float(want), what
            else:
                assert_rel_close(got, want, TOL, f"{what}: {key}")


@pytest.mark.parametrize(("backend", "device", "config", "sampled"), list(_comparison_cases()))
def test_matches_plain_optimizer(backend, device, config, sampled):
    """20 steps, the lr changing every step (a scheduler): weights and state as torch.optim's."""
    cls, options = CONFIGS[config]
    spec = HEAD_SPECS["subcenter_arcface" if sampled else "arcface"]
    weight0, data = _data(20, spec=spec, device=device, sampled=sampled, seed=len(config))

    def check_step(step, weight, opt, xr):
        assert weight.grad is None, "the weight's gradient was formed"
        if step == 0:
            before = weight.detach().clone()
            opt.step()  # does nothing to the weight
            assert torch.equal(weight.detach(), before)
        assert xr.grad is not None and bool(torch.isfinite(xr.grad).all())

    fused_w, fused_opt = _train(cls, options, weight0, data, spec, backend, fused=True, on_step=check_step)
    plain_w, plain_opt = _train(cls, options, weight0, data, spec, backend, fused=False)
    assert isinstance(fused_opt, cls)
    assert not torch.equal(plain_w.detach(), weight0), "the plain optimizer did not move the weight"
    assert_rel_close(fused_w.detach(), plain_w.detach(), TOL, f"{backend} {config}: weight")
    _assert_states_match(fused_opt, plain_opt, f"{backend} {config}")


def _row_wise_sparse_model(cls, options, weight0, data, spec):
    """Sparse mode written row by row in float64: only the sampled rows move, their state
    starts at zero, Adam's bias correction follows the global step count."""
    k = spec.num_subcenters
    w = weight0.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for step, (x, labels, class_index, upstream) in enumerate(data):
        t = step + 1
        lr = options["lr"] / (1.0 + 0.25 * step)
        wr = w.clone().requires_grad_(True)
        _loss(x.double(), wr, labels, spec, class_index, "eager").backward(upstream.double())
        rows = rows_in_use(w, class_index, k)  # the sampled rows only
        g = wr.grad[rows]
        if cls is SGD:
            g = g + options.get("weight_decay", 0.0) * w[rows]
            momentum = options.get("momentum", 0.0)
            m[rows] = g if t == 1 else momentum * m[rows] + (1 - options.get("dampening", 0.0)) * g
            g = g + momentum * m[rows] if options.get("nesterov") else m[rows]
            w[rows] = w[rows] - lr * g
        else:
            b1, b2 = options.get("betas", (0.9, 0.999))
            if cls is ADAMW:
                w[rows] = w[rows] * (1 - lr * options.get("weight_decay", 1e-2))
            else:
                g = g + options.get("weight_decay", 0.0) * w[rows]
            m[rows] = b1 * m[rows] + (1 - b1) * g
            v[rows] = b2 * v[rows] + (1 - b2) * g * g
            denom = (v[rows] / (1 - b2**t)).sqrt() + options.get("eps", 1e-8)
            w[rows] = w[rows] - lr / (1 - b1**t) * m[rows] / denom
    return w, m, v


@pytest.mark.parametrize(("backend", "config"), [("reference", "sgd_momentum_wd"), ("cpu", "sgd_nesterov"),
                                                 ("cpu", "adamw"), ("cpu", "adam_wd")])
def test_sparse_mode_updates_only_sampled_rows(backend, config):
    cls, options = CONFIGS[config]
    spec = HEAD_SPECS["subcenter_arcface"]
    weight0, data = _data(8, spec=spec, device="cpu", sampled=True, seed=3)
    touched = torch.zeros(weight0.shape[0], dtype=torch.bool)
    for _x, _labels, class_index, _up in data:
        touched[rows_in_use(weight0, class_index, spec.num_subcenters)] = True
    assert not bool(touched.all()), "every row was sampled: the test cannot see the difference"
    weight, opt = _train(cls, options, weight0, data, spec, backend, fused=True, sparse=True)
    want_w, want_m, want_v = _row_wise_sparse_model(cls, options, weight0, data, spec)
    assert torch.equal(weight.detach()[~touched], weight0[~touched]), "a row never sampled moved"
    assert_rel_close(weight.detach().double(), want_w, TOL, "weight")
    state = opt.state[weight]
    if cls is SGD:
        assert_rel_close(state["momentum_buffer"].double(), want_m, TOL, "momentum_buffer")
    else:
        assert float(state["step"]) == len(data), "the step count is global"
        assert_rel_close(state["exp_avg"].double(), want_m, TOL, "exp_avg")
        assert_rel_close(state["exp_avg_sq"].double(), want_v, TOL, "exp_avg_sq")
    # the default mode is a different optimizer: rows not sampled move too (weight decay, momentum)
    dense, _ = _train(cls, options, weight0, data, spec, backend, fused=True)
    assert not torch.equal(dense.detach()[~touched], weight0[~touched])


# ---- a backend that applies the update itself (fused_updates=True) -----------------------


class _UpdatingReference(ReferenceBackend):
    """The reference's gradient, with the update applied to the rows in use only, as a
    backend with ``fused_updates=True`` does (the rest is fused_margin.optim's job)."""

    name = "reference"
    fused_updates = True

    def __init__(self):
        self.calls = 0

    def backward(self, grads, saved, params, update=None):
        grad_x, grad_w, grad_b = reference_backward(grads, saved, params)
        if update is None:
            return grad_x, grad_w, grad_b
        self.calls += 1
        rows = rows_in_use(saved.weight, saved.class_index, params.num_subcenters)
        # the guard (fused_margin.optim.update): nothing written once its status is set or
        # when the gradient is not finite
        if int(update.guard[0]) or not bool(torch.isfinite(grad_w[rows]).all()):
            update.guard[0] |= GUARD_NON_FINITE_GRADIENT
            return grad_x, None, grad_b
        update.guard[1] = 1
        w = saved.weight.index_select(0, rows)
        state = tuple(s.index_select(0, rows) for s in update.state)
        apply_update_(update, w, state, grad_w.index_select(0, rows).float())
        saved.weight.index_copy_(0, rows, w)
        for s, rows_s in zip(update.state, state):
            s.index_copy_(0, rows, rows_s)
        return grad_x, None, grad_b


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("config", ["sgd_dampening_maximize", "adamw"])
def test_backend_fused_updates_path(monkeypatch, config, sparse):
    """A backend that applies the update to the rows in use gives the generic path's result;
    rows not sampled are updated with a zero gradient by default, left alone when sparse.
    Several chunks of rows (a small CHUNK_ELEMENTS)."""
    monkeypatch.setattr(_backward, "CHUNK_ELEMENTS", 3 * DIM)
    cls, options = CONFIGS[config]
    spec = HEAD_SPECS["subcenter_arcface"]
    weight0, data = _data(5, spec=spec, device="cpu", sampled=True, seed=11)
    want_w, want_opt = _train(cls, options, weight0, data, spec, "reference", fused=True, sparse=sparse)
    updating = _UpdatingReference()
    monkeypatch.setattr(fm.ops, "get_backend", lambda name: updating if name == "reference" else get_backend(name))
    got_w, got_opt = _train(cls, options, weight0, data, spec, "reference", fused=True, sparse=sparse)
    assert updating.calls == len(data)
    assert_rel_close(got_w.detach(), want_w.detach(), TOL, "weight")
    _assert_states_match(got_opt, want_opt, config)


# ---- state dicts -------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["sgd_dampening_maximize", "sgd_nesterov", "adamw"])
def test_state_dict_round_trip(config):
    """fused (3 steps) -> plain (3 steps) -> fused (3 steps) equals 9 plain steps; before
    its first step a fused SGD exports no momentum buffer (plain SGD's first step with
    dampening is then the same)."""
    cls, options = CONFIGS[config]
    spec = HEAD_SPECS["arcface"]
    weight0, data = _data(9, spec=spec, device="cpu", sampled=False, seed=5)
    want, plain_all = _train(cls, options, weight0, data, spec, "cpu", fused=False)

    weight = nn.Parameter(weight0.clone())
    opt = fopt.apply_optimizer_in_backward(cls, [weight], options)
    assert opt.state_dict()["state"] == {}, "state exported before the first step"
    for t, (x, labels, class_index, upstream) in enumerate(data):
        if t in (3, 6):  # a checkpoint, resumed with the other kind of optimizer
            state = opt.state_dict()
            weight = nn.Parameter(weight.detach().clone())
            if t == 3:
                opt = cls([weight], foreach=False, **options)
            else:
                opt = fopt.apply_optimizer_in_backward(cls, [weight], options)
            opt.load_state_dict(state)
        for group in opt.param_groups:  # the single run's scheduler: lr_t = lr / (1 + t/4)
            group["lr"] = options["lr"] / (1.0 + 0.25 * t)
        _loss(x, weight, labels, spec, class_index, "cpu").backward(upstream)
        opt.step()
        opt.zero_grad()
    assert isinstance(opt, fopt.InBackwardOptimizer)
    assert_rel_close(weight.detach(), want.detach(), TOL, "weight after fused -> plain -> fused")
    _assert_states_match(opt, plain_all, config)


def test_state_dict_before_first_step_loads_into_plain_sgd():
    cls, options = CONFIGS["sgd_dampening_maximize"]
    spec = HEAD_SPECS["arcface"]
    weight0, data = _data(2, spec=spec, device="cpu", sampled=False, seed=6)
    want, _ = _train(cls, options, weight0, data, spec, "cpu", fused=False)
    fused = fopt.apply_optimizer_in_backward(cls, [nn.Parameter(weight0.clone())], options)
    weight = nn.Parameter(weight0.clone())
    plain = cls([weight], foreach=False, **options)
    plain.load_state_dict(fused.state_dict())
    sched = torch.optim.lr_scheduler.LambdaLR(plain, lambda t: 1.0 / (1.0 + 0.25 * t))
    for x, labels, class_index, upstream in data:
        _loss(x, weight, labels, spec, class_index, "cpu").backward(upstream)
        plain.step()
        plain.zero_grad()
        sched.step()
    assert_rel_close(weight.detach(), want.detach(), TOL, "weight")


# ---- rules -------------------------------------------------------------------------------


def _head_and_opt(cls=SGD, options=None, head_cls=fm.CosFaceLoss, **head_kwargs):
    head = head_cls(NUM_CLASSES, DIM, backend=head_kwargs.pop("backend", "cpu"), **head_kwargs)
    opt = fopt.apply_optimizer_in_backward(cls, [head.weight], options or {"lr": 0.1, "momentum": 0.9})
    return head, opt


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, DIM, generator=gen), torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)


def test_second_backward_before_step_is_refused():
    head, opt = _head_and_opt()
    x, y = _batch()
    head(x, y).backward()
    before = head.weight.detach().clone()
    with pytest.raises(RuntimeError, match="gradient accumulation is not supported"):
        head(x, y).backward()
    assert torch.equal(head.weight.detach(), before), "the refused backward moved the weight"
    opt.zero_grad()
    head(x, y).backward()  # after zero_grad (or step) the next backward runs
    assert not torch.equal(head.weight.detach(), before)
    opt.step()
    head(x, y).backward()


def test_grad_scaler_is_refused():
    head, opt = _head_and_opt()
    x, y = _batch()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(head(x, y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler is not supported"):
        scaler.step(opt)


def test_fp16_autocast_is_refused_and_bf16_works():
    head, opt = _head_and_opt()
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="fp16 autocast"):
        head(x, y)
    # bf16 autocast: embeddings from a bf16 layer, the fused update as the plain one
    torch.manual_seed(3)
    layer = nn.Linear(DIM, DIM)
    twin = copy.deepcopy(head)
    assert fopt.fused_optimizer_handle(twin.weight) == 0, "a deep copy is not fused"
    plain = SGD([twin.weight], lr=0.1, momentum=0.9, foreach=False)
    for step in range(3):
        x, y = _batch(step)
        for module, optimizer in ((head, opt), (twin, plain)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                embeddings = layer(x)
                assert embeddings.dtype == torch.bfloat16
                loss = module(embeddings, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert_rel_close(head.weight.detach(), twin.weight.detach(), TOL, "weight under bf16 autocast")
    assert_rel_close(opt.state[head.weight]["momentum_buffer"], plain.state[twin.weight]["momentum_buffer"],
                     TOL, "momentum_buffer under bf16 autocast")


@pytest.mark.parametrize("where", ["embedding_nan", "embedding_inf", "upstream_nan", "weight_inf"])
@pytest.mark.parametrize("cls", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_non_finite_inputs_skip_the_step(cls, where):
    head, opt = _head_and_opt(cls, {"lr": 0.1})
    x, y = _batch()
    head(x, y).backward()  # one good step: the state exists
    opt.step()
    weight = head.weight.detach().clone()
    state = {k: v.clone() for k, v in opt.state[head.weight].items()}
    x, y = _batch(1)
    x = x.clone().requires_grad_(True)
    upstream = torch.rand(BATCH) + 0.5
    if where == "embedding_nan":
        with torch.no_grad():
            x[2, 3] = float("nan")
    elif where == "embedding_inf":
        with torch.no_grad():
            x[4, 0] = float("inf")
    elif where == "upstream_nan":
        upstream[1] = float("nan")
    else:
        with torch.no_grad():
            head.weight[int(y[0])] = float("inf")
        weight = head.weight.detach().clone()
    head.reduction = "none"
    loss = head(x, y)
    assert not bool(torch.isfinite(loss * upstream).all()), "the loss should be non-finite"
    (loss * upstream).sum().backward()
    assert torch.equal(head.weight.detach(), weight), "a non-finite step moved the weight"
    for key, value in opt.state[head.weight].items():
        assert torch.equal(value, state[key]), f"a non-finite step changed {key}"
    assert x.grad is not None, "the embeddings still get their (non-finite) gradient"
    # the refused step does not count: the next backward needs no step() first
    if where == "weight_inf":
        with torch.no_grad():
            head.weight[int(y[0])] = 1.0
    head(torch.randn(BATCH, DIM), y).sum().backward()
    assert not torch.equal(head.weight.detach(), weight)


def test_non_finite_ignored_row_does_not_skip_the_step():
    head, opt = _head_and_opt()
    x, y = _batch()
    x[3] = float("nan")
    y[3] = -100
    weight = head.weight.detach().clone()
    loss = head(x, y)
    assert bool(torch.isfinite(loss))
    loss.backward()
    assert not torch.equal(head.weight.detach(), weight)


def test_non_finite_target_u_is_detected():
    x, weight, labels = torch.randn(5, DIM), torch.randn(NUM_CLASSES, DIM), torch.randint(0, NUM_CLASSES, (5,))
    params = KernelParams.from_spec(HEAD_SPECS["cosface"])
    lse, target_u, _s, _a, r, q = margin_lse_terms(x, weight, labels, None, None, None, params)
    saved = SavedTensors(x, weight, labels, None, None, None, lse, r, q)
    grads = UpstreamGrads(*(torch.rand(5) for _ in range(3)))
    assert fopt.inputs_are_finite(grads, saved, target_u)
    bad = target_u.clone()
    bad[2] = float("nan")
    assert not fopt.inputs_are_finite(grads, saved, bad)
    labels = labels.clone()
    labels[2] = IGNORED_LABEL  # an ignored row's values take no part
    assert fopt.inputs_are_finite(grads, SavedTensors(x, weight, labels, None, None, None, lse, r, q), bad)
    lse_inf = lse.clone()
    lse_inf[0] = float("inf")
    assert not fopt.inputs_are_finite(grads, SavedTensors(x, weight, labels, None, None, None, lse_inf, r, q))
    lse_inf[0] = float("-inf")  # a row without negatives
    assert fopt.inputs_are_finite(grads, SavedTensors(x, weight, labels, None, None, None, lse_inf, r, q))


def test_eager_backend_is_refused():
    head, _opt = _head_and_opt(backend="eager")
    with pytest.raises(ValueError, match="backend='eager'"):
        head(*_batch())


def test_target_reading_weight_norms_is_refused():
    head, _opt = _head_and_opt(head_cls=fm.LSoftmaxLoss)
    with pytest.raises(ValueError, match="norms"):
        head(*_batch())


def test_repeated_class_index_is_refused():
    weight = nn.Parameter(torch.randn(NUM_CLASSES, DIM))
    opt = fopt.apply_optimizer_in_backward(ADAM, [weight], {"lr": 1e-2})
    x, _ = _batch()
    class_index = torch.tensor([3, 7, 3, 1])
    labels = torch.randint(0, 4, (BATCH,))
    before = weight.detach().clone()
    with pytest.raises(ValueError, match="class_index repeats class 3"):
        _loss(x, weight, labels, HEAD_SPECS["cosface"], class_index, "reference").sum().backward()
    assert torch.equal(weight.detach(), before) and opt.state[weight] == {}


def test_compiled_training_step_no_graph_break_and_scheduler_honoured():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    head, opt = _head_and_opt(ADAMW, {"lr": 1e-2})
    twin = copy.deepcopy(head)
    assert fopt.fused_optimizer_handle(twin.weight) == 0, "a deep copy is not fused"
    plain = ADAMW([twin.weight], lr=1e-2, foreach=False)
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, 0.7) for o in (opt, plain)]
    counter = CompileCounterWithBackend("aot_eager")
    step_fn = torch.compile(lambda x, y: head(x, y), backend=counter, fullgraph=True)
    for step in range(6):
        x, y = _batch(step)
        for fn, optimizer, sched in ((step_fn, opt, scheds[0]), (twin, plain, scheds[1])):
            fn(x, y).backward()
            optimizer.step()
            optimizer.zero_grad()
            sched.step()
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.7**6)
    assert_rel_close(head.weight.detach(), twin.weight.detach(), TOL, "compiled fused step")
    _assert_states_match(opt, plain, "compiled")


def test_deep_copy_of_a_head_trains_with_a_plain_gradient():
    head, _opt = _head_and_opt()
    clone = copy.deepcopy(head)
    before = head.weight.detach().clone()
    clone(*_batch()).backward()
    assert clone.weight.grad is not None and torch.equal(head.weight.detach(), before)


# ---- bad arguments -----------------------------------------------------------------------


def test_bad_arguments():
    weight = nn.Parameter(torch.randn(NUM_CLASSES, DIM))
    apply = fopt.apply_optimizer_in_backward
    with pytest.raises(ValueError, match="RMSprop"):
        apply(torch.optim.RMSprop, [weight], {"lr": 0.1})
    with pytest.raises(ValueError, match="SparseAdam"):
        apply(torch.optim.SparseAdam, [weight], {"lr": 0.1})
    for cls, flag in ((SGD, "foreach"), (SGD, "fused"), (SGD, "differentiable"), (ADAM, "capturable"),
                      (ADAMW, "amsgrad"), (ADAM, "foreach")):
        with pytest.raises(ValueError, match=f"{flag}=True"):
            apply(cls, [nn.Parameter(torch.randn(4, DIM))], {"lr": 0.1, flag: True})
    with pytest.raises(ValueError, match=r"\['betas'\]"):
        apply(SGD, [weight], {"lr": 0.1, "betas": (0.9, 0.99)})
    with pytest.raises(ValueError, match="params is empty"):
        apply(SGD, [], {"lr": 0.1})
    with pytest.raises(ValueError, match="2-D"):
        apply(SGD, [nn.Parameter(torch.randn(5))], {"lr": 0.1})
    with pytest.raises(TypeError, match="floating-point"):
        apply(SGD, [torch.zeros(3, 4, dtype=torch.int64)], {"lr": 0.1})
    with pytest.raises(ValueError, match="leaf tensors that require grad"):
        apply(SGD, [torch.randn(3, 4)], {"lr": 0.1})
    with pytest.raises(TypeError, match="sparse must be a bool"):
        apply(SGD, [weight], {"lr": 0.1}, sparse=1)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # torch's own check
        apply(SGD, [weight], {"lr": -1.0})
    opt = apply(SGD, weight, {"lr": 0.1})  # a single tensor is accepted
    with pytest.raises(ValueError, match="already has an optimizer in the backward"):
        apply(ADAM, [weight], {"lr": 0.1})
    with pytest.raises(ValueError, match="foreach=True"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, DIM))], "foreach": True})
    with pytest.raises(TypeError, match="unexpected keyword"):
        opt.step(scale=2.0)


def test_transposed_weight_of_the_pml_drop_in():
    """pytorch-metric-learning's (D, C) W reaches the op as W.t(): its state keeps W's layout."""
    from fused_margin import pml

    torch.manual_seed(4)
    head = pml.ArcFaceLoss(num_classes=NUM_CLASSES, embedding_size=DIM)
    twin = copy.deepcopy(head)
    opt = fopt.apply_optimizer_in_backward(ADAMW, [head.W], {"lr": 1e-2})
    plain = ADAMW([twin.W], lr=1e-2, foreach=False)
    for step in range(3):
        x, y = _batch(step)
        for module, optimizer in ((head, opt), (twin, plain)):
            module(x, y).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert head.W.grad is None
    assert_rel_close(head.W.detach(), twin.W.detach(), TOL, "transposed weight")
    _assert_states_match(opt, plain, "transposed weight")
    assert opt.state[head.W]["exp_avg"].shape == head.W.shape


def test_gradient_reaching_the_weight_outside_the_op_is_refused():
    head, _opt = _head_and_opt()
    x, y = _batch()
    with pytest.raises(RuntimeError, match="received a gradient outside the fused op"):
        (head(x, y) + head.weight.square().sum()).backward()
    assert head.weight.grad is None


# ---- autograd sees the update (version counter), deferred updates -----------------------


def _here(backend):
    """The device a backend runs on here: Triton on CPU tensors under the interpreter."""
    if backend == "triton" and not INTERPRETED:
        return pytest.param(backend, "cuda", marks=pytest.mark.gpu, id=backend)
    return pytest.param(backend, "cuda" if backend == "cuda" else "cpu",
                        marks=[pytest.mark.gpu] if backend == "cuda" else [], id=backend)


BACKENDS_HERE = [_here(b) for b in ("cpu", "reference", "triton", "cuda")]


def _aux_then_head(head, x, y):
    """A second loss term that saved W (through W.detach()), made before the head."""
    aux = (x @ head.weight.detach().t()).square().mean()
    return aux + head(x, y)


def _heads_and_opts(backend, device, cls=SGD, options=None):
    """A fused head and its plain-optimizer twin (the same weights)."""
    options = options or {"lr": 1.0, "momentum": 0.9}
    head = fm.ArcFaceLoss(NUM_CLASSES, DIM, backend=backend, device=device)
    twin = copy.deepcopy(head)
    opt = fopt.apply_optimizer_in_backward(cls, [head.weight], options)
    plain = cls([twin.weight], foreach=False, **options)
    return head, opt, twin, plain


@pytest.mark.parametrize(("backend", "device"), BACKENDS_HERE)
def test_fused_write_bumps_the_version_counter(backend, device, monkeypatch):
    """Without the deferral, another node that saved W fails with PyTorch's own error, as
    a plain in-place update would make it: never a silent read of the updated weight."""
    monkeypatch.setattr(_backward, "held_elsewhere", lambda weight, param: False)
    head, _opt, _twin, _plain = _heads_and_opts(backend, device)
    x, y = (t.to(device) for t in _batch())
    version = head.weight._version
    head(x, y).backward()
    assert head.weight._version > version, "the fused update did not tell autograd"
    _opt.step()
    x = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _aux_then_head(head, x, y).backward()


@pytest.mark.parametrize(("backend", "device"), BACKENDS_HERE)
def test_other_saved_reference_defers_the_update(backend, device):
    """The issue's example: a loss term made before the head saved W. The update waits for
    the end of the backward (a warning says so): x.grad and W are the plain optimizer's."""
    head, opt, twin, plain = _heads_and_opts(backend, device)

    def fused_backward(x, y):
        with pytest.warns(RuntimeWarning, match="applied at the end of the backward"):
            _aux_then_head(head, x, y).backward()

    _two_steps_against_plain(fused_backward, lambda x, y: _aux_then_head(twin, x, y).backward(), head, opt, twin,
                             plain, device, backend)
    _assert_states_match(opt, plain, backend)


def _two_steps_against_plain(fused_backward, plain_backward, head, opt, twin, plain, device, what):
    """Two steps, each a backward of the fused head's loss and one of its plain twin's
    (``*_backward(x, y)``), then both optimizers' steps: x.grad and the weights alike."""
    for step in range(2):
        x, y = (t.to(device) for t in _batch(step))
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fused_backward(xa, y)
        plain_backward(xb, y)
        for o in (opt, plain):
            o.step()
            o.zero_grad()
        assert_rel_close(xa.grad, xb.grad, TOL, f"{what} x.grad, step {step}")
        assert_rel_close(head.weight.detach(), twin.weight.detach(), TOL, f"{what} weight, step {step}")


def test_normal_step_is_not_deferred(monkeypatch):
    """A head alone (its weight held only by the parameter and the op): in place, no
    W-sized gradient; the transposed view of the pytorch-metric-learning drop-in too."""
    from fused_margin import pml

    seen = []
    held_elsewhere = _backward.held_elsewhere
    monkeypatch.setattr(_backward, "held_elsewhere", lambda w, p: seen.append(held_elsewhere(w, p)) or seen[-1])
    head, _opt = _head_and_opt()
    drop_in = pml.ArcFaceLoss(num_classes=NUM_CLASSES, embedding_size=DIM)
    fopt.apply_optimizer_in_backward(SGD, [drop_in.W], {"lr": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        head(*_batch()).backward()
        drop_in(*_batch()).backward()
    assert seen == [False, False]


@pytest.mark.parametrize(("backend", "device"), BACKENDS_HERE)
def test_retained_graph_replayed_after_the_step_raises(backend, device):
    head, opt = _head_and_opt(backend=backend, device=device)
    x, y = (t.to(device) for t in _batch())
    loss = head(x.requires_grad_(True), y)
    loss.backward(retain_graph=True)
    opt.step()
    weight = head.weight.detach().clone()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    assert torch.equal(head.weight.detach(), weight) and bool(torch.isfinite(weight).all())


def test_compiled_graph_reading_the_weight_elsewhere():
    """In one compiled graph the op's write cannot be ordered against another node's read
    of W: a node traced after the fused backward fails to compile, with PyTorch's error;
    one traced before it gives the plain optimizer's result."""
    torch._dynamo.reset()
    head, opt, twin, plain = _heads_and_opts("cpu", "cpu")
    before = torch.compile(lambda x, y: _aux_then_head(head, x, y), backend="aot_eager", fullgraph=True)
    x, y = _batch()
    with pytest.raises(Exception, match="modified by an inplace operation"):
        before(x.clone().requires_grad_(True), y).backward()
    torch._dynamo.reset()

    def head_then_aux(module, x, y):
        loss = module(x, y)
        return loss + (x @ module.weight.detach().t()).square().mean()

    after = torch.compile(lambda x, y: head_then_aux(head, x, y), backend="aot_eager", fullgraph=True)
    _two_steps_against_plain(lambda x, y: after(x, y).backward(), lambda x, y: head_then_aux(twin, x, y).backward(),
                             head, opt, twin, plain, "cpu", "compiled")
    torch._dynamo.reset()


# ---- a non-finite gradient formed inside the backward -----------------------------------


def _poisoned_backward(head, opt, device, rows):
    """A good step (the state exists), then a forward whose weight rows ``rows`` become NaN
    through .data before its backward (autograd does not see it): the backward's inputs
    stay finite, the gradient it forms does not. Returns the loss, x, the weight before
    the poison and as the backward gets it, and the state before the backward."""
    x, y = (t.to(device) for t in _batch())
    head(x, y).backward()
    opt.step()
    x, y = (t.to(device) for t in _batch(1))
    loss = head(x.requires_grad_(True), y)
    clean = head.weight.detach().clone()
    head.weight.data[rows] = float("nan")
    weight = head.weight.detach().clone()
    state = {k: v.clone() for k, v in opt.state[head.weight].items()}
    return loss, x, clean, weight, state


@pytest.mark.parametrize("mode", ["gemm", "recompute"])
@pytest.mark.parametrize(("backend", "device"), BACKENDS_HERE)
@pytest.mark.parametrize("cls", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_non_finite_gradient_leaves_weight_and_state_untouched(backend, device, cls, mode, monkeypatch):
    if mode == "recompute" and backend != "triton":
        pytest.skip("a Triton backward mode")
    from fused_margin.backends.triton import BACKEND as TRITON

    monkeypatch.setattr(TRITON, "backward_mode", mode)
    head, opt = _head_and_opt(cls, {"lr": 0.1, "momentum": 0.9} if cls is SGD else {"lr": 0.1},
                              backend=backend, device=device)
    loss, x, clean, weight, state = _poisoned_backward(head, opt, device, slice(3, 5))
    with pytest.warns(RuntimeWarning, match="gradient .* was not finite although the backward's inputs were"):
        loss.backward()
    assert not bool(torch.isfinite(x.grad).all())
    assert torch.equal(head.weight.detach().nan_to_num(7.0), weight.nan_to_num(7.0)), "the weight moved"
    assert all(torch.equal(v, state[k]) for k, v in opt.state[head.weight].items()), "the state moved"
    # the step is not counted: the next backward needs no step() before it
    head.weight.data.copy_(clean)
    head(*(t.to(device) for t in _batch(2))).backward()
    assert not torch.equal(head.weight.detach(), clean)


@pytest.mark.parametrize(("backend", "device"), [_here("cpu"), _here("triton"), _here("cuda")])
def test_non_finite_gradient_after_written_chunks_raises(backend, device, monkeypatch):
    """Chunks of classes are written as their gradients are formed: a non-finite gradient
    in a later chunk stops every write after it, but the earlier chunks are updated. The
    backward says so with an error instead of leaving a silently half-stepped weight."""
    from fused_margin.backends.cpu import BACKEND as CPU
    from fused_margin.backends.cuda import BACKEND as CUDA
    from fused_margin.backends.triton import BACKEND as TRITON
    from fused_margin.triton_kernels import backward_gemm
    from fused_margin.triton_kernels.common import TileConfig

    monkeypatch.setattr(CPU, "chunk_size", 4)
    monkeypatch.setattr(CUDA, "chunk_size", 4)
    # Triton's 'gemm' backward: chunks of 16 classes
    monkeypatch.setattr(backward_gemm, "GEMM_WORKSPACE_BYTES", BATCH * 4 * 16)
    monkeypatch.setattr(TRITON, "tiles", {"gemm_logits": TileConfig(16, 16, 16, 16, 1)})
    monkeypatch.setattr(TRITON, "backward_mode", "gemm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU's groups of chunks in order
    try:
        head, opt = _head_and_opt(backend=backend, device=device)
        loss, _x, weight, _weight, _state = _poisoned_backward(head, opt, device, slice(NUM_CLASSES - 2, None))
        with pytest.raises(RuntimeError, match="partly updated"):
            loss.backward()
    finally:
        torch.set_num_threads(threads)
    moved = (head.weight.detach()[:16] != weight[:16]).any(dim=1)
    assert bool(moved.all()), "the first chunks were not updated: the test did not make a partial update"


# ---- options that arrive after the constructor -----------------------------------------


REFUSED = [(ADAM, "amsgrad"), (ADAMW, "amsgrad"), (ADAM, "foreach"), (SGD, "fused"), (ADAMW, "capturable"),
           (SGD, "differentiable")]


@pytest.mark.parametrize(("cls", "flag"), REFUSED, ids=[f"{c.__name__}-{f}" for c, f in REFUSED])
def test_refused_option_from_a_checkpoint(cls, flag):
    """A plain optimizer's checkpoint with the option on is refused at load, naming it,
    and nothing is loaded."""
    weight = nn.Parameter(torch.randn(NUM_CLASSES, DIM))
    plain = cls([nn.Parameter(weight.detach().clone())], lr=0.1)
    state = plain.state_dict()
    state["param_groups"][0][flag] = True  # as a plain optimizer made with flag=True saves it
    opt = fopt.apply_optimizer_in_backward(cls, [weight], {"lr": 0.2})
    with pytest.raises(ValueError, match=rf"{flag}=True \(param_groups\[0\] of the state dict"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.2 and not opt.param_groups[0].get(flag)


@pytest.mark.parametrize(("cls", "flag"), REFUSED, ids=[f"{c.__name__}-{f}" for c, f in REFUSED])
def test_refused_option_set_in_param_groups(cls, flag):
    """Set on a param group after the constructor: refused at the next backward, naming it,
    with the weight untouched."""
    head, opt = _head_and_opt(cls, {"lr": 0.1})
    opt.param_groups[0][flag] = True
    before = head.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"{flag}=True \(param_groups\[0\]\)"):
        head(*_batch()).backward()
    assert torch.equal(head.weight.detach(), before)
    opt.param_groups[0][flag] = False
    head(*_batch()).backward()  # the refused backward counted no step
    assert not torch.equal(head.weight.detach(), before)


@pytest.mark.skipif(torch.__version__ < "2.4", reason="an amsgrad Adam checkpoint of torch >= 2.4")
def test_amsgrad_adam_checkpoint_is_refused():
    weight = nn.Parameter(torch.randn(NUM_CLASSES, DIM))
    plain = ADAM([weight], lr=1e-2, amsgrad=True)
    weight.grad = torch.randn_like(weight)
    plain.step()
    opt = fopt.apply_optimizer_in_backward(ADAM, [nn.Parameter(weight.detach().clone())], {"lr": 1e-2})
    with pytest.raises(ValueError, match="amsgrad=True"):
        opt.load_state_dict(plain.state_dict())


# ---- detaching the optimizer -------------------------------------------------------------


def test_remove_optimizer_in_backward_hands_over_to_a_plain_optimizer():
    """After remove_optimizer_in_backward the backward forms weight.grad again, and the
    plain optimizer that loads the fused one's state continues the same training."""
    cls, options = CONFIGS["sgd_nesterov"]
    spec = HEAD_SPECS["arcface"]
    weight0, data = _data(6, spec=spec, device="cpu", sampled=False, seed=9)
    want, _ = _train(cls, options, weight0, data, spec, "cpu", fused=False)
    weight = nn.Parameter(weight0.clone())
    opt = fopt.apply_optimizer_in_backward(cls, [weight], options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.25 * t))
    for step, (x, labels, class_index, upstream) in enumerate(data):
        if step == 3:
            state = opt.state_dict()
            fopt.remove_optimizer_in_backward(weight)
            assert fopt.fused_optimizer_handle(weight) == 0
            opt = cls([weight], foreach=False, **options)
            opt.load_state_dict(state)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.25 * t), last_epoch=2)
        _loss(x, weight, labels, spec, class_index, "cpu").backward(upstream)
        assert (weight.grad is not None) == (step >= 3)
        opt.step()
        opt.zero_grad()
        sched.step()
    assert_rel_close(weight.detach(), want.detach(), TOL, "weight after the hand-over")
    with pytest.raises(ValueError, match="has no optimizer in the backward"):
        fopt.remove_optimizer_in_backward([weight])


def test_deleting_the_optimizer_does_not_detach_it():
    """``del opt`` keeps the weight's optimizer (it lives as long as the weight, as
    PyTorch's in-backward optimizers do): the backward still updates the weight."""
    head, opt = _head_and_opt()
    del opt
    gc.collect()
    before = head.weight.detach().clone()
    head(*_batch()).backward()
    assert head.weight.grad is None and not torch.equal(head.weight.detach(), before)


def test_plain_optimizer_over_a_fused_weight_fails_at_its_first_step():
    head, opt = _head_and_opt()
    extra = nn.Parameter(torch.randn(3))
    plain = torch.optim.SGD([extra, head.weight], lr=0.1)
    head(*_batch()).backward()
    with pytest.raises(RuntimeError, match=r"remove_optimizer_in_backward\(\[weight\]\) first"):
        plain.step()
    opt.step()  # the in-backward optimizer's own step is fine
    fopt.remove_optimizer_in_backward([head.weight])
    head(*_batch()).backward()
    plain.step()  # detached: a plain step now moves it


# ---- the PyTorch paths against torch.optim, bit for bit ---------------------------------


@pytest.mark.parametrize("tensors", [False, True], ids=["numbers", "tensors"])
def test_reference_path_bitwise_for_number_hyperparameters(tensors):
    """docs/optim.md: bitwise on the PyTorch paths when lr and betas are Python numbers. Tensor lr
    and betas: torch.optim forms the step size and bias corrections in the tensors' fp32
    arithmetic, the fused optimizer in double precision: the last bits may differ."""
    def options():  # fresh tensors for each run: the scheduler changes a tensor lr in place
        if tensors:
            return {"lr": torch.tensor(1e-2), "betas": (torch.tensor(0.8), torch.tensor(0.95)), "weight_decay": 0.1}
        return {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1}

    spec = HEAD_SPECS["arcface"]
    weight0, data = _data(6, spec=spec, device="cpu", sampled=False, seed=13)
    fused, _ = _train(ADAMW, options(), weight0, data, spec, "reference", fused=True)
    plain, _ = _train(ADAMW, options(), weight0, data, spec, "reference", fused=False)
    if tensors:
        assert_rel_close(fused.detach(), plain.detach(), 1e-6, "tensor hyperparameters")
    else:
        assert torch.equal(fused.detach(), plain.detach())


def test_removal_recompiles_a_compiled_step():
    torch._dynamo.reset()
    head, opt = _head_and_opt()
    step = torch.compile(lambda x, y: head(x, y), backend="aot_eager", fullgraph=True)
    step(*_batch()).backward()
    opt.step()
    assert head.weight.grad is None
    fopt.remove_optimizer_in_backward([head.weight])
    step(*_batch(1)).backward()
    assert head.weight.grad is not None, "the compiled step still ran the fused update"
    torch._dynamo.reset()
