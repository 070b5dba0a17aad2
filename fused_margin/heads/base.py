"""`MarginHead`: the base of every head module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _checks
from ..backends import available_backends
from ..functional import BackendName, Reduction, margin_cross_entropy
from ..logits import margin_free_logits
from ..ops import snapshot
from ..spec import MarginSpec

__all__ = ["MarginHead"]


def _positive_int(name: str, value: int) -> int:
    try:
        return _checks.positive_integer(name, value)
    except TypeError as e:
        raise ValueError(str(e)) from None


class MarginHead(nn.Module):
    """A classification head: owns the class weights and maps ``(embeddings, labels)``
    to the margin-softmax loss through the fused operation.

    Subclasses define :meth:`spec` (the head as a :class:`MarginSpec`, from the current
    state) and, if stateful, :meth:`update_state` (called once per training forward,
    before the loss, with detached inputs).

    Attributes:
        weight: (num_classes * num_subcenters, embedding_size) class weights
            (``nn.Linear.weight`` layout), initialized N(0, 0.01) as InsightFace does.
        bias: (num_classes,) or None.
        step: int64 scalar buffer, training forwards seen so far (annealed margins).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        num_subcenters: int = 1,
        bias: bool = False,
        reduction: Reduction = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        return_accuracy: bool = False,
        backend: BackendName = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        self.embedding_size = _positive_int("embedding_size", embedding_size)
        self.num_subcenters = _positive_int("num_subcenters", num_subcenters)
        self.reduction = _checks.reduction(reduction)
        self.ignore_index = _checks.integer("ignore_index", ignore_index)
        self.label_smoothing = _checks.label_smoothing(label_smoothing)
        self.return_accuracy = bool(return_accuracy)
        self.backend = _checks.choice("backend", backend, ["auto", *available_backends()])
        factory = {"dtype": dtype or torch.float32, "device": device}
        self.weight = nn.Parameter(torch.empty(num_classes * num_subcenters, embedding_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_classes, **factory))
        else:
            self.register_parameter("bias", None)
        # A buffer, not a Python int: it travels with state_dict(), and a compiled
        # training step updates it in the graph instead of recompiling for every value.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.reset_parameters()

    #: the initial value of each state buffer (see :meth:`materialize_state`)
    _STATE_INIT: dict[str, float] = {"step": 0}

    def materialize_state(self, device: torch.device | str) -> None:
        """Give the state buffers that live on the meta device real storage on ``device``,
        at their initial values; the weight stays where it is. For a head built with
        ``device='meta'`` whose spec and state (not weight) another module uses:
        :class:`fused_margin.distributed.ShardedMarginLoss`."""
        for name, buffer in list(self._buffers.items()):
            if buffer is not None and buffer.is_meta:
                value = torch.full((), self._STATE_INIT[name], dtype=buffer.dtype, device=device)
                self.register_buffer(name, value.expand(buffer.shape).clone())

    def _apply(self, fn, recurse=True):
        # .half(), .bfloat16(), .double(), .to(dtype) convert the weight (and bias) but not
        # the running statistics: an EMA with momentum 0.01 stalls in 16-bit floats. The
        # state follows the device only, so a head cast later holds the same state
        # dtype (fp32) as one built with ``dtype=``.
        state = {name: b for name, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in state.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                kept = new.to(old.dtype) if old.is_meta or new.is_meta else old.to(new.device, copy=True)
                self._buffers[name] = kept
        return self

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def spec(self) -> MarginSpec:
        raise NotImplementedError

    def update_state(self, embeddings: Tensor, labels: Tensor) -> None:
        """Stateful heads update their statistics here (training only)."""

    def update_state_from_target_cos(self, target_cos: Tensor, valid: Tensor) -> bool:
        """For a head whose statistics need only the rows' target cosines (B,) (``valid``:
        rows with a target), which a class-sharded head computes from the whole weight:
        updates them and returns True. False (the default): the statistics need the
        embeddings, through :meth:`update_state`."""
        return False

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Loss for (B, D) embeddings and (B,) integer labels (and the top-1 accuracy
        when ``return_accuracy``)."""
        self._check_inputs(embeddings, labels)
        if self.training:
            with torch.no_grad():
                self.update_state(embeddings.detach(), labels)
        result = margin_cross_entropy(
            embeddings,
            self.weight,
            labels,
            self.spec(),
            bias=self.bias,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            return_accuracy=self.return_accuracy,
            backend=self.backend,
            # the backward must see this step's value, not the buffer that the increment
            # below mutates (see ops.snapshot)
            step=snapshot(self.step),
        )
        if self.training:
            with torch.no_grad():
                self.step.add_(1)
        return result

    def _check_inputs(self, embeddings: Tensor, labels: Tensor | None = None) -> None:
        # Before anything reads them (the state update runs first): the errors name the
        # arguments the user passed, not the weight they are multiplied with.
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if labels is not None and not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            shape = "(" + ", ".join(str(s) for s in embeddings.shape) + ")"
            raise ValueError(
                f"embeddings must have shape (batch, embedding_size={self.embedding_size}), got {shape}"
            )

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """Margin-free logits (B, num_classes) for inference. Materializes B x C."""
        self._check_inputs(embeddings)
        return margin_free_logits(embeddings, self.weight, self.spec(), self.bias)

    def extra_repr(self) -> str:
        k = f", num_subcenters={self.num_subcenters}" if self.num_subcenters > 1 else ""
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}{k}, "
            f"spec={self.spec()!r}, backend={self.backend!r}"
        )
