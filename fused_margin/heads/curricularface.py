"""CurricularFace (Huang et al. 2020): ArcFace target; a non-target ``c_j`` harder than
the target (``c_j > cos(theta_y + m)``) becomes ``c_j * (t + c_j)``, with ``t`` the
exponential moving average (momentum 0.01) of the batch's mean target cosine, updated
before the loss as in the authors' code."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks
from ..functional import detached_target_cos
from ..ops import prepare_labels
from ..spec import MarginSpec, NonTarget, NonTargetKind
from .base import MarginHead, SpecHead
from .combined import CosineMarginTarget

__all__ = ["CurricularFaceLoss", "curricularface_spec"]


@MarginSpec.register_factory("curricularface")
def curricularface_spec(
    scale: float = 64.0, margin: float = 0.5, t: float | Tensor = 0.0, *, straight_through: bool = False
) -> MarginSpec:
    """``t``: the modulation coefficient, a number or a 0-dim float tensor (the head's
    running ``t``, read on the device)."""
    s = _checks.positive("scale", scale)
    m = _checks.in_range("margin", margin, 0.0, math.pi)
    return MarginSpec(
        s,
        CosineMarginTarget(s, m2=m, straight_through=_checks.flag("straight_through", straight_through)),
        NonTarget(NonTargetKind.CURRICULAR, margin=m, t=t if isinstance(t, Tensor) else _checks.real("t", t)),
        name="curricularface",
    )


class CurricularFaceLoss(SpecHead, factory=curricularface_spec, supplied=("t",)):
    """``t`` is a 0-dim float32 buffer: it travels with ``state_dict()``, and its update
    runs on the embeddings' device with no host sync, so a compiled training step
    (``fullgraph=True``) keeps it in the graph. ``momentum``: that of its average."""

    def __init__(self, num_classes: int, embedding_size: int, *, momentum: float = 0.01, **keywords) -> None:
        momentum = _checks.in_range("momentum", momentum, 0.0, 1.0, low_open=True, high_open=False)
        super().__init__(num_classes, embedding_size, **keywords)  # checks the margin keywords with t = 0
        self.momentum = momentum
        self.register_buffer("t", torch.zeros((), dtype=torch.float32, device=self.weight.device))
        self._refresh_spec()

    _STATE_INIT = {**MarginHead._STATE_INIT, "t": 0.0}

    def _refresh_spec(self) -> None:
        self._spec = self.make_spec(**self.margin_arguments(), t=self.t)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): a new ``t`` tensor
        super()._apply(fn, recurse)
        self._refresh_spec()
        return self

    def materialize_state(self, device: torch.device | str) -> None:
        super().materialize_state(device)
        self._refresh_spec()

    def spec(self) -> MarginSpec:
        # The spec holds the buffer itself (updated in place), so it is built outside a
        # compiled step: Dynamo (torch 2.11) cannot construct the spec's dataclasses. A
        # buffer replaced some other way (``load_state_dict(assign=True)``) is seen here.
        if self._spec.non_target.t is not self.t:
            self._refresh_spec()
        return self._spec

    def update_state(self, embeddings: Tensor, labels: Tensor) -> None:
        internal = prepare_labels(labels, self.num_classes, self.ignore_index)
        cos = detached_target_cos(embeddings, self.weight, internal, self.spec(), None)
        self.update_t(cos, internal >= 0)

    def update_state_from_target_cos(self, target_cos: Tensor, valid: Tensor) -> bool:
        self.update_t(target_cos, valid)
        return True

    @torch.no_grad()
    def update_t(self, target_cos: Tensor, valid: Tensor) -> None:
        """``t <- momentum * mean(target_cos[valid]) + (1 - momentum) * t``; unchanged
        when no row is valid or the batch's mean is not finite (a NaN or inf embedding
        or weight row: the step that GradScaler skips must not corrupt ``t``; no warning,
        so that compiled graphs stay whole). In place, with tensor ops only (no host sync)."""
        count = valid.sum()
        total = torch.where(valid, target_cos, torch.zeros_like(target_cos)).sum()
        mean = (total.float() / count.clamp_min(1)).to(self.t.dtype)
        updated = self.momentum * mean + (1.0 - self.momentum) * self.t
        self.t.copy_(torch.where((count > 0) & torch.isfinite(mean), updated, self.t))
