"""Class-sharded margin heads across processes (model parallelism of the classifier,
as in InsightFace's Partial FC).

Every rank holds a contiguous slice of the classes (its *shard* of ``W``) and sees the
embeddings and labels of **every** rank (all-gathered). It runs the fused operation on
its shard for the whole global batch, and the per-row terms are combined across ranks:

* ``lse_neg``: all-reduce MAX of the shard values (a constant shift), then all-reduce SUM
  of ``exp(lse_shard - max)``: ``lse_neg = max + log(sum)``, with no overflow;
* the target logit ``z_y`` (and a regularizer such as MagFace's) is computed by the
  rank that owns the row's class, where ``target_u`` and ``||w_y||`` live, and summed
  (zero elsewhere);
* ``sum_neg`` (label smoothing): a SUM.

The per-row loss is then ``logaddexp(z_y, lse_neg) - z_y`` as in
:func:`fused_margin.margin_cross_entropy`.

**Split rule.** With ``C`` classes over ``n`` ranks, rank ``r`` owns classes
``[r*(C//n) + min(r, C%n), ...)``, ``C//n + (1 if r < C%n else 0)`` of them: the first
``C % n`` ranks hold one class more (:func:`shard_range`). With ``K`` sub-centers the
shard is rows ``start*K .. end*K`` of the full ``(C*K, D)`` weight.

**Loss and gradient convention.** Every rank returns the loss of the *global* batch
(the concatenation of all ranks' batches, in rank order): for ``reduction='mean'`` the
mean over all ranks' non-ignored rows, for ``'sum'`` their sum, the same number on every
rank, equal to what one process computes with the full ``W`` on the concatenated
batch. ``reduction='none'`` returns this rank's own rows ``(B_r,)``. Every rank must
call ``backward`` (the backward runs collectives). The gradients are exact, as if
the objective were the global loss counted once: the shard receives ``dL/dW_shard``, and
each rank's embeddings receive ``dL/dx_r`` (the rows of the single-process gradient).
Internally each rank back-propagates only through its own rows' losses (the value of
the other rows is added as a constant), so the sum over ranks of what is back-propagated
is the global loss exactly once, and the collectives in the backward are the true
adjoints (all-reduce SUM for an all-reduce SUM, reduce-scatter for an all-gather).

A backbone wrapped in ``DistributedDataParallel`` (or FSDP) *averages* its gradients
over ranks, so with exact embedding gradients it would receive ``dL/dtheta / world_size``.
The default ``embedding_grad='ddp'`` therefore multiplies the embeddings' gradients by
``world_size`` (Partial FC's convention): the backbone then receives exactly
``dL/dtheta``, the same as training the same global batch in one process. Pass
``embedding_grad='exact'`` when the backbone's gradients are *not* averaged over ranks
(no DDP/FSDP, or a hand-written all-reduce SUM): the embeddings then receive ``dL/dx_r``.
Do not wrap this module itself in DDP: its parameters differ across ranks by design.

**Class sampling** (``sample_rate < 1``, training only; Partial FC): each step, each
rank keeps every class of its shard that is a label in the global batch plus a random
subset of its other classes, ``max(1, int(sample_rate * C_shard))`` in all (or all the
positives if there are more), passed to the kernel as ``class_index`` (no gathered copy
of ``W``); only the kept rows receive gradient. The sample comes from a per-rank
``torch.Generator`` seeded with ``seed + rank``; :attr:`ShardedMarginLoss.sampled_classes`
holds the global ids this rank kept in the last step. The loss equals the single-process
loss with ``class_index`` = all ranks' kept classes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from .functional import BackendName, Reduction, detached_target_cos, fused_terms, loss_from_terms
from .heads.base import MarginHead
from .kernel_params import IGNORED_LABEL, acc_dtype
from .optim.registry import fused_optimizer_handle
from .optim.rules import check_target_reads_no_weight
from .spec import MarginSpec, NonTargetKind, TargetContext

__all__ = [
    "ShardedMarginLoss",
    "full_weight_from_state_dicts",
    "gather_full_weight",
    "reshard_state_dicts",
    "shard_range",
    "shard_weight",
]

EmbeddingGrad = Literal["exact", "ddp"]

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases (>= 2.4) have
# only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------
# The split rule and checkpoint helpers
# ----------------------------------------------------------------------------------


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes ``[start, end)`` owned by ``rank``: contiguous, the first
    ``num_classes % world_size`` ranks hold one class more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes={num_classes} must be at least world_size={world_size}: every rank needs one class"
        )
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_weight(full_weight: Tensor, rank: int, world_size: int, *, num_subcenters: int = 1) -> Tensor:
    """Rank ``rank``'s rows of a full ``(C*K, D)`` weight (a view), by :func:`shard_range`."""
    if full_weight.dim() != 2 or full_weight.shape[0] % num_subcenters:
        raise ValueError(
            f"full_weight must have shape (num_classes * {num_subcenters}, embedding_size), "
            f"got {tuple(full_weight.shape)}"
        )
    start, end = shard_range(full_weight.shape[0] // num_subcenters, rank, world_size)
    return full_weight[start * num_subcenters : end * num_subcenters]


_EXTRA_STATE_KEY = "_extra_state"


def _check_tiling(metas: list[Mapping[str, Any]], order: list[int]) -> tuple[int, int]:
    """The shards' metadata, in rank order, must tile [0, C); returns (C, K)."""
    num_classes, k = metas[0]["num_classes"], metas[0]["num_subcenters"]
    expected = 0
    for i in order:
        meta = metas[i]
        if meta["num_classes"] != num_classes or meta["num_subcenters"] != k:
            raise ValueError("the state dicts come from modules with different num_classes or num_subcenters")
        if meta["class_start"] != expected:
            raise ValueError(
                f"the shards do not tile [0, {num_classes}): expected one starting at class {expected}, "
                f"next is rank {meta['rank']} with [{meta['class_start']}, {meta['class_end']})"
            )
        expected = meta["class_end"]
    if expected != num_classes:
        raise ValueError(f"the shards cover classes [0, {expected}) of {num_classes}: some rank is missing")
    return num_classes, k


def _is_plain(state_dict: Mapping[str, Any]) -> bool:
    """A per-rank checkpoint without our metadata: arcface_torch's ``{'weight': shard}``."""
    return _EXTRA_STATE_KEY not in state_dict


def _plain_shards(state_dicts: Sequence[Mapping[str, Any]], num_subcenters: int) -> tuple[int, list[Tensor]]:
    """Checks that plain per-rank ``{'weight'}`` dicts, taken in rank order, tile the
    classes by :func:`shard_range`; returns the class count and the shards."""
    for r, sd in enumerate(state_dicts):
        extra = sorted(set(sd) - {"weight"})
        if "weight" not in sd or extra or not isinstance(sd["weight"], Tensor) or sd["weight"].dim() != 2:
            raise ValueError(
                f"state_dicts[{r}] must hold ShardedMarginLoss metadata ({_EXTRA_STATE_KEY!r}) or be a plain "
                f"per-rank {{'weight': (num_local, embedding_size) tensor}} (arcface_torch's); got keys {sorted(sd)}"
            )
    shards = [sd["weight"] for sd in state_dicts]
    rows = [w.shape[0] for w in shards]
    if any(n % num_subcenters for n in rows):
        raise ValueError(f"shard row counts {rows} are not multiples of num_subcenters={num_subcenters}")
    num_classes = sum(rows) // num_subcenters
    n = len(shards)
    expected = [shard_range(num_classes, r, n) for r in range(n)]
    if [(e - s) * num_subcenters for s, e in expected] != rows:
        raise ValueError(
            f"plain per-rank state dicts must be given in rank order and split {num_classes} classes over {n} "
            f"ranks as shard_range does (the first C % n ranks one class more); got shards of {rows} rows"
        )
    if len({(w.shape[1], w.dtype) for w in shards}) > 1:
        raise ValueError("the shards differ in embedding_size or dtype")
    return num_classes, shards


def full_weight_from_state_dicts(
    state_dicts: Sequence[Mapping[str, Any]], *, num_subcenters: int | None = None
) -> Tensor:
    """The full ``(C*K, D)`` weight from every rank's checkpoint: our
    :class:`ShardedMarginLoss` state dicts (any order), or arcface_torch's plain
    ``{'weight'}`` ones (``softmax_fc_gpu_{rank}.pt``), given in rank order."""
    if not state_dicts:
        raise ValueError("state_dicts is empty")
    if all(_is_plain(sd) for sd in state_dicts):
        return torch.cat(_plain_shards(state_dicts, num_subcenters or 1)[1])
    if any(_is_plain(sd) for sd in state_dicts):
        raise ValueError("state_dicts mixes plain {'weight'} dicts with ShardedMarginLoss ones")
    metas = [sd[_EXTRA_STATE_KEY] for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: metas[i]["rank"])
    _check_tiling(metas, order)
    return torch.cat([state_dicts[i]["weight"] for i in order])


def reshard_state_dicts(state_dicts: Sequence[Mapping[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Offline conversion of the per-rank ``state_dict()`` of a :class:`ShardedMarginLoss`
    (given in any order, all ranks) into ``world_size`` per-rank state dicts.

    Plain per-rank ``{'weight'}`` dicts (arcface_torch's ``PartialFC_V2`` checkpoints, and
    :class:`fused_margin.insightface.PartialFC_V2`'s), given in rank order, are resharded
    into plain ``{'weight'}`` dicts.

    The sampling generators are not carried over (each new rank keeps the generator of
    the module it is loaded into); the step and the head state are copied. Optimizer
    state (momentum) is not handled here: reshard it the same way, row for row.
    """
    if not state_dicts:
        raise ValueError("state_dicts is empty")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if all(_is_plain(sd) for sd in state_dicts):
        full = full_weight_from_state_dicts(state_dicts)
        return [{"weight": shard_weight(full, r, world_size).clone()} for r in range(world_size)]
    if any(_is_plain(sd) for sd in state_dicts):
        raise ValueError("state_dicts mixes plain {'weight'} dicts with ShardedMarginLoss ones")
    metas = [sd[_EXTRA_STATE_KEY] for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: metas[i]["rank"])
    num_classes, k = _check_tiling(metas, order)
    full = torch.cat([state_dicts[i]["weight"] for i in order])
    out = []
    for rank in range(world_size):
        start, end = shard_range(num_classes, rank, world_size)
        meta = dict(metas[order[0]], rank=rank, world_size=world_size, class_start=start, class_end=end)
        meta["sample_generator"] = None
        new = {key: value for key, value in state_dicts[order[0]].items() if key not in ("weight", _EXTRA_STATE_KEY)}
        new["weight"] = shard_weight(full, rank, world_size, num_subcenters=k).clone()
        new[_EXTRA_STATE_KEY] = meta
        out.append(new)
    return out


@overload
def gather_full_weight(module: ShardedMarginLoss, dst: None = ...) -> Tensor: ...
@overload
def gather_full_weight(module: ShardedMarginLoss, dst: int) -> Tensor | None: ...


@torch.no_grad()
def gather_full_weight(module: ShardedMarginLoss, dst: int | None = None) -> Tensor | None:
    """The full ``(C*K, D)`` weight, on every rank (``dst=None``) or only on rank ``dst``
    of the module's group (the others get None). A collective: every rank calls it."""
    group, world_size, rank = module.process_group, module.world_size, module.rank
    k = module.num_subcenters
    rows = [(e - s) * k for s, e in (shard_range(module.num_classes, r, world_size) for r in range(world_size))]
    max_rows = max(rows)
    # collectives need equal sizes: pad the shards (the first C % n ranks hold one more class)
    padded = F.pad(module.weight.detach(), (0, 0, 0, max_rows - rows[rank])).contiguous()
    if dst is None:
        gathered = padded.new_empty(world_size * max_rows, padded.shape[1])
        _all_gather_single(gathered, padded, group=group)
        blocks = list(gathered.split(max_rows))
    else:
        blocks = [torch.empty_like(padded) for _ in range(world_size)] if rank == dst else None
        dist.gather(padded, blocks, dst=_global_rank(group, dst), group=group)
        if rank != dst:
            return None
    return torch.cat([block[:n] for block, n in zip(blocks, rows)])


def require_process_group(owner: str, hint: str) -> None:
    """Raises unless a torch.distributed process group is initialized (``owner`` needs one)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{owner} needs an initialized torch.distributed process group: call "
            f"torch.distributed.init_process_group(...) first {hint}"
        )


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


# ----------------------------------------------------------------------------------
# Differentiable collectives (true adjoints)
# ----------------------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-shaped (b, ...) blocks into (n*b, ...); backward: the sum over
    ranks of the gradient of this rank's block (reduce-scatter), times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None, grad_scale: float) -> Tensor:
        ctx.group, ctx.grad_scale = group, grad_scale
        world_size = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        group = ctx.group
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        rows = grad.shape[0] // world_size
        if dist.get_backend(group) == dist.Backend.GLOO:
            # Gloo has no reduce-scatter before recent torch releases: all-reduce, keep ours.
            total = grad.clone()
            dist.all_reduce(total, group=group)
            out = total[rank * rows : (rank + 1) * rows].clone()
        else:
            out = grad.new_empty((rows, *grad.shape[1:]))
            _reduce_scatter_single(out, grad, group=group)
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM; backward: all-reduce SUM of the gradients (its adjoint, correct
    when each rank back-propagates a different function of the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=ctx.group)
        return out, None


def _all_reduce(x: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp.RedOpType) -> Tensor:
    out = x.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


# ----------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------


def _mismatch(name: str, values: Sequence[Any]) -> str:
    groups: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    parts = [
        f"{value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        for value, ranks in groups.items()
    ]
    return f"{name} differs across ranks: " + "; ".join(parts)


class ShardedMarginLoss(nn.Module):
    """A margin-softmax head whose ``num_classes`` classes are split over the ranks of a
    process group; see the module docstring for the split rule and the loss/gradient
    convention.

    Args:
        head_or_spec: a :class:`MarginSpec`, or a :class:`MarginHead` instance that supplies
            its spec and its state (CurricularFace's ``t``, AdaFace's norm statistics),
            updated from the global batch. A head's own ``weight`` is never used: build it
            with ``device='meta'`` so that it allocates nothing; its state buffers are then
            created here, at their initial values, on this module's device, and follow it
            across ``.to()``. Heads with a bias are not supported.
        num_classes: the global class count C (at least the world size).
        embedding_size: D.
        process_group: the group the classes are split over (default: the world).
        sample_rate: fraction of each shard's classes used per training step (Partial FC
            sampling; 1.0 = all).
        reduction, ignore_index, label_smoothing: as in
            :func:`fused_margin.margin_cross_entropy`, over the global batch;
            ``ignore_index=None``: no label value marks an ignored row.
        return_accuracy: also return the top-1 accuracy of the margin-free logits over
            the global batch (two more B-vector all-reduces).
        embedding_grad: 'ddp' (default: dL/dx times world_size, what a backbone wrapped in
            DistributedDataParallel or FSDP needs, since they average over ranks) or
            'exact' (dL/dx: pick it when nothing averages the backbone's gradients).
        backend: passed to the fused operation ('auto', 'reference', 'cpu', 'triton', ...).
        seed: seed of the sampling generators (rank r uses ``seed + r``); None: random.
        timeout: seconds the per-step input check waits for the other ranks before
            raising (instead of hanging until the process group's own timeout).

    Attributes:
        weight: (C_shard * K, D), this rank's classes ``[class_start, class_end)``.
        step: int64 buffer, training forwards seen (annealed margins).
        sampled_classes: (C_kept,) int64 global ids kept by this rank in the last sampled
            step, or None.
    """

    def __init__(
        self,
        head_or_spec: MarginSpec | MarginHead,
        num_classes: int,
        embedding_size: int,
        *,
        process_group: dist.ProcessGroup | None = None,
        sample_rate: float = 1.0,
        reduction: Reduction = "mean",
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        return_accuracy: bool = False,
        embedding_grad: EmbeddingGrad = "ddp",
        backend: BackendName = "auto",
        seed: int | None = None,
        timeout: float = 600.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        require_process_group("ShardedMarginLoss", "(torchrun sets the environment it reads)")
        if isinstance(head_or_spec, MarginHead):
            head: MarginHead | None = head_or_spec
            if head.bias is not None:
                raise ValueError("ShardedMarginLoss does not support heads with a bias")
            if head.embedding_size != embedding_size:
                raise ValueError(
                    f"the head was built with embedding_size={head.embedding_size}, but embedding_size={embedding_size}"
                )
            num_subcenters = head.num_subcenters
        elif isinstance(head_or_spec, MarginSpec):
            head = None
            num_subcenters = head_or_spec.num_subcenters
        else:
            raise TypeError(f"head_or_spec must be a MarginSpec or a MarginHead, got {type(head_or_spec).__name__}")
        # every argument through the shared rules (fused_margin/_checks.py), as the core heads
        num_classes = _checks.positive_integer("num_classes", num_classes)
        embedding_size = _checks.positive_integer("embedding_size", embedding_size)
        sample_rate = _checks.in_range("sample_rate", sample_rate, 0.0, 1.0, low_open=True, high_open=False)
        reduction = _checks.reduction(reduction)
        ignore_index = _checks.optional_integer("ignore_index", ignore_index)
        label_smoothing = _checks.label_smoothing(label_smoothing)
        return_accuracy = _checks.flag("return_accuracy", return_accuracy)
        embedding_grad = _checks.choice("embedding_grad", embedding_grad, ("exact", "ddp"))
        backend = _checks.backend(backend)
        seed = _checks.optional_integer("seed", seed)
        timeout = _checks.positive("timeout", timeout)

        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.class_start, self.class_end = shard_range(num_classes, self.rank, self.world_size)
        self.num_classes, self.embedding_size, self.num_subcenters = num_classes, embedding_size, num_subcenters
        self.sample_rate, self.reduction = float(sample_rate), reduction
        self.ignore_index = ignore_index
        self.label_smoothing, self.return_accuracy = float(label_smoothing), return_accuracy
        self.embedding_grad, self.backend, self.timeout = embedding_grad, backend, float(timeout)
        # not registered as a submodule: its weight must not reach state_dict() or optimizers
        self.__dict__["head"] = head
        self._spec = head_or_spec if head is None else None

        num_local = self.class_end - self.class_start
        factory = {"dtype": dtype or torch.float32, "device": device}
        self.weight = nn.Parameter(torch.empty(num_local * num_subcenters, embedding_size, **factory))
        if head is not None:
            head.materialize_state(self.weight.device)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.num_sample = min(num_local, max(1, int(self.sample_rate * num_local)))
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        self.generator = torch.Generator(device=self.weight.device)
        self.generator.manual_seed(self.seed + self.rank)
        self.sampled_classes: Tensor | None = None
        self.reset_parameters()

    head: MarginHead | None
    #: when set, each row's loss *value* is capped there (the gradient stays that of the
    #: uncapped loss): fused_margin.insightface reproduces arcface_torch's loss with it
    _row_loss_cap: float | None = None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def spec(self) -> MarginSpec:
        return self._spec if self.head is None else self.head.spec()

    @torch.no_grad()
    def load_full_weight(self, full_weight: Tensor | Sequence[Mapping[str, Any]]) -> None:
        """Copy this rank's rows of a full ``(C*K, D)`` weight (e.g. a single-process head's),
        or of the full weight that per-rank state dicts make up (ours, or arcface_torch's
        plain ``{'weight'}`` ones in rank order: :func:`full_weight_from_state_dicts`)."""
        if not isinstance(full_weight, Tensor):
            full_weight = full_weight_from_state_dicts(full_weight, num_subcenters=self.num_subcenters)
        if full_weight.shape != (self.num_classes * self.num_subcenters, self.embedding_size):
            raise ValueError(
                f"full_weight must have shape ({self.num_classes * self.num_subcenters}, {self.embedding_size}), "
                f"got {tuple(full_weight.shape)}"
            )
        self.weight.copy_(shard_weight(full_weight, self.rank, self.world_size, num_subcenters=self.num_subcenters))

    def _apply(self, fn, recurse=True):
        # The head is not a submodule (its weight must stay out of state_dict() and the
        # optimizers), but its state buffers follow this module across .to() / .double().
        super()._apply(fn, recurse)
        head = self.head
        if head is not None:
            for name, buffer in head._buffers.items():
                if buffer is not None and not buffer.is_meta:
                    head._buffers[name] = fn(buffer)
        return self

    # ---- checkpointing -------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        head_state = None
        if self.head is not None:
            head_state = {
                key: value for key, value in self.head.state_dict().items() if key not in ("weight", "bias", "step")
            }
        return {
            "num_classes": self.num_classes,
            "num_subcenters": self.num_subcenters,
            "embedding_size": self.embedding_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "class_start": self.class_start,
            "class_end": self.class_end,
            "sample_generator": self.generator.get_state(),
            "head_state": head_state,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = (self.num_classes, self.num_subcenters, self.class_start, self.class_end)
        theirs = (state["num_classes"], state["num_subcenters"], state["class_start"], state["class_end"])
        if mine != theirs:
            raise ValueError(
                f"this checkpoint holds classes [{state['class_start']}, {state['class_end']}) of "
                f"{state['num_classes']} (rank {state['rank']} of {state['world_size']}, "
                f"{state['num_subcenters']} sub-centers); this module holds [{self.class_start}, {self.class_end}) "
                f"of {self.num_classes} (rank {self.rank} of {self.world_size}, {self.num_subcenters} sub-centers). "
                f"Convert with fused_margin.distributed.reshard_state_dicts, or load a full weight with "
                f"load_full_weight"
            )
        if state.get("sample_generator") is not None:
            self.generator.set_state(state["sample_generator"])
        if state.get("head_state") is not None and self.head is not None:
            self.head.load_state_dict(state["head_state"], strict=False)

    # ---- forward ---------------------------------------------------------------------

    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> list[int]:
        """Gathers a few integers from every rank, then raises the same error on every rank
        if anything disagrees; returns the batch sizes. Without it, a rank with a wrong
        shape would hang or garble the big collectives that follow."""
        if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
            raise TypeError("embeddings and labels must be torch.Tensors")
        labels_ok = labels.dim() == 1 and not (labels.dtype.is_floating_point or labels.dtype == torch.bool)
        x_ok = embeddings.dim() == 2 and embeddings.dtype in _DTYPES
        batch = embeddings.shape[0] if x_ok else -1
        dim = embeddings.shape[1] if x_ok else -1
        # the first bad label and its position, as tensors: no host sync before the gather
        bad_label = torch.full((2,), -1, dtype=torch.int64, device=embeddings.device)
        if labels_ok and labels.shape[0] == batch and batch > 0:
            labels64 = labels.to(device=embeddings.device, dtype=torch.int64)
            bad = (labels64 < 0) | (labels64 >= self.num_classes)
            if self.ignore_index is not None:
                bad = bad & (labels64 != self.ignore_index)
            positions = torch.arange(batch, device=labels64.device)
            first = torch.where(bad, positions, torch.full_like(positions, batch)).min()
            found = first < batch
            value = labels64[first.clamp(max=batch - 1)]
            bad_label = torch.stack([torch.where(found, first, -1), torch.where(found, value, -1)])
        spec = self.spec()
        # which backward collectives will run: they must match across ranks, or backward hangs
        grad_path = (
            f"grad enabled={torch.is_grad_enabled()}, embeddings.requires_grad={embeddings.requires_grad}, "
            f"weight.requires_grad={self.weight.requires_grad}"
        )
        info = [
            int(x_ok), int(labels_ok), batch, dim, labels.shape[0] if labels.dim() >= 1 else -1,
            _DTYPES.index(embeddings.dtype) if x_ok else -1,
            self.num_classes, self.embedding_size, self.num_subcenters, round(self.sample_rate * 1e9),
            zlib.crc32(spec.name.encode()), int(self.training), zlib.crc32(grad_path.encode()),
        ]
        local = torch.cat([torch.tensor(info, dtype=torch.int64, device=embeddings.device), bad_label])
        gathered = local.new_empty(self.world_size * local.numel())
        try:
            work = _all_gather_single(gathered, local, group=self.process_group, async_op=True)
            work.wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as err:
            if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
                raise RuntimeError(
                    f"ShardedMarginLoss (rank {self.rank}): the input check across ranks failed; another rank "
                    f"may have exited"
                ) from err
            raise TimeoutError(
                f"ShardedMarginLoss (rank {self.rank}): the other ranks did not join the input check within "
                f"{self.timeout:g} s. Every rank must call forward with its batch; one may have failed or "
                f"skipped this step"
            ) from err
        rows = gathered.view(self.world_size, local.numel()).tolist()
        columns = list(zip(*rows))
        for r, row in enumerate(rows):
            if not row[0]:
                raise ValueError(f"rank {r}: embeddings must be a 2-D floating-point tensor (batch, embedding_size)")
            if not row[1] or row[4] != row[2]:
                raise ValueError(f"rank {r}: labels must be a 1-D integer tensor of shape ({row[2]},)")
        if len(set(columns[3])) > 1:
            raise ValueError("embeddings' " + _mismatch("embedding_size", columns[3]))
        names = ("dtype of embeddings", "num_classes", "module embedding_size", "num_subcenters",
                 "sample_rate", "head (spec name)", "training mode", "autograd setting")
        for name, column in zip(names, columns[5:13]):
            if len(set(column)) > 1:
                if name == "dtype of embeddings":
                    column = [_DTYPES[c] for c in column]
                elif name == "sample_rate":
                    column = [c / 1e9 for c in column]
                elif name == "autograd setting":
                    mine = f"[{grad_path}]"
                    column = [mine if c == column[self.rank] else "another" for c in column]
                elif name == "head (spec name)":
                    column = [spec.name if c == column[self.rank] else "another" for c in column]
                elif name == "training mode":
                    column = [bool(c) for c in column]
                raise ValueError(_mismatch(name, column))
        if columns[3][0] != self.embedding_size:
            raise ValueError(
                f"embeddings have embedding_size {columns[3][0]} on every rank, but this ShardedMarginLoss was "
                f"built with embedding_size={self.embedding_size}"
            )
        ignored = "" if self.ignore_index is None else f" or equal ignore_index={self.ignore_index}"
        for r, row in enumerate(rows):
            if row[13] >= 0:
                raise ValueError(
                    f"rank {r}: labels must lie in [0, {self.num_classes}){ignored}; got {row[14]} at position {row[13]}"
                )
        return list(columns[2])

    def _draw_scores(self, num_local: int) -> Tensor:
        """Uniform scores for the shard's classes; the ``num_sample`` highest are kept."""
        # drawn on the generator's device (the one given at construction), used on the labels'
        return torch.rand(num_local, generator=self.generator, device=self.generator.device)

    def _keep(self, positive: Tensor) -> Tensor:
        """The kept classes of the shard, as sorted shard indices, given its positive
        classes (a bool mask): every positive, and the highest scores up to ``num_sample``."""
        num_keep = max(self.num_sample, int(positive.sum()))
        scores = self._draw_scores(positive.shape[0]).to(positive.device)
        scores = torch.where(positive, torch.full_like(scores, 2.0), scores)
        return scores.topk(num_keep).indices.sort().values

    @torch.no_grad()
    def _sample(self, local_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Kept classes (sorted shard indices, :meth:`_keep`) and the labels remapped into them."""
        num_local = self.class_end - self.class_start
        positive = torch.zeros(num_local, dtype=torch.bool, device=local_labels.device)
        owned = local_labels >= 0
        positive[local_labels[owned]] = True
        index = self._keep(positive)
        position = torch.full((num_local,), -1, dtype=torch.int64, device=local_labels.device)
        position[index] = torch.arange(index.shape[0], device=local_labels.device)
        remapped = torch.where(owned, position[local_labels.clamp_min(0)], local_labels)
        return index, remapped

    def _global_target_cos(self, x_all: Tensor, local_labels: Tensor, spec: MarginSpec) -> Tensor:
        """Detached ``c_y`` of every row, from the rank owning its class (0 without target)."""
        cos = detached_target_cos(x_all, self.weight, local_labels, spec, None)
        return _all_reduce(cos, self.process_group, dist.ReduceOp.SUM)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Loss of the global batch for this rank's ``(B_r, D)`` embeddings and ``(B_r,)``
        labels (``(B_r,)`` per-row losses for reduction='none'); with ``return_accuracy``
        also the global top-1 accuracy. Every rank must call it, with the same options."""
        group, world_size, rank = self.process_group, self.world_size, self.rank
        sizes = self._check_inputs(embeddings, labels)
        batch, b_max = sizes[rank], max(sizes)
        device = embeddings.device

        # Gather the global batch; ranks with fewer rows pad (with rows that have no label).
        labels64 = labels.to(device=device, dtype=torch.int64)
        internal = labels64
        if self.ignore_index is not None:
            internal = torch.where(labels64 == self.ignore_index, torch.full_like(labels64, -1), labels64)
        labels_all = torch.empty(world_size * b_max, dtype=torch.int64, device=device)
        _all_gather_single(labels_all, F.pad(internal, (0, b_max - batch), value=-1), group=group)
        grad_scale = float(world_size) if self.embedding_grad == "ddp" else 1.0
        x_all = _GatherRows.apply(F.pad(embeddings, (0, 0, 0, b_max - batch)), group, grad_scale)
        valid = labels_all >= 0
        owned = (labels_all >= self.class_start) & (labels_all < self.class_end)
        # -1: the target lives on another rank (the row's negatives here still count);
        # ignored and padding rows are not part of the computation, whatever they hold
        elsewhere = torch.where(valid, torch.full_like(labels_all, -1), torch.full_like(labels_all, IGNORED_LABEL))
        local_labels = torch.where(owned, labels_all - self.class_start, elsewhere)
        x_used = torch.where(valid[:, None], x_all, torch.zeros_like(x_all))

        curricular = self.spec().non_target.kind == NonTargetKind.CURRICULAR
        target_cos = self._global_target_cos(x_all.detach(), local_labels, self.spec()) if curricular else None
        if self.training and self.head is not None:
            self._update_head_state(x_all.detach(), labels_all, sizes, b_max, target_cos, valid)
        spec = self.spec()
        row_threshold = spec.non_target.row_terms(target_cos) if curricular else None

        class_index = None
        num_used = self.num_classes
        # the same decision on every rank (a shard of one class "samples" all of it), so
        # the collectives below match
        if self.training and self.sample_rate < 1.0:
            class_index, local_labels = self._sample(local_labels)
            self.sampled_classes = class_index + self.class_start
            if self.label_smoothing > 0.0:
                count = torch.tensor([class_index.shape[0]], dtype=torch.int64, device=device)
                num_used = int(_all_reduce(count, group, dist.ReduceOp.SUM))

        # CurricularFace's threshold comes from the *global* target cosine (row_threshold)
        lse_shard, target_u, sum_neg, argmax = fused_terms(
            x_used, self.weight, local_labels, spec, class_index=class_index, row_threshold=row_threshold,
            backend=self.backend,
        )
        k = self.num_subcenters
        safe = local_labels.clamp_min(0)
        target_rows = (safe if class_index is None else class_index.index_select(0, safe)) * k
        step = self.step.clone()
        ctx = TargetContext(
            target_u, x_used, self.weight, target_rows, spec.normalize_embeddings, spec.normalize_weight, step
        )
        mine = local_labels >= 0
        zero = torch.zeros_like(target_u)
        parts = [torch.where(mine, spec.target(ctx).to(target_u.dtype), zero)]
        if spec.regularizer is not None:
            parts.append(torch.where(mine, spec.regularizer(ctx).to(target_u.dtype), zero))
        if self.label_smoothing > 0.0:
            parts.append(sum_neg)
        if fused_optimizer_handle(self.weight):
            check_target_reads_no_weight(ctx)

        # lse over all ranks' classes: shift by the (constant) max, sum the exponentials.
        shift = _all_reduce(lse_shard, group, dist.ReduceOp.MAX)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        parts.append(torch.exp(lse_shard - shift))
        summed = _SumOverRanks.apply(torch.stack(parts), group)
        target_logit, exp_sum = summed[0], summed[-1]
        has_negative = exp_sum > 0
        lse_neg = torch.where(
            has_negative, shift + torch.log(torch.where(has_negative, exp_sum, torch.ones_like(exp_sum))),
            torch.full_like(exp_sum, -math.inf),
        )
        sum_neg_all = summed[-2] if self.label_smoothing > 0.0 else sum_neg
        loss_all = loss_from_terms(target_logit, lse_neg, sum_neg_all, num_used, self.label_smoothing)
        if spec.regularizer is not None:
            loss_all = loss_all + summed[1]
        loss_all = torch.where(valid, loss_all, torch.zeros_like(loss_all))
        if self._row_loss_cap is not None:
            # the value of each row capped (arcface_torch's clamp of p_y at 1e-30), the
            # gradient that of the uncapped loss (what its backward computes)
            loss_all = loss_all + (loss_all.clamp_max(self._row_loss_cap) - loss_all).detach()

        # Back-propagate this rank's rows only; the others' value is a constant (see the
        # module docstring: the sum over ranks is then the global loss, counted once).
        own = loss_all[rank * b_max : rank * b_max + batch]
        if self.reduction == "none":
            loss = own
        else:
            # value: exactly the global sum (bitwise the same on every rank); gradient: own rows
            own_sum = own.sum()
            loss = loss_all.sum().detach() + (own_sum - own_sum.detach())
            if self.reduction == "mean":
                loss = loss / valid.sum().clamp_min(1).to(loss.dtype)
        if self.training:
            with torch.no_grad():
                self.step.add_(1)
        if not self.return_accuracy:
            return loss
        return loss, self._accuracy(x_all.detach(), labels_all, argmax, class_index, spec, valid, loss.dtype)

    @torch.no_grad()
    def _accuracy(
        self, x_all: Tensor, labels_all: Tensor, argmax: Tensor, class_index: Tensor | None, spec: MarginSpec,
        valid: Tensor, dtype: torch.dtype,
    ) -> Tensor:
        """Global top-1 of the margin-free logits ``s * u``: each rank's best class and its
        logit (recomputed, O(B*K*D)), the max over ranks, ties to the lowest class."""
        k = self.num_subcenters
        best = argmax if class_index is None else class_index.index_select(0, argmax)
        rows = (best[:, None] * k + torch.arange(k, device=best.device)).reshape(-1)
        acc = acc_dtype(x_all, self.weight)
        w = self.weight.index_select(0, rows).to(acc).view(best.shape[0], k, self.weight.shape[1])
        x = x_all.to(acc)
        if spec.normalize_embeddings:
            x = F.normalize(x, dim=1)
        if spec.normalize_weight:
            w = F.normalize(w, dim=2)
        logit = spec.scale * torch.einsum("bd,bkd->bk", x, w).amax(dim=1)
        best_logit = _all_reduce(logit, self.process_group, dist.ReduceOp.MAX)
        candidate = torch.where(logit == best_logit, best + self.class_start, torch.full_like(best, self.num_classes))
        predicted = _all_reduce(candidate, self.process_group, dist.ReduceOp.MIN)
        correct = ((predicted == labels_all) & valid).sum().to(dtype)
        return correct / valid.sum().clamp_min(1).to(dtype)

    @torch.no_grad()
    def _update_head_state(
        self, x_all: Tensor, labels_all: Tensor, sizes: list[int], b_max: int, target_cos: Tensor | None,
        valid: Tensor,
    ) -> None:
        """The head's statistics from the global batch, identically on every rank."""
        head = self.head
        # a head whose statistics need only the target cosines (CurricularFace) takes the
        # global ones: its own update_state would read its (unused) full weight
        if target_cos is not None and head.update_state_from_target_cos(target_cos, valid):
            return
        real = torch.cat([torch.arange(r * b_max, r * b_max + n, device=x_all.device) for r, n in enumerate(sizes)])
        labels = labels_all.index_select(0, real)
        labels = torch.where(labels < 0, torch.full_like(labels, head.ignore_index), labels)
        head.update_state(x_all.index_select(0, real), labels)

    def extra_repr(self) -> str:
        k = f", num_subcenters={self.num_subcenters}" if self.num_subcenters > 1 else ""
        sampling = f", sample_rate={self.sample_rate:g}" if self.sample_rate < 1.0 else ""
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}{k}, rank={self.rank}/"
            f"{self.world_size}, classes=[{self.class_start}, {self.class_end}){sampling}, spec={self.spec()!r}, "
            f"backend={self.backend!r}"
        )
