"""The optimizers that run inside the backward: subclasses of ``torch.optim.SGD``, ``Adam``
and ``AdamW`` whose state lives where torch keeps it (``self.state[p]``, torch's keys), and
whose update is applied by :func:`fused_margin.optim.run_fused_backward` while the
backward forms the weight's gradient, chunk by chunk."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import registry
from ._backward import fused_backward
from .update import UPDATE_ADAM, UPDATE_SGD, WeightUpdate

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD", "InBackwardOptimizer"]

#: options of torch's optimizers that a fused update cannot honour: each must stay off
_REFUSED_FLAGS = ("foreach", "fused", "capturable", "differentiable", "amsgrad")


def _scalar_dtype() -> torch.dtype:
    # torch keeps Adam's step in float64 when that is the default dtype, else float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"optimizer option {name} must be a number or a 1-element tensor, got shape "
                             f"{tuple(value.shape)}")
        return float(value.item())
    return float(value)


class InBackwardOptimizer:
    """What the fused optimizers share: the weights are updated in the backward of the
    fused op (``weight.grad`` is never formed), so :meth:`step` does nothing to them. It
    exists for the training loop's sake (LR schedulers count it) and ends the step: a
    second backward before :meth:`step` or :meth:`zero_grad` is refused (gradient
    accumulation cannot be fused: the first backward has already updated the weight).

    ``sparse``: with ``class_index`` (sampled classes), update only the sampled rows
    (like ``torch.optim.SparseAdam``: a row's moments change only when it is sampled,
    Adam's bias correction follows the optimizer's global step count). By default every
    row is updated as the plain optimizer would (rows not sampled have a zero gradient,
    but their momentum, weight decay and moments still apply)."""

    #: GradScaler calls ``step`` itself, where the scaling is refused
    _step_supports_amp_scaling = True
    _kind: int = 0
    _plain: type[torch.optim.Optimizer]

    def _init_in_backward(self, sparse: bool) -> None:
        self.sparse = bool(sparse)
        # handle -> parameter, and the handles whose weight was updated since the last step()
        self._params_by_handle: dict[int, nn.Parameter] = {}
        self._gradient_hooks: dict[int, Any] = {}
        self._awaiting_step: set[int] = set()
        _refuse_plain_steps()

    def _detach(self, handle: int) -> None:
        """Stops updating the weight of ``handle`` in the backward (see
        :func:`fused_margin.optim.remove_optimizer_in_backward`)."""
        param = self._params_by_handle.pop(handle)
        self._awaiting_step.discard(handle)
        hook = self._gradient_hooks.pop(handle, None)
        if hook is not None:
            hook.remove()
        registry.unregister(param)
        param.__dict__.pop("_fused_margin_optimizer_object", None)

    # ---- torch.optim.Optimizer's interface ---------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        group = self.param_groups[-1]  # type: ignore[attr-defined]
        self._check_options(group)
        for p in group["params"]:
            _check_weight(p)
            owner = registry.fused_optimizer_handle(p)
            if owner:
                try:
                    registry.lookup(owner)
                except RuntimeError:
                    pass  # its optimizer no longer exists
                else:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} already has an optimizer in the backward; "
                        "one weight can have only one"
                    )
            handle = registry.register(p, self)
            self._params_by_handle[handle] = p
            # keep the optimizer alive as long as its weight (as torch's in-backward optimizers
            # are): `del optimizer` does not stop the updates; remove_optimizer_in_backward does
            p._fused_margin_optimizer_object = self
            if hasattr(p, "register_post_accumulate_grad_hook"):
                self._gradient_hooks[handle] = p.register_post_accumulate_grad_hook(_refuse_gradient)

    def _check_options(self, group: dict[str, Any], where: str = "") -> None:
        """Refuses the options a fused update cannot honour, wherever they come from (the
        constructor, ``add_param_group``, ``load_state_dict``, ``param_groups[i][...] =``)."""
        for flag in _REFUSED_FLAGS:
            if group.get(flag):
                raise ValueError(
                    f"optimizer option {flag}={group[flag]!r}{where} is not supported by an optimizer in the backward "
                    f"({self._plain.__name__}): leave it at its default (None or False)"
                )

    def step(self, closure=None, **kwargs):
        """Does nothing to the weights (the backward updated them); ends the step."""
        if kwargs.get("grad_scaler") is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(
                "GradScaler is not supported with an optimizer in the backward: the backward updates the weight "
                "with the scaled gradient before the scaler can unscale it or skip the step; train without "
                "GradScaler (bf16 autocast needs none), or use a plain optimizer"
            )
        unknown = set(kwargs) - {"grad_scaler"}
        if unknown:
            raise TypeError(f"step() got unexpected keyword arguments {sorted(unknown)}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._awaiting_step.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # type: ignore[misc]
        self._awaiting_step.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for i, group in enumerate(state_dict.get("param_groups", ())):
            self._check_options(group, f" (param_groups[{i}] of the state dict being loaded)")
        super().load_state_dict(state_dict)  # type: ignore[misc]
        # the kernels index the state like the weight: keep the weight's strides
        for p, state in self.state.items():  # type: ignore[attr-defined]
            for key, value in list(state.items()):
                if value is None:
                    del state[key]  # a plain SGD without momentum keeps a None buffer
                elif key != "step" and isinstance(value, Tensor) and value.stride() != p.stride():
                    state[key] = torch.empty_like(p).copy_(value)

    # ---- the update inside the backward ------------------------------------------------

    def _param(self, handle: int) -> tuple[nn.Parameter, dict[str, Any]]:
        param = self._params_by_handle[handle]
        for group in self.param_groups:  # type: ignore[attr-defined]
            if any(p is param for p in group["params"]):
                return param, group
        raise RuntimeError(f"the weight of shape {tuple(param.shape)} is no longer in its optimizer's param_groups")

    def _fused_backward(self, handle, backend, grads, saved, params, target_u=None):
        param, group = self._param(handle)
        index = next(i for i, g in enumerate(self.param_groups) if g is group)  # type: ignore[attr-defined]
        self._check_options(group, f" (param_groups[{index}])")
        if handle in self._awaiting_step:
            raise RuntimeError(
                "a second backward reached a weight that its optimizer in the backward already updated: gradient "
                "accumulation is not supported (call optimizer.step() or optimizer.zero_grad() after each "
                "backward; a loss may use a fused head's weight only once per backward)"
            )
        # reserved now (a deferred update completes at the end of the backward); released
        # when the step is skipped
        self._awaiting_step.add(handle)

        def on_done(updated: bool) -> None:
            if not updated:
                self._awaiting_step.discard(handle)

        try:
            return fused_backward(self, param, group, backend, grads, saved, params, target_u, on_done=on_done)
        except BaseException:
            self._awaiting_step.discard(handle)
            raise

    def _begin_update(self, param: Tensor, group: dict[str, Any]) -> tuple[WeightUpdate, Any]:
        """The step's :class:`WeightUpdate` (state tensors as the weight's views are made by
        the caller) and a function that commits the state (called once the update is done)."""
        raise NotImplementedError


class FusedSGD(InBackwardOptimizer, torch.optim.SGD):
    """``torch.optim.SGD`` applied inside the backward (state: ``momentum_buffer``)."""

    _kind = UPDATE_SGD
    _plain = torch.optim.SGD

    def __init__(self, params, *, sparse: bool = False, **kwargs) -> None:
        self._init_in_backward(sparse)
        torch.optim.SGD.__init__(self, params, **kwargs)

    def _begin_update(self, param, group):
        momentum = _as_float("momentum", group["momentum"])
        buffers: tuple[Tensor, ...] = ()
        first = False
        new: dict[str, Tensor] = {}
        if momentum != 0:
            # (self.state is a defaultdict: without momentum, no entry at all, as torch's SGD)
            buf = self.state[param].get("momentum_buffer")
            if buf is None:
                # torch sets buf = grad on its first step: written by the update (first_step)
                buf = torch.zeros_like(param, memory_format=torch.preserve_format)
                first = True
                new["momentum_buffer"] = buf
            buffers = (buf,)
        update = WeightUpdate(
            UPDATE_SGD, lr=_as_float("lr", group["lr"]), weight_decay=_as_float("weight_decay", group["weight_decay"]),
            maximize=bool(group["maximize"]), momentum=momentum,
            dampening=_as_float("dampening", group["dampening"]), nesterov=bool(group["nesterov"]),
            first_step=first, state=buffers,
        )

        def commit() -> None:
            if new:
                self.state[param].update(new)

        return update, commit


class FusedAdam(InBackwardOptimizer, torch.optim.Adam):
    """``torch.optim.Adam`` applied inside the backward (state: ``step``, ``exp_avg``,
    ``exp_avg_sq``)."""

    _kind = UPDATE_ADAM
    _plain = torch.optim.Adam
    _decoupled = False

    def __init__(self, params, *, sparse: bool = False, **kwargs) -> None:
        self._init_in_backward(sparse)
        self._plain.__init__(self, params, **kwargs)

    def _begin_update(self, param, group):
        state = self.state[param]
        new: dict[str, Tensor] = {}
        if "step" not in state:
            new = {
                "step": torch.tensor(0.0, dtype=_scalar_dtype()),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
        step_t = new.get("step", state.get("step"))
        exp_avg = new.get("exp_avg", state.get("exp_avg"))
        exp_avg_sq = new.get("exp_avg_sq", state.get("exp_avg_sq"))
        beta1, beta2 = (_as_float("betas", b) for b in group["betas"])
        t = float(step_t.item()) + 1.0
        decoupled = bool(group.get("decoupled_weight_decay", self._decoupled))
        update = WeightUpdate(
            UPDATE_ADAM, lr=_as_float("lr", group["lr"]), weight_decay=_as_float("weight_decay", group["weight_decay"]),
            maximize=bool(group["maximize"]), beta1=beta1, beta2=beta2, eps=_as_float("eps", group["eps"]),
            decoupled=decoupled, bias_correction1=1 - beta1**t, bias_correction2_sqrt=math.sqrt(1 - beta2**t),
            state=(exp_avg, exp_avg_sq),
        )

        def commit() -> None:
            state.update(new)
            step_t.add_(1)

        return update, commit


class FusedAdamW(FusedAdam, torch.optim.AdamW):
    """``torch.optim.AdamW`` applied inside the backward (Adam's state, decoupled weight decay)."""

    _plain = torch.optim.AdamW
    _decoupled = True


def _refuse_gradient(p: Tensor) -> None:
    # a gradient reached the weight by another path than the fused op: its optimizer in the
    # backward would never apply it (and step() does nothing), so say so instead. (The
    # hook also runs after the fused op's backward, with no gradient: nothing to refuse.)
    if p.grad is None:
        return
    p.grad = None
    raise RuntimeError(
        f"a weight of shape {tuple(p.shape)} with an optimizer in the backward received a gradient outside the "
        "fused op (plain autograd through it: backend='eager', a regularizer or another use of the weight); "
        "its optimizer would never apply it: use a plain optimizer for this weight"
    )


def _refuse_plain_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    # A plain optimizer over a weight that its optimizer in the backward still updates
    # would silently do nothing to it (the backward forms no gradient): refused.
    if isinstance(optimizer, InBackwardOptimizer) or not registry.any_registered():
        return
    if torch.compiler.is_compiling():
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if registry.live_owner(p) is not None:
                raise RuntimeError(
                    f"{type(optimizer).__name__}.step() over a weight of shape {tuple(p.shape)} that an optimizer in "
                    "the backward still updates (fused_margin.optim.apply_optimizer_in_backward): its backward forms "
                    "no gradient, so this optimizer would never move it. Call "
                    "fused_margin.optim.remove_optimizer_in_backward([weight]) first (and load the in-backward "
                    "optimizer's state_dict() into this one), or leave the weight out of this optimizer"
                )


_plain_step_hook = None


def _refuse_plain_steps() -> None:
    """Installs (once) the global step pre-hook that refuses plain steps of fused weights."""
    global _plain_step_hook
    if _plain_step_hook is None:
        _plain_step_hook = register_optimizer_step_pre_hook(_refuse_plain_step)


def _check_weight(p: Any) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"params must hold class weights (torch.nn.Parameter), got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"params must be floating-point class weights, got dtype {p.dtype}")
    if not p.is_leaf or not p.requires_grad:
        raise ValueError("params must be leaf tensors that require grad (a fused head's weight)")
    if p.dim() != 2:
        raise ValueError(
            f"params must be 2-D class weights (a fused head's weight), got a tensor of shape {tuple(p.shape)}"
        )
