"""Drop-in replacements for InsightFace's ``arcface_torch`` heads, on the fused kernels.

Change two imports and nothing else::

    # from losses import CombinedMarginLoss
    # from partial_fc_v2 import PartialFC_V2
    from fused_margin.insightface import CombinedMarginLoss, PartialFC_V2

    margin_loss = CombinedMarginLoss(64, *cfg.margin_list, cfg.interclass_filtering_threshold)
    module_partial_fc = PartialFC_V2(margin_loss, cfg.embedding_size, cfg.num_classes,
                                     cfg.sample_rate, cfg.fp16)

The constructors take arcface_torch's arguments, the modules expose the attributes its
training script reads (``weight``, ``class_start``, ``num_local``, ``sample_rate``,
``embedding_size``, ``num_classes``, ...), and the checkpoints are its per-rank
``{'weight'}`` dicts, loaded strictly. The loss is the value arcface_torch reports and
the gradients are those it computes, on the fused operation (no batch x classes logits).

**What is reproduced** (arcface_torch's ``losses.CombinedMarginLoss`` and
``partial_fc_v2.PartialFC_V2``, including the quirks):

* ``m1 == 1, m3 == 0``: ArcFace ``s * cos(theta_y + m2)`` with *no* fallback where
  ``theta_y + m2 > pi`` and a straight-through gradient (that of ``s * c_y``): arcface_torch
  applies the margin in place under ``torch.no_grad()``. The core equivalent is
  ``MarginSpec.arcface(s, m2, straight_through=True, beyond_pi='none')``.
* ``m3 > 0``: CosFace ``s * (c_y - m3)``; ``m1`` and ``m2`` are ignored, as there (a
  warning says so when they are not 1 and 0). The core ``fused_margin.CombinedMarginLoss``
  computes the combined formula ``s * (cos(m1 * theta + m2) - m3)`` instead, with an exact
  gradient (or ``straight_through=True``).
* Any other ``(m1, m3)`` raises here (arcface_torch raises at the first forward).
* ``interclass_filtering_threshold > 0``: a non-target cosine above it becomes 0 (its logit
  ``0`` stays in the softmax) with no gradient: the core's ``NonTargetKind.FILTERED``.
* The reported loss is the mean over the global batch of ``-log(max(p_y, 1e-30))`` (each
  row capped at ``-log(1e-30) = 69.08``), while the gradient is that of the *uncapped*
  cross-entropy, ``(softmax - onehot) / B_global``, as its hand-written backward computes.
* The cosines are clamped to [-1, 1] before the margin (a clamped value gets no gradient).
* Embedding gradients follow its DDP convention: each rank's embeddings receive
  ``world_size`` times ``dL/dx`` (a DDP-wrapped backbone averages them back to
  ``dL/dtheta``); the shard receives ``dL/dW_shard``.
* The initial weight: one ``torch.normal(0, 0.01, (num_local, embedding_size))`` draw from
  the default (CPU) generator, in the default dtype, and no other use of the global random
  state at construction: from the same seed, the same weight and the same random state
  after, bitwise. Construction holds one weight.
* Class sampling (``sample_rate < 1``) keeps every positive class of the shard and a random
  subset of the others, ``num_sample = int(sample_rate * num_local)`` in all: when the
  positives are at most ``num_sample``, ``torch.rand(num_local)`` drawn from the CPU's
  default generator and moved to the labels' device (one host-to-device copy of
  ``num_local`` floats per step on a GPU, as there), positives set to 2, top-k and sorted;
  when they are more, the positives alone and no draw. So the same seed keeps the same
  classes on every device, as arcface_torch does. ``weight_index`` holds them after a
  step. As there, it samples in eval mode too.
* The margins (``s``, ``m1``, ``m2``, ``m3``, ``interclass_filtering_threshold`` of
  :class:`CombinedMarginLoss`) are read at each forward: a changed margin applies at the
  next step.

**What differs, on purpose**: labels are never modified in place (arcface_torch's
``squeeze_()`` and its label remapping write into the caller's tensor); labels outside
``[0, num_classes)`` raise instead of silently adding 69.08 to the loss; batches may differ
in size across ranks and steps; ``fp16=True`` casts the embeddings to float16 before the
kernel (the kernels accumulate in fp32 whatever the input dtype) instead of running an
autocast region; the margin must be this module's :class:`CombinedMarginLoss` (or a
:class:`~fused_margin.MarginSpec`), not an arbitrary callable on materialized logits.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _checks
from .backends import available_backends
from .distributed import ShardedMarginLoss, full_weight_from_state_dicts, require_process_group, shard_weight
from .functional import BackendName
from .spec import MarginSpec

__all__ = ["CombinedMarginLoss", "PartialFC_V2", "ROW_LOSS_CAP"]

#: arcface_torch clamps each row's probability of its label at 1e-30 before the log.
ROW_LOSS_CAP: float = -math.log(1e-30)

class CombinedMarginLoss(nn.Module):
    """arcface_torch's ``CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold=0)``.

    Hand it to :class:`PartialFC_V2`, which runs it on the fused kernels. Called on
    materialized cosines ``(B, C)`` with labels ``(B,)`` or ``(B, 1)`` (-1: no target
    here) it returns arcface_torch's logits, out of place (for checks and small heads).

    ``s``, ``m1``, ``m2``, ``m3`` and ``interclass_filtering_threshold`` are read at each
    forward, as arcface_torch reads them: changing one (a margin schedule) takes effect
    at the next step; a combination it cannot compute raises there.
    """

    def __init__(self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0) -> None:
        super().__init__()
        self.s = _checks.real("s", s)
        self.m1, self.m2, self.m3 = _checks.real("m1", m1), _checks.real("m2", m2), _checks.real("m3", m3)
        self.interclass_filtering_threshold = _checks.real("interclass_filtering_threshold", interclass_filtering_threshold)
        # the attributes arcface_torch's module carries (computed once, as there)
        self.cos_m, self.sin_m = math.cos(self.m2), math.sin(self.m2)
        self.theta = math.cos(math.pi - self.m2)
        self.sinmm = math.sin(math.pi - self.m2) * self.m2
        self.easy_margin = False
        self._spec_cache: tuple[tuple, MarginSpec] | None = None
        self.spec()  # the combination, checked now

    def _margins(self) -> tuple:
        return self.s, self.m1, self.m2, self.m3, self.interclass_filtering_threshold

    def spec(self) -> MarginSpec:
        """The head as the fused kernels run it, from the current attributes."""
        key = self._margins()
        if self._spec_cache is None or self._spec_cache[0] != key:
            self._spec_cache = (key, _combined_margin_spec(*key))
        return self._spec_cache[1]

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """arcface_torch's output for cosines ``logits`` (B, C) and labels (B,) or (B, 1)
        (-1: no target in this row); neither input is modified."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be (batch, classes) cosines, got shape {tuple(logits.shape)}")
        labels = _flat_labels(labels, logits.shape[0]).to(logits.device)
        has_target = labels != -1
        if bool(((labels < -1) | (labels >= logits.shape[1])).any()):
            raise ValueError(f"labels must lie in [0, {logits.shape[1]}) or be -1 (no target here)")
        rows = torch.arange(logits.shape[0], device=logits.device)
        target = torch.zeros_like(logits, dtype=torch.bool)
        target[rows[has_target], labels[has_target]] = True
        out = logits
        t = self.interclass_filtering_threshold
        if t > 0:
            out = torch.where((out > t) & ~target, torch.zeros_like(out), out)
        c = out[rows[has_target], labels[has_target]]
        if self.m1 == 1.0 and self.m3 == 0.0:
            margin = torch.cos(torch.acos(c.clamp(-1.0, 1.0)) + self.m2)
            final = c + (margin - c).detach()  # margin in the value only, as the in-place no-grad ops
        else:
            final = c - self.m3
        out = out.index_put((rows[has_target], labels[has_target]), final)
        return out * self.s

    def extra_repr(self) -> str:
        return (
            f"s={self.s:g}, m1={self.m1:g}, m2={self.m2:g}, m3={self.m3:g}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold:g}"
        )


def _combined_margin_spec(s: float, m1: float, m2: float, m3: float, threshold: float) -> MarginSpec:
    """arcface_torch's two cases of ``CombinedMarginLoss`` as a :class:`MarginSpec`."""
    s = _checks.positive("s", s)
    m1, m2, m3 = _checks.real("m1", m1), _checks.real("m2", m2), _checks.real("m3", m3)
    t = _checks.real("interclass_filtering_threshold", threshold)
    t = t if t > 0 else 0.0
    if m1 == 1.0 and m3 == 0.0:
        if not 0.0 <= m2 < math.pi:
            raise ValueError(f"m2 must lie in [0, pi) for ArcFace (m1=1, m3=0), got {m2!r}")
        return MarginSpec.arcface(s, m2, straight_through=True, beyond_pi="none", interclass_filtering_threshold=t)
    if m3 > 0:
        if m1 != 1.0 or m2 != 0.0:
            warnings.warn(
                f"CombinedMarginLoss(m1={m1!r}, m2={m2!r}, m3={m3!r}) computes CosFace with m3 alone and ignores "
                f"m1 and m2, as arcface_torch does; fused_margin.CombinedMarginLoss computes the combined "
                f"formula s*(cos(m1*theta + m2) - m3)",
                stacklevel=4,
            )
        return MarginSpec.cosface(s, m3, interclass_filtering_threshold=t)
    raise ValueError(
        f"arcface_torch's CombinedMarginLoss computes ArcFace (m1=1, m3=0) or CosFace (m3>0) only, got "
        f"m1={m1!r}, m3={m3!r}; fused_margin.CombinedMarginLoss(margins=(m1, m2, m3)) computes the "
        f"combined formula"
    )


def _flat_labels(labels: Tensor, batch: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class indices), got dtype {labels.dtype}")
    if labels.shape not in ((batch,), (batch, 1)):
        raise ValueError(f"labels must have shape ({batch},) or ({batch}, 1), got {tuple(labels.shape)}")
    return labels.reshape(batch).long()  # a view or a copy: never the caller's tensor in place


class _PartialFCShards(ShardedMarginLoss):
    """The sharded head with arcface_torch's initial weight, its sampling rule and draw,
    and its per-row loss cap."""

    _row_loss_cap = ROW_LOSS_CAP
    #: arcface_torch's ``int(sample_rate * num_local)`` (0 is possible there)
    arcface_num_sample: int

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # arcface_torch: torch.normal(0, 0.01, (num_local, D)), the only draw at construction;
        # normal_ in place draws the same numbers, into the one weight
        self.weight.normal_(0.0, 0.01)

    def _keep(self, positive: Tensor) -> Tensor:
        """arcface_torch's rule: when the positives fit in ``num_sample``, the scores
        ``torch.rand(num_local)`` from the CPU generator, moved to the labels' device,
        positives set to 2.0, the top ``num_sample``, sorted; else the positives alone,
        and no draw."""
        if self.arcface_num_sample >= int(positive.sum()):
            scores = torch.rand(positive.shape[0]).to(positive.device)
            scores = torch.where(positive, torch.full_like(scores, 2.0), scores)
            return scores.topk(self.arcface_num_sample).indices.sort().values
        return positive.nonzero().flatten()


def _margin_spec(margin_loss: object) -> MarginSpec:
    if isinstance(margin_loss, MarginSpec):
        return margin_loss
    spec = getattr(margin_loss, "spec", None)
    spec = spec() if callable(spec) else None
    if not isinstance(spec, MarginSpec):
        raise TypeError(
            f"margin_loss must be fused_margin.insightface.CombinedMarginLoss (or a MarginSpec), got "
            f"{type(margin_loss).__name__}: a callable on materialized logits cannot run inside the fused kernels"
        )
    return spec


class PartialFC_V2(nn.Module):  # noqa: N801 (arcface_torch's name)
    """arcface_torch's ``PartialFC_V2(margin_loss, embedding_size, num_classes,
    sample_rate=1.0, fp16=False)`` on the fused kernels (see the module docstring for
    what it reproduces). Needs an initialized ``torch.distributed`` process group (NCCL
    or Gloo; a world of one process works).

    ``forward(local_embeddings (B_r, D), local_labels (B_r,) or (B_r, 1))`` returns the
    global batch's loss, the same on every rank; every rank calls it and ``backward``.

    Attributes (arcface_torch's): ``weight`` (num_local, D), ``rank``, ``world_size``,
    ``class_start``, ``num_local``, ``num_sample``, ``sample_rate``, ``embedding_size``,
    ``num_classes``, ``fp16``, ``margin_softmax``, ``last_batch_size`` (of the last step:
    batches may differ in size here), ``is_updated`` and ``init_weight_update`` (read by
    nothing, there either), ``weight_index`` (the kept local classes of the last sampled
    step). Not here: ``dist_cross_entropy`` (the fused operation computes the loss) and
    ``sample(labels, index_positive)`` (sampling runs inside ``forward``).
    """

    _version = 2

    def __init__(
        self,
        margin_loss: CombinedMarginLoss | MarginSpec,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        *,
        backend: BackendName = "auto",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        require_process_group("PartialFC_V2", "(as for arcface_torch's)")
        spec = _margin_spec(margin_loss)
        embedding_size = _checks.positive_integer("embedding_size", embedding_size)
        num_classes = _checks.positive_integer("num_classes", num_classes)
        sample_rate = _checks.in_range("sample_rate", sample_rate, 0.0, 1.0, low_open=True, high_open=False)
        fp16 = _checks.flag("fp16", fp16)
        backend = _checks.choice("backend", backend, ["auto", *available_backends()])
        self.margin_softmax = margin_loss
        # its weight: arcface_torch's one draw, in the default dtype, on the CPU (see reset_parameters)
        shards = _PartialFCShards(
            spec, num_classes, embedding_size, process_group=process_group, sample_rate=sample_rate,
            reduction="mean", ignore_index=None, embedding_grad="ddp", backend=backend, seed=0,
            dtype=torch.get_default_dtype(),
        )
        shards.train()  # arcface_torch samples whatever the mode
        self.__dict__["_shards"] = shards  # not a submodule: the state_dict is {'weight'} alone
        self.rank, self.world_size = shards.rank, shards.world_size
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.sample_rate, self.fp16 = sample_rate, fp16
        self.class_start = shards.class_start
        self.num_local = shards.class_end - shards.class_start
        self.num_sample = int(self.sample_rate * self.num_local)
        shards.arcface_num_sample = self.num_sample
        self.last_batch_size = 0
        # arcface_torch's flags, which nothing reads (there either)
        self.is_updated, self.init_weight_update = True, True
        self.weight_index: Tensor | None = None
        self.weight = shards.weight

    _shards: _PartialFCShards

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        shards = self._shards
        for name, buffer in shards._buffers.items():
            if buffer is not None:
                shards._buffers[name] = fn(buffer)
        return self

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        if not isinstance(local_embeddings, Tensor) or local_embeddings.dim() != 2:
            raise ValueError("local_embeddings must be a (batch, embedding_size) tensor")
        labels = _flat_labels(local_labels, local_embeddings.shape[0])
        self.last_batch_size = local_embeddings.shape[0]
        shards = self._shards
        if shards._parameters.get("weight") is not self.weight:  # follow load_state_dict(assign=True)
            shards.weight = self.weight
        shards._spec = _margin_spec(self.margin_softmax)  # its current margins, as arcface_torch reads them
        x = local_embeddings.half() if self.fp16 else local_embeddings
        loss = shards(x, labels)
        if shards.sampled_classes is not None:
            self.weight_index = shards.sampled_classes - self.class_start
        return loss

    @torch.no_grad()
    def load_full_weight(self, full_weight: Tensor | list) -> None:
        """Copy this rank's rows of a full ``(num_classes, D)`` weight, or of the one that
        a list of per-rank state dicts in rank order makes up (any world size)."""
        if not isinstance(full_weight, Tensor):
            full_weight = full_weight_from_state_dicts(full_weight)
        if full_weight.shape != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"full_weight must have shape ({self.num_classes}, {self.embedding_size}), "
                f"got {tuple(full_weight.shape)}"
            )
        self.weight.copy_(shard_weight(full_weight, self.rank, self.world_size))

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, rank={self.rank}/"
            f"{self.world_size}, classes=[{self.class_start}, {self.class_start + self.num_local}), "
            f"sample_rate={self.sample_rate:g}, spec={self._shards.spec()!r}"
        )
