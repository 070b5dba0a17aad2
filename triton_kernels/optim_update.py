"""An optimizer step applied to a tile of weight rows inside a backward kernel.

The rule is :mod:`fused_margin.optim.update`'s (``torch.optim``'s SGD and Adam/AdamW with
``foreach=False``): the kernels that form a weight row's gradient (the dW kernels of
``backward_gemm.py`` and ``backward.py``) call :func:`_apply_update` on the fp32 gradient
tile in their epilogue and store the new weights and optimizer state instead of the
gradient, so no gradient of W's shape is ever written. W and the state are loaded in
their own dtypes, the math is fp32 and each result is rounded once when stored.

:class:`UpdateArguments` is the launchers' side: the update's scalars (runtime values;
the flags that select code are constexprs) and its state tensors, checked against W.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from fused_margin.optim.update import (
    GUARD_NON_FINITE_GRADIENT,
    UPDATE_ADAM,
    UPDATE_SGD,
    WeightUpdate,
    apply_update_,
    new_guard,
)

__all__ = ["NO_UPDATE", "UpdateArguments", "no_update", "step_with_zero_gradient", "update_arguments"]

#: the kernels' UPDATE constexpr: 0 writes the gradient, else a WeightUpdate kind
NO_UPDATE = 0
_SGD = tl.constexpr(UPDATE_SGD)
_ADAM = tl.constexpr(UPDATE_ADAM)
GUARD_GRADIENT = tl.constexpr(GUARD_NON_FINITE_GRADIENT)


@triton.jit
def _apply_update(
    w, g, s1, s2,
    lr, weight_decay, decay_factor, momentum, one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2, eps,
    step_size, bias_correction2_sqrt,
    UPDATE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, DECOUPLED: tl.constexpr,
):
    """``(w, s1, s2)`` after one step, all fp32: ``w`` the weights, ``g`` their gradient,
    ``s1``/``s2`` the state (SGD: the momentum buffer and an unused tile; Adam:
    ``exp_avg``, ``exp_avg_sq``). ``decay_factor = 1 - lr * weight_decay``,
    ``one_minus_dampening``, ``one_minus_beta1``, ``one_minus_beta2`` and
    ``step_size = lr / bias_correction1`` are computed on the host in double precision
    and rounded once to fp32, as ``torch.optim``'s Python scalars are: the same fp32
    operands, so the same results."""
    w = w.to(tl.float32)
    g = g.to(tl.float32)
    if MAXIMIZE:
        g = -g
    if UPDATE == _SGD:
        if HAS_WEIGHT_DECAY:
            g = g + weight_decay * w
        if HAS_MOMENTUM:
            if FIRST_STEP:
                s1 = g
            else:
                s1 = momentum * s1.to(tl.float32) + one_minus_dampening * g
            if NESTEROV:
                g = g + momentum * s1
            else:
                g = s1
        w = w - lr * g
    else:
        tl.static_assert(UPDATE == _ADAM, "UPDATE must be UPDATE_SGD or UPDATE_ADAM")
        if HAS_WEIGHT_DECAY:
            if DECOUPLED:
                w = w * decay_factor
            else:
                g = g + weight_decay * w
        m = s1.to(tl.float32)
        m = m + one_minus_beta1 * (g - m)
        v = beta2 * s2.to(tl.float32) + one_minus_beta2 * g * g
        s1 = m
        s2 = v
        w = w - step_size * m / (tl.sqrt_rn(v) / bias_correction2_sqrt + eps)
    return w, s1, s2


@triton.jit
def _flag_non_finite(values, mask, guard_ptr):
    """The guard's check (:mod:`fused_margin.optim.update`): sets its status when a value
    of ``values`` within ``mask`` is not finite; returns whether all were finite."""
    bad = tl.sum(tl.where(mask & ~(tl.abs(values.to(tl.float32)) < float("inf")), 1, 0))
    if bad > 0:
        tl.atomic_or(guard_ptr, GUARD_GRADIENT)
    return bad == 0


@triton.jit
def _update_rows(
    g, rows, offs_d, mask,
    w_ptr, stride_wr, stride_wd, state1_ptr, state2_ptr, stride_sr, stride_sd, guard_ptr,
    lr, weight_decay, decay_factor, momentum, one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2, eps,
    step_size, bias_correction2_sqrt,
    UPDATE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, DECOUPLED: tl.constexpr,
):
    """One step on the tile of weight rows ``rows`` (int64) x columns ``offs_d`` (``mask``)
    with gradient ``g`` (fp32): loads the weights and the state the update has (a state
    pointer it lacks is None, never touched), and stores them back in their dtypes.
    Nothing is stored when ``g`` is not finite or the guard's status is already set (by
    an earlier check, or another program); a store marks the guard's ``written``."""
    # an atomic read: the status other programs of this launch may have set meanwhile
    status = tl.atomic_add(guard_ptr, 0)
    write = _flag_non_finite(g, mask, guard_ptr) & (status == 0)
    if write:
        tl.store(guard_ptr + 1, 1)
    mask = tl.where(write, mask, False)  # (`mask & write` gives an integer mask in the interpreter)
    w_ptrs = w_ptr + rows[:, None] * stride_wr + offs_d[None, :] * stride_wd
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    s1 = w
    s2 = w
    if UPDATE == _ADAM:
        s_offsets = rows[:, None] * stride_sr + offs_d[None, :] * stride_sd
        s1 = tl.load(state1_ptr + s_offsets, mask=mask, other=0.0)
        s2 = tl.load(state2_ptr + s_offsets, mask=mask, other=0.0)
    elif HAS_MOMENTUM:
        s_offsets = rows[:, None] * stride_sr + offs_d[None, :] * stride_sd
        s1 = tl.load(state1_ptr + s_offsets, mask=mask, other=0.0)
    w, s1, s2 = _apply_update(
        w, g, s1, s2, lr, weight_decay, decay_factor, momentum, one_minus_dampening, beta2, one_minus_beta1,
        one_minus_beta2, eps, step_size, bias_correction2_sqrt, UPDATE, MAXIMIZE, HAS_WEIGHT_DECAY,
        HAS_MOMENTUM, NESTEROV, FIRST_STEP, DECOUPLED,
    )
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=mask)
    if UPDATE == _ADAM:
        tl.store(state1_ptr + s_offsets, s1.to(state1_ptr.dtype.element_ty), mask=mask)
        tl.store(state2_ptr + s_offsets, s2.to(state2_ptr.dtype.element_ty), mask=mask)
    elif HAS_MOMENTUM:
        tl.store(state1_ptr + s_offsets, s1.to(state1_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class UpdateArguments:
    """What a dW kernel takes for its update, one field per kernel argument (passed by
    keyword: :meth:`kwargs`): the state pointers (None where the update has no such
    state), the state's strides, the runtime scalars and the constexprs that select
    the code. :func:`no_update` for a kernel that writes dW."""

    #: the update these arguments were made from (not a kernel argument)
    update: WeightUpdate | None
    state1_ptr: torch.Tensor | None
    state2_ptr: torch.Tensor | None
    stride_sr: int
    stride_sd: int
    #: the update's guard (int32 (2,): status, written), None without an update
    guard_ptr: torch.Tensor | None
    lr: float
    weight_decay: float
    decay_factor: float
    momentum: float
    one_minus_dampening: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    step_size: float
    bias_correction2_sqrt: float
    UPDATE: int
    MAXIMIZE: bool
    HAS_WEIGHT_DECAY: bool
    HAS_MOMENTUM: bool
    NESTEROV: bool
    FIRST_STEP: bool
    DECOUPLED: bool

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "update"}


def no_update() -> UpdateArguments:
    """The arguments of a kernel that writes dW (UPDATE = 0: the rest is unread)."""
    return UpdateArguments(
        None, None, None, 0, 0, None, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, NO_UPDATE,
        False, False, False, False, False, False,
    )


def _expected_state(update: WeightUpdate) -> tuple[int, str]:
    if update.kind == UPDATE_SGD:
        if update.momentum != 0:
            return 1, "(momentum_buffer,) for SGD with momentum"
        return 0, "() for SGD without momentum"
    if update.kind == UPDATE_ADAM:
        return 2, "(exp_avg, exp_avg_sq) for Adam"
    raise ValueError(f"update.kind must be UPDATE_SGD ({UPDATE_SGD}) or UPDATE_ADAM ({UPDATE_ADAM}), got {update.kind!r}")


def update_arguments(update: WeightUpdate, weight: torch.Tensor) -> UpdateArguments:
    """The kernel arguments of ``update`` on ``weight``; raises ``ValueError`` naming the
    field when its kind, state or scalars cannot be applied to ``weight``."""
    count, expected = _expected_state(update)
    state = tuple(update.state)
    if len(state) != count:
        raise ValueError(f"update.state must be {expected}, got {len(state)} tensors")
    for i, s in enumerate(state):
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"update.state[{i}] must be a tensor, got {type(s).__name__}")
        if s.shape != weight.shape:
            raise ValueError(f"update.state[{i}] must have the weight's shape {tuple(weight.shape)}, "
                             f"got {tuple(s.shape)}")
        if s.device != weight.device:
            raise ValueError(f"update.state[{i}] must be on the weight's device {weight.device}, got {s.device}")
        if s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"update.state[{i}] dtype must be float32, bfloat16 or float16, got {s.dtype}")
        if s.stride() != state[0].stride():
            raise ValueError(f"update.state[{i}] must have the strides of update.state[0] {state[0].stride()}, "
                             f"got {s.stride()}")
        if s.data_ptr() == weight.data_ptr() or any(s.data_ptr() == o.data_ptr() for o in state[:i]):
            raise ValueError(f"update.state[{i}] must not share memory with the weight or another state tensor")
    if update.kind == UPDATE_SGD and update.nesterov and (update.momentum <= 0 or update.dampening != 0):
        raise ValueError(f"update.nesterov needs momentum > 0 and dampening = 0, got momentum={update.momentum!r}, "
                         f"dampening={update.dampening!r}")
    for name in ("lr", "weight_decay", "momentum", "dampening", "beta1", "beta2", "eps",
                 "bias_correction1", "bias_correction2_sqrt"):
        value = getattr(update, name)
        if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"update.{name} must be a finite number, got {value!r}")
    if update.kind == UPDATE_ADAM and (update.bias_correction1 == 0 or update.bias_correction2_sqrt == 0):
        raise ValueError(f"update.bias_correction1 and update.bias_correction2_sqrt must be nonzero, got "
                         f"{update.bias_correction1!r} and {update.bias_correction2_sqrt!r}")
    guard = update.guard
    if guard is None:
        guard = new_guard(weight.device)
    elif guard.dtype != torch.int32 or guard.shape != (2,) or not guard.is_contiguous() or guard.device != weight.device:
        raise ValueError(f"update.guard must be a contiguous int32 tensor of shape (2,) on {weight.device}, got "
                         f"{guard.dtype} of shape {tuple(guard.shape)} on {guard.device}")
    s1 = state[0] if state else None
    s2 = state[1] if len(state) > 1 else None
    return UpdateArguments(
        update, s1, s2, s1.stride(0) if state else 0, s1.stride(1) if state else 0, guard,
        float(update.lr), float(update.weight_decay), float(1 - update.lr * update.weight_decay),
        float(update.momentum), float(1 - update.dampening),
        float(update.beta2), float(1 - update.beta1), float(1 - update.beta2), float(update.eps),
        float(update.lr / update.bias_correction1) if update.kind == UPDATE_ADAM else 0.0,
        float(update.bias_correction2_sqrt),
        int(update.kind), bool(update.maximize), update.weight_decay != 0, update.momentum != 0,
        bool(update.nesterov), bool(update.first_step), bool(update.decoupled),
    )


def step_with_zero_gradient(
    args: UpdateArguments, weight: torch.Tensor, class_index: torch.Tensor | None, k: int, rows_per_chunk: int = 1 << 16
) -> None:
    """The step of a backward without rows (B = 0: every gradient is 0, but weight decay
    and momentum still move the weight rows in use), through the PyTorch rule
    :func:`~fused_margin.optim.update.apply_update_`, a bounded chunk of rows at a time."""
    update = args.update
    if int(args.guard_ptr[0]) != 0:  # non-finite inputs: nothing is written (B = 0: a rare, cheap sync)
        return
    args.guard_ptr[1] = 1
    if class_index is None:
        rows = torch.arange(weight.shape[0], device=weight.device)
    else:
        rows = (class_index.to(weight.device)[:, None] * k + torch.arange(k, device=weight.device)).reshape(-1)
    for begin in range(0, rows.numel(), rows_per_chunk):
        chunk = rows[begin:begin + rows_per_chunk]
        w = weight.index_select(0, chunk)
        state = tuple(s.index_select(0, chunk) for s in update.state)
        apply_update_(update, w, state, torch.zeros(w.shape, device=w.device, dtype=torch.float32))
        weight.index_copy_(0, chunk, w)
        for s, new in zip(update.state, state):
            s.index_copy_(0, chunk, new)
