"""One optimizer step on rows of the class weights: the contract every backend's fused
update follows, and its PyTorch definition (the specification the kernels are tested
against).

For a row ``w`` with gradient ``g`` (computed in the acc dtype, fp32 or fp64; ``w`` and
its state are read in their own dtype, the math is done in the acc dtype and the results
are rounded once to the stored dtype), in this order, as ``torch.optim`` does with
``foreach=False``:

``UPDATE_SGD`` (state: ``(momentum_buffer,)`` when momentum != 0, else ``()``)
    g = -g if maximize
    g = g + weight_decay * w                         (weight_decay != 0)
    buf = g if first_step else momentum * buf + (1 - dampening) * g   (momentum != 0)
    g = g + momentum * buf if nesterov else buf                       (momentum != 0)
    w = w - lr * g

``UPDATE_ADAM`` (state: ``(exp_avg, exp_avg_sq)``; ``decoupled``: AdamW)
    g = -g if maximize
    w = w * (1 - lr * weight_decay) if decoupled, else g = g + weight_decay * w
    m = lerp(m, g, 1 - beta1)                        (m + (1 - beta1) * (g - m))
    v = beta2 * v + (1 - beta2) * g * g
    w = w - (lr / bias_correction1) * m / (sqrt(v) / bias_correction2_sqrt + eps)

``bias_correction1 = 1 - beta1**t`` and ``bias_correction2_sqrt = sqrt(1 - beta2**t)``
for the step ``t`` being taken (host scalars, computed once per step).

**The guard.** A backend that applies the update in its kernels, chunk by chunk, cannot
see the whole gradient before it writes the first rows. ``WeightUpdate.guard`` (int32,
``(2,)``, on the weight's device) is how it reports, and how it is stopped:

* ``guard[0]``, the status: 0 while every gradient met so far was finite. Before writing
  a chunk of rows (a chunk of classes on the C++ backends, a tile of rows x columns in the
  Triton kernels) the backend checks that chunk's gradient; a non-finite one is not
  applied and sets ``GUARD_NON_FINITE_GRADIENT``, and from then on nothing more is
  written (every write first reads the status). The caller may set a bit before the
  call (``GUARD_NON_FINITE_INPUTS``): then nothing at all is written.
* ``guard[1]``, set to 1 by the first write of any weight row: with a non-zero status,
  it tells whether the weight was left untouched (0) or partly updated (1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GUARD_NON_FINITE_GRADIENT", "GUARD_NON_FINITE_INPUTS", "UPDATE_ADAM", "UPDATE_SGD", "WeightUpdate",
    "apply_update_", "new_guard",
]

UPDATE_SGD = 1
UPDATE_ADAM = 2

#: ``guard[0]`` bits: a backend found a non-finite gradient (and wrote nothing after it);
#: the caller found the backward's inputs non-finite (nothing may be written)
GUARD_NON_FINITE_GRADIENT = 1
GUARD_NON_FINITE_INPUTS = 2


def new_guard(device: torch.device | str, inputs_finite: Tensor | None = None) -> Tensor:
    """A fresh guard (see the module docstring); ``inputs_finite`` (a bool tensor on
    ``device``): when False, the guard already forbids every write (no host sync)."""
    guard = torch.zeros(2, dtype=torch.int32, device=device)
    if inputs_finite is not None:
        guard[0] = torch.where(inputs_finite, 0, GUARD_NON_FINITE_INPUTS)
    return guard


@dataclass(frozen=True)
class WeightUpdate:
    """One step of a fused optimizer, resolved to host scalars; ``state`` holds tensors of
    the weight's shape, indexed by weight row like the weight itself."""

    kind: int
    lr: float
    weight_decay: float = 0.0
    maximize: bool = False
    # SGD
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    first_step: bool = False
    # Adam / AdamW
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    decoupled: bool = False
    bias_correction1: float = 1.0
    bias_correction2_sqrt: float = 1.0
    state: tuple[Tensor, ...] = ()
    #: see the module docstring; None: the caller checks the whole gradient itself
    guard: Tensor | None = None

    def scalars(self) -> tuple[float, ...]:
        """The scalars in the order the compiled kernels take them."""
        return (
            float(self.kind), self.lr, self.weight_decay, float(self.maximize), self.momentum, self.dampening,
            float(self.nesterov), float(self.first_step), self.beta1, self.beta2, self.eps,
            float(self.decoupled), self.bias_correction1, self.bias_correction2_sqrt,
        )


def apply_update_(update: WeightUpdate, w: Tensor, state: tuple[Tensor, ...], grad: Tensor) -> None:
    """Applies ``update`` in place to the rows ``w`` (a view of the weight) and their
    ``state`` (views of the state tensors at the same rows), with ``grad`` their gradient."""
    acc = grad.dtype if grad.dtype == torch.float64 else torch.float32
    g = grad.to(acc)
    wf = w.to(acc)
    if update.maximize:
        g = -g
    # The same operations as torch.optim's single-tensor (foreach=False) steps, so that
    # fp32 rows get the very same roundings.
    if update.kind == UPDATE_SGD:
        if update.weight_decay != 0:
            g = g.add(wf, alpha=update.weight_decay)
        if update.momentum != 0:
            (buf_t,) = state
            if update.first_step:
                buf = g
            else:
                buf = buf_t.to(acc).mul(update.momentum).add(g, alpha=1 - update.dampening)
            buf_t.copy_(buf)
            g = g.add(buf, alpha=update.momentum) if update.nesterov else buf
        wf = wf.add(g, alpha=-update.lr)
    elif update.kind == UPDATE_ADAM:
        m_t, v_t = state
        if update.weight_decay != 0:
            if update.decoupled:
                wf = wf.mul(1 - update.lr * update.weight_decay)
            else:
                g = g.add(wf, alpha=update.weight_decay)
        m = m_t.to(acc).lerp(g, 1 - update.beta1)
        v = v_t.to(acc).mul(update.beta2).addcmul(g, g, value=1 - update.beta2)
        m_t.copy_(m)
        v_t.copy_(v)
        denom = (v.sqrt() / update.bias_correction2_sqrt).add(update.eps)
        wf = wf.addcdiv(m, denom, value=-(update.lr / update.bias_correction1))
    else:
        raise ValueError(f"unknown update kind {update.kind}")
    w.copy_(wf)
