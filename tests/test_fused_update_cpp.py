"""The optimizer step fused into the C++ backends' backward (csrc/optim_update.h).

``backend.backward(grads, saved, params, update)`` must leave the weight rows in use and
their optimizer state as the plain backward's weight gradient followed by the PyTorch
rule (:func:`fused_margin.optim.update.apply_update_`) on the same rows would, return the
same grad_x and grad_bias as the plain backward, leave every other row untouched, and
form no weight gradient. The helpers take a device, so ``tests/test_cuda.py`` runs the
same checks on a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fused_margin import _ext
from fused_margin.backends.cpu import BACKEND
from fused_margin.kernel_params import KernelParams, acc_dtype, values
from fused_margin.optim.update import UPDATE_ADAM, UPDATE_SGD, WeightUpdate, new_guard
from fused_margin.spec import NonTargetKind
from tests.utils import (
    FusedUpdateProblem,
    assert_rel_close,
    chunk_size_fixture,
    fused_update_problem,
    needs_ext,
    random_state,
    stepped_copies,
)

#: the update rules, as (name, WeightUpdate fields); the state is drawn at random
UPDATES = {
    "sgd": dict(kind=UPDATE_SGD, lr=0.3),
    "sgd_wd": dict(kind=UPDATE_SGD, lr=0.2, weight_decay=0.05),
    "sgd_momentum": dict(kind=UPDATE_SGD, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd_first_step": dict(kind=UPDATE_SGD, lr=0.1, momentum=0.8, dampening=0.3, first_step=True),
    "sgd_nesterov_maximize": dict(kind=UPDATE_SGD, lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.02,
                                  maximize=True),
    "adam": dict(kind=UPDATE_ADAM, lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.03,
                 bias_correction1=1 - 0.8**3, bias_correction2_sqrt=(1 - 0.95**3) ** 0.5),
    "adamw_maximize": dict(kind=UPDATE_ADAM, lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                           decoupled=True, maximize=True, bias_correction1=1 - 0.9**7,
                           bias_correction2_sqrt=(1 - 0.999**7) ** 0.5),
}

#: layouts of the problem: x dtype, weight dtype, sub-centers, class_index, strided weight,
#: normalized weight, bias
LAYOUTS = {
    "fp32": dict(x_dtype=torch.float32, w_dtype=torch.float32),
    "fp32_class_index": dict(x_dtype=torch.float32, w_dtype=torch.float32, class_index=True, bias=True),
    "fp32_k2": dict(x_dtype=torch.float32, w_dtype=torch.float32, k=2, class_index=True),
    "fp32_strided": dict(x_dtype=torch.float32, w_dtype=torch.float32, strided=True),
    "fp32_unnormalized_bias": dict(x_dtype=torch.float32, w_dtype=torch.float32, normalize_w=False, bias=True),
    "bf16": dict(x_dtype=torch.float32, w_dtype=torch.bfloat16, class_index=True),
    "fp16_strided": dict(x_dtype=torch.float32, w_dtype=torch.float16, strided=True),
    "fp64": dict(x_dtype=torch.float64, w_dtype=torch.float64, k=2),
}

#: (relative-norm tolerance, largest elementwise difference in units of the storage's
#: rounding) for weight and state
TOLERANCES = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def make_problem(backend, device, *, x_dtype, w_dtype, k=1, class_index=False, normalize_w=True, batch=13,
                 classes_all=203, dim=19, **layout) -> FusedUpdateProblem:
    """A random problem (:func:`tests.utils.fused_update_problem`: odd shapes, ignored rows,
    a row without target; with ``class_index``, half the classes plus seven in use), the
    identity transform at scale 8, its forward run on ``backend``."""
    params = KernelParams(normalize_x=True, normalize_w=normalize_w, scale=8.0, kind=NonTargetKind.IDENTITY,
                          num_subcenters=k)
    return fused_update_problem(backend, device, params, x_dtype=x_dtype, w_dtype=w_dtype, batch=batch,
                                classes_all=classes_all, dim=dim,
                                num_used=classes_all // 2 + 7 if class_index else None, **layout)


def expected_update(backend, problem: FusedUpdateProblem, update: WeightUpdate):
    """The plain backward, then ``apply_update_`` on the rows in use: (weight, state, grad_x,
    grad_bias). The plain backward runs on the weight in the accumulation dtype, whose
    gradient is the one the fused backward forms (an fp32 gradient for a 16-bit weight)."""
    saved = problem.saved
    weight = saved.weight
    acc = acc_dtype(saved.x, weight)
    saved_acc = dataclasses.replace(saved, weight=weight.to(acc))
    grad_x, grad_w, grad_b = backend.backward(problem.grads, saved_acc, problem.params)
    w, state = stepped_copies(update, weight, problem.rows_in_use, grad_w[problem.rows_in_use])
    return w, state, grad_x, grad_b


def check_fused_update(backend, device, layout: dict, update_fields: dict, contiguous_state: bool = False) -> None:
    problem = make_problem(backend, device, **layout)
    weight0 = problem.saved.weight
    update = WeightUpdate(**update_fields, state=random_state(update_fields, weight0, contiguous_state))
    want_w, want_state, want_gx, want_gb = expected_update(backend, problem, update)

    weight = weight0.clone()  # keeps a strided weight's strides
    assert weight.stride() == weight0.stride()
    state = tuple(s.clone() for s in update.state)
    state0 = tuple(s.clone() for s in update.state)
    saved = dataclasses.replace(problem.saved, weight=weight)
    grad_x, grad_w, grad_b = backend.backward(problem.grads, saved, problem.params,
                                              dataclasses.replace(update, state=state))

    assert grad_w is None
    assert torch.equal(grad_x, want_gx), "grad_x differs from the plain backward's"
    if problem.saved.bias is None:
        assert grad_b is None
    else:
        assert torch.equal(grad_b, want_gb), "grad_bias differs from the plain backward's"
    tol = TOLERANCES[weight.dtype]
    rows = problem.rows_in_use
    assert_rel_close(weight[rows], want_w[rows], tol, "updated weight rows")
    assert not torch.equal(weight[rows], weight0[rows]), "the weight did not move"
    for i, (s, want) in enumerate(zip(state, want_state)):
        assert_rel_close(s[rows], want[rows], tol, f"state[{i}] rows")
    # Norm-wise only for the updated rows: the fused chunk forms each row's gradient in its
    # own summation order, and a gradient entry that is a sum with cancellation can differ
    # from the plain backward's by many of its own last places (seen: 1e-13 relative in
    # fp64), which an elementwise bound in units of the result cannot allow for.
    # rows not in use: untouched, bit for bit
    unused = torch.ones(weight.shape[0], dtype=torch.bool, device=device)
    unused[rows] = False
    assert torch.equal(weight[unused], weight0[unused])
    for s, s0 in zip(state, state0):
        assert torch.equal(s[unused], s0[unused])


chunk_size = chunk_size_fixture(BACKEND)


@needs_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rule", list(UPDATES))
def test_fused_update_matches_backward_then_rule(rule, layout, chunk_size):
    chunk_size(16)  # 203 classes: 13 chunks (and several groups of chunks)
    check_fused_update(BACKEND, "cpu", LAYOUTS[layout], UPDATES[rule])


#: layouts the CPU backend alone forms the same gradient for as for the weight in the
#: accumulation dtype (its GEMMs always run in that dtype)
CPU_LAYOUTS = {
    "bf16_x_and_weight": dict(x_dtype=torch.bfloat16, w_dtype=torch.bfloat16, k=2, class_index=True),
    "fp64_x_fp32_weight": dict(x_dtype=torch.float64, w_dtype=torch.float32, strided=True),
}


@needs_ext
@pytest.mark.parametrize("layout", list(CPU_LAYOUTS))
@pytest.mark.parametrize("rule", ["sgd_nesterov_maximize", "adamw_maximize"])
def test_fused_update_cpu_layouts(rule, layout, chunk_size):
    chunk_size(16)
    check_fused_update(BACKEND, "cpu", CPU_LAYOUTS[layout], UPDATES[rule])


@needs_ext
@pytest.mark.parametrize("rule", ["sgd_momentum", "adam"])
def test_state_with_strides_of_its_own(rule, chunk_size):
    """A transposed weight with row-major state tensors: each is addressed by its own strides."""
    chunk_size(16)
    check_fused_update(BACKEND, "cpu", LAYOUTS["fp32_strided"], UPDATES[rule], contiguous_state=True)


@needs_ext
@pytest.mark.parametrize("chunk", [0, 1, 500])
def test_fused_update_any_chunking(chunk, chunk_size):
    """One class per chunk, the automatic chunk, one chunk for all classes."""
    chunk_size(chunk)
    check_fused_update(BACKEND, "cpu", LAYOUTS["fp32_class_index"], UPDATES["adam"])


def _allocations(fn) -> list[int]:
    """The sizes (bytes) of the CPU allocations ``fn()`` makes, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]


@needs_ext
def test_no_weight_sized_allocation(chunk_size):
    """The fused backward allocates nothing the size of W (the plain one does: its
    gradient), only the bounded per-chunk workspace."""
    chunk_size(32)
    problem = make_problem(BACKEND, "cpu", x_dtype=torch.float32, w_dtype=torch.float32, batch=4,
                           classes_all=3001, dim=48)
    w_bytes = problem.saved.weight.numel() * problem.saved.weight.element_size()
    plain = _allocations(lambda: BACKEND.backward(problem.grads, problem.saved, problem.params))
    assert max(plain) >= w_bytes  # the profiler sees the plain backward's gradient
    state = random_state(UPDATES["adam"], problem.saved.weight)
    update = WeightUpdate(**UPDATES["adam"], state=state)
    fused = _allocations(lambda: BACKEND.backward(problem.grads, problem.saved, problem.params, update))
    assert fused and max(fused) < w_bytes / 8, (max(fused), w_bytes)


def check_empty_batch_update(backend, device) -> None:
    """With no rows the gradient is zero, and the step (weight decay, momentum) still
    applies to the rows in use."""
    problem = make_problem(backend, device, x_dtype=torch.float32, w_dtype=torch.float32, batch=0, class_index=True)
    fields = UPDATES["sgd_momentum"]
    update = WeightUpdate(**fields, state=random_state(fields, problem.saved.weight))
    weight = problem.saved.weight.clone()
    rows = problem.rows_in_use
    want, want_state = stepped_copies(update, weight, rows, torch.zeros_like(weight[rows]))
    backend.backward(problem.grads, dataclasses.replace(problem.saved, weight=weight), problem.params, update)
    assert_rel_close(weight, want, 1e-6, "weight")
    assert_rel_close(update.state[0], want_state[0], 1e-6, "momentum_buffer")


@needs_ext
def test_empty_batch_applies_the_zero_gradient_update():
    check_empty_batch_update(BACKEND, "cpu")


def _run(problem, update):
    return BACKEND.backward(problem.grads, problem.saved, problem.params, update)


@needs_ext
def test_bad_update_arguments_raise_naming_them():
    problem = make_problem(BACKEND, "cpu", x_dtype=torch.float32, w_dtype=torch.float32, batch=5, classes_all=11)
    w = problem.saved.weight
    w_before = w.clone()
    adam = UPDATES["adam"]
    cases = [
        (WeightUpdate(**adam, state=(torch.zeros_like(w),)), r"state must hold 2 tensor\(s\)"),
        (WeightUpdate(**UPDATES["sgd"], state=(torch.zeros_like(w),)), r"state must hold 0 tensor\(s\)"),
        (WeightUpdate(**adam, state=(torch.zeros_like(w), torch.zeros(3, 2))), r"state\[1\] must have weight's shape"),
        (WeightUpdate(**adam, state=(torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w))),
         r"state\[0\] must have weight's dtype"),
        (WeightUpdate(**adam, state=(w, torch.zeros_like(w))), r"state\[0\] must be memory of its own"),
        (WeightUpdate(**dict(adam, bias_correction1=0.0), state=(torch.zeros_like(w), torch.zeros_like(w))),
         "bias corrections must be nonzero"),
        (WeightUpdate(**dict(adam, lr=float("nan")), state=(torch.zeros_like(w), torch.zeros_like(w))),
         r"update\[1\] must be finite, got nan"),
        (WeightUpdate(kind=7, lr=0.1), "update kind must be 1 .SGD. or 2 .Adam., got 7"),
    ]
    for update, message in cases:
        with pytest.raises(RuntimeError, match=message):
            _run(problem, update)
    with pytest.raises(RuntimeError, match="update must hold the 14 scalars"):
        _ext.ops().margin_lse_bwd_update(
            *values(problem.grads), *values(problem.saved), *values(problem.params), [], [1.0, 0.1],
            new_guard("cpu"), 0,
        )
    with pytest.raises(RuntimeError, match=r"guard must be a contiguous int32 tensor of shape \(2,\)"):
        _run(problem, WeightUpdate(**UPDATES["sgd"], guard=torch.zeros(2, dtype=torch.int64)))
    assert torch.equal(w, w_before), "a refused update moved the weight"


@needs_ext
def test_repeated_class_index_is_refused():
    problem = make_problem(BACKEND, "cpu", x_dtype=torch.float32, w_dtype=torch.float32, batch=5, classes_all=11)
    saved = dataclasses.replace(problem.saved, class_index=torch.tensor([3, 1, 3, 0]))
    labels = torch.tensor([0, 1, 2, 3, 1])
    saved = dataclasses.replace(saved, labels=labels, col_scale=torch.rand(4) + 0.5)
    w_before = saved.weight.clone()
    with pytest.raises(RuntimeError, match="class_index repeats a class"):
        BACKEND.backward(problem.grads, saved, problem.params, WeightUpdate(**UPDATES["sgd"]))
    assert torch.equal(saved.weight, w_before)


@needs_ext
def test_schema_declares_the_mutation():
    """opcheck's schema test: the op writes exactly the arguments its schema marks (a!)."""
    problem = make_problem(BACKEND, "cpu", x_dtype=torch.float32, w_dtype=torch.float32, batch=6, classes_all=9,
                           class_index=True, bias=True)
    fields = UPDATES["adamw_maximize"]
    state = random_state(fields, problem.saved.weight)
    args = (*values(problem.grads), *values(problem.saved), *values(problem.params), list(state),
            list(WeightUpdate(**fields).scalars()), new_guard("cpu"), 4)
    torch.library.opcheck(torch.ops.fused_margin_C.margin_lse_bwd_update.default, args,
                          test_utils=("test_schema",))
