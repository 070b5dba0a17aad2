"""The one operation, ``fused_margin::margin_lse``, as a `torch.library` custom op.

Its forward and backward are separate custom ops whose implementation is the named
backend's; the backward formula and the fake (meta) kernels are registered once here,
so every backend shares the autograd and ``torch.compile`` story (the op is opaque to
the compiler: ``fullgraph=True`` sees no graph break).
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields

import torch
from torch import Tensor

from .backends import get_backend
from .kernel_params import IGNORED_LABEL, KernelParams, SavedTensors, UpstreamGrads, acc_dtype, values

__all__ = ["OpOptions", "forward_args", "label_checks", "margin_lse", "prepare_labels", "set_label_checks", "snapshot"]

_OUT = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


# The label checks read values on the host (a sync): CUDA-graph capture cannot contain
# them, so the op says so, and Inductor's cudagraphs keep it out of a captured graph
# (or skip the graph) instead of failing during capture.
_HOST_SYNC_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


#: How ``prepare_labels`` checks labels and ``class_index``: 'host' (the default) reads
#: the verdict on the host and raises a ValueError naming the bad value and its position,
#: a host synchronization per step; 'device' checks on the device without a sync
#: (``torch._assert_async``: a bad label stops the CUDA stream with a device-side
#: assertion, whose message names no value), so that a training loop can queue its next
#: step. Set with :func:`set_label_checks` or ``FUSED_MARGIN_LABEL_CHECKS=device``.
_LABEL_CHECK_MODES = ("host", "device")
_label_checks: str | None = None


def set_label_checks(mode: str) -> None:
    """'host' (default: a clear error, one host sync per call) or 'device' (no sync)."""
    global _label_checks
    if mode not in _LABEL_CHECK_MODES:
        raise ValueError(f"label checks must be one of {_LABEL_CHECK_MODES}, got {mode!r}")
    _label_checks = mode


def label_checks() -> str:
    mode = _label_checks or os.environ.get("FUSED_MARGIN_LABEL_CHECKS") or "host"
    if mode not in _LABEL_CHECK_MODES:
        raise ValueError(f"FUSED_MARGIN_LABEL_CHECKS must be one of {_LABEL_CHECK_MODES}, got {mode!r}")
    return mode


def _refuse_any(bad: Tensor, entries: Tensor, rule: str, on_device: bool, host_detail: str = "") -> None:
    """Refuses ``entries`` where ``bad`` holds, ``rule`` saying what they must be: on the
    device, an assertion without a sync; on the host, a ValueError naming the first bad
    entry and its position (after ``host_detail``)."""
    if on_device:
        torch._assert_async(~bad.any(), rule)
    elif bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(f"{rule}{host_detail}; got {int(entries[position])} at position {position}")


@torch.library.custom_op("fused_margin::prepare_labels", mutates_args=(), tags=_HOST_SYNC_TAGS)
def prepare_labels(
    labels: Tensor, num_classes: int, ignore_index: int, class_index: Tensor | None = None, num_weight_classes: int = 0
) -> Tensor:
    """Checks every label is in ``[0, num_classes)`` or ``ignore_index`` and returns int64
    labels with ignored rows as ``IGNORED_LABEL`` (the kernels' "not part of the
    computation" value). With ``class_index``
    it also checks that every entry names a class of the weight, ``[0, num_weight_classes)``:
    the kernels read weight rows through it, so a bad entry would read out of bounds.

    A custom op so that the data-dependent checks stay out of ``torch.compile`` graphs.
    """
    on_device = label_checks() == "device"
    if class_index is not None and class_index.numel() > 0:
        bad_index = (class_index < 0) | (class_index >= num_weight_classes)
        _refuse_any(bad_index, class_index, f"class_index entries must lie in [0, {num_weight_classes})", on_device,
                    " (the classes of weight)")
    labels64 = labels.to(torch.int64)
    ignored = labels64 == ignore_index
    bad = ~ignored & ((labels64 < 0) | (labels64 >= num_classes))
    _refuse_any(bad, labels64, f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}", on_device)
    return torch.where(ignored, torch.full_like(labels64, IGNORED_LABEL), labels64)


@prepare_labels.register_fake
def _(labels: Tensor, num_classes: int, ignore_index: int, class_index: Tensor | None = None,
      num_weight_classes: int = 0) -> Tensor:
    return torch.empty_like(labels, dtype=torch.int64)


# ---- the flat schemas, generated from the bundles' fields ------------------------------
#
# A custom op's schema must be flat (Tensors and scalars: what makes ``fullgraph=True``
# see no graph break). Below it, everything travels as the bundles of
# :mod:`fused_margin.kernel_params`; this is the one place that flattens and unflattens.


@dataclass(frozen=True)
class OpOptions:
    """How the operation runs: the backend's name, and the fused optimizer that updates
    the weight inside the backward (:mod:`fused_margin.optim`; 0: none, the backward
    returns the weight's gradient)."""

    backend: str
    optimizer: int = 0


_SCHEMA_TYPES = {"Tensor": "Tensor", "Tensor | None": "Tensor?", "bool": "bool", "float": "float", "int": "int",
                 "str": "str", "NonTargetKind": "int"}
_FORWARD_INPUTS = fields(SavedTensors)[:6]  # x, weight, labels, bias, class_index, row_threshold
_FORWARD_OUTPUTS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"


def _schema(groups, returns: str) -> str:
    flat = [f for group in groups for f in group]
    args = []
    trailing_defaults = True  # a schema's defaults can only end it
    for f in reversed(flat):
        arg = f"{_SCHEMA_TYPES[str(f.type)]} {f.name}"
        trailing_defaults = trailing_defaults and f.default is not MISSING
        if trailing_defaults:
            arg += f"={f.default!r}"
        args.append(arg)
    return f"({', '.join(reversed(args))}) -> {returns}"


def _unflatten(flat: tuple, *classes) -> list:
    """``flat`` cut into one instance of each class, in order (a class's fields)."""
    out, at = [], 0
    for cls in classes:
        n = len(fields(cls))
        out.append(cls(*flat[at:at + n]))
        at += n
    return out


def _forward_inputs(flat: tuple) -> tuple[tuple, KernelParams, OpOptions]:
    n = len(_FORWARD_INPUTS)
    params, options = _unflatten(flat[n:], KernelParams, OpOptions)
    return flat[:n], params, options


@torch.library.custom_op(
    "fused_margin::margin_lse", mutates_args=(),
    schema=_schema((_FORWARD_INPUTS, fields(KernelParams), fields(OpOptions)), _FORWARD_OUTPUTS),
)
def margin_lse(*flat) -> _OUT:
    """``(lse_neg, target_u, sum_neg, argmax, row_scale, col_scale)``; see
    :mod:`fused_margin.kernel_params` for the math. Arguments: the six forward inputs,
    then the fields of :class:`KernelParams` and :class:`OpOptions` (:func:`forward_args`)."""
    inputs, params, options = _forward_inputs(flat)
    outputs = get_backend(options.backend).forward(*inputs, params)
    # custom ops may not return views of their inputs
    return tuple(o.clone() if o._base is not None else o for o in outputs)  # type: ignore[return-value]


def forward_args(x, weight, labels, bias, class_index, row_threshold, params: KernelParams,
                 options: OpOptions) -> tuple:
    """``margin_lse``'s flat arguments."""
    return (x, weight, labels, bias, class_index, row_threshold, *values(params), *values(options))


@margin_lse.register_fake
def _(*flat):
    (x, weight, _labels, _bias, class_index, _threshold), params, _options = _forward_inputs(flat)
    acc = acc_dtype(x, weight)
    rows = x.shape[0]
    num_cols = weight.shape[0] if class_index is None else class_index.shape[0] * params.num_subcenters
    vec = x.new_empty(rows, dtype=acc)
    return (
        vec,
        x.new_empty(rows, dtype=acc),
        x.new_empty(rows, dtype=acc),
        x.new_empty(rows, dtype=torch.int64),
        x.new_empty(rows, dtype=acc),
        x.new_empty(num_cols, dtype=acc),
    )


@dataclass(frozen=True)
class FusedUpdateInputs:
    """What only a fused optimizer's backward reads (None without one): the forward's
    ``target_u``, checked for finiteness before the weight is updated."""

    target_u: Tensor | None = None


_BACKWARD_CLASSES = (UpstreamGrads, SavedTensors, KernelParams, OpOptions, FusedUpdateInputs)


@torch.library.custom_op(
    "fused_margin::margin_lse_backward", mutates_args=(),
    schema=_schema([fields(c) for c in _BACKWARD_CLASSES], "(Tensor, Tensor, Tensor)"),
)
def margin_lse_backward(*flat) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)``; grad_bias is an empty tensor without bias, and
    so is grad_weight when a fused optimizer updated the weight instead. Arguments: the
    fields of :class:`UpstreamGrads`, :class:`SavedTensors`, :class:`KernelParams`,
    :class:`OpOptions` and :class:`FusedUpdateInputs`, in order."""
    grads, saved, params, options, extra = _unflatten(flat, *_BACKWARD_CLASSES)
    backend = get_backend(options.backend)
    if options.optimizer:
        from .optim import run_fused_backward

        grad_x, grad_b = run_fused_backward(backend, grads, saved, params, options.optimizer, extra.target_u)
        grad_w = None
    else:
        grad_x, grad_w, grad_b = backend.backward(grads, saved, params)
    # two distinct empty tensors: outputs of a custom op may not alias each other
    return (grad_x, saved.x.new_empty(0) if grad_w is None else grad_w,
            saved.x.new_empty(0) if grad_b is None else grad_b)


# With a fused optimizer the backward's effect is the weight's update, and no output a
# graph uses may come of it (no weight gradient; none for x when x needs none): compiled
# graphs must not drop it as dead code. (Its schema cannot declare the in-place update:
# it happens only when OpOptions.optimizer names an optimizer.)
_BACKWARD_OVERLOAD = torch.ops.fused_margin.margin_lse_backward.default
if hasattr(torch.fx.node, "has_side_effect"):
    torch.fx.node.has_side_effect(_BACKWARD_OVERLOAD)
else:
    torch.fx.node._side_effectful_functions.add(_BACKWARD_OVERLOAD)


@margin_lse_backward.register_fake
def _(*flat):
    _grads, saved, _params, options, _extra = _unflatten(flat, *_BACKWARD_CLASSES)
    x, weight, bias = saved.x, saved.weight, saved.bias
    grad_w = x.new_empty(0) if options.optimizer else torch.empty_like(weight)
    grad_b = x.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(x), grad_w, grad_b


def _setup_context(ctx, inputs, output) -> None:
    tensors, params, options = _forward_inputs(tuple(inputs))
    x, weight, labels, bias, class_index, row_threshold = tensors
    lse_neg, target_u, _sum_neg, argmax, row_scale, col_scale = output
    ctx.params, ctx.options = params, options
    # target_u only for a fused optimizer (its finiteness check before updating the weight)
    fused_target_u = target_u if options.optimizer else None
    ctx.optional = (bias is not None, class_index is not None, row_threshold is not None, fused_target_u is not None)
    saved = [x, weight, labels, lse_neg, row_scale, col_scale]
    saved += [t for t in (bias, class_index, row_threshold, fused_target_u) if t is not None]
    ctx.save_for_backward(*saved)
    ctx.mark_non_differentiable(argmax, row_scale, col_scale)


def _backward(ctx, grad_lse, grad_target_u, grad_sum, _grad_argmax, _grad_r, _grad_q):
    x, weight, labels, lse_neg, row_scale, col_scale, *optional = ctx.saved_tensors
    it = iter(optional)
    bias, class_index, row_threshold, target_u = (next(it) if present else None for present in ctx.optional)
    zeros = torch.zeros_like(lse_neg)
    # An output the loss does not use arrives as None.
    grads = UpstreamGrads(*(zeros if g is None else g.contiguous() for g in (grad_lse, grad_target_u, grad_sum)))
    saved = SavedTensors(x, weight, labels, bias, class_index, row_threshold, lse_neg, row_scale, col_scale)
    grad_x, grad_w, grad_b = margin_lse_backward(
        *values(grads), *values(saved), *values(ctx.params), *values(ctx.options),
        *values(FusedUpdateInputs(target_u)),
    )
    if ctx.options.optimizer:
        grad_w = None
        if torch.compiler.is_compiling():
            # While a compiled graph's backward is traced, the op is not run: say here what it
            # does at run time (it writes the weight), so that another node of the graph
            # that saved the weight and is traced after this one fails to compile with
            # PyTorch's "modified by an inplace operation" error instead of reading a weight
            # that the compiled backward may already have updated. (At run time the op
            # itself tells autograd, when it writes.)
            torch.autograd.graph.increment_version(weight)
    num_inputs = len(_FORWARD_INPUTS) + len(fields(KernelParams)) + len(fields(OpOptions))
    return (grad_x, grad_w, None, grad_b if bias is not None else None) + (None,) * (num_inputs - 4)


margin_lse.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        f"double backward (create_graph=True, then a backward through the gradient) is not supported by the "
        f"fused backend {ctx.backend!r}; backend='eager' supports it (plain autograd through the logits)"
    )


def _backward_setup_context(ctx, inputs, output) -> None:
    ctx.backend = _unflatten(tuple(inputs), *_BACKWARD_CLASSES)[3].backend


# Without a formula, PyTorch's own error would ask for register_autograd.
margin_lse_backward.register_autograd(_no_double_backward, setup_context=_backward_setup_context)


@torch.library.custom_op("fused_margin::snapshot", mutates_args=())
def snapshot(value: Tensor) -> Tensor:
    """A copy of ``value`` that a compiled graph keeps as a saved tensor.

    A head's step counter is read by the loss and then incremented in place. A clone
    is not enough under ``torch.compile``: AOTAutograd's partitioner may recompute a
    cheap copy in the backward graph from the buffer itself, which by then holds the
    incremented value. A custom op is opaque to it, so its output is saved instead."""
    return value.clone()


@snapshot.register_fake
def _(value: Tensor) -> Tensor:
    return torch.empty_like(value)
