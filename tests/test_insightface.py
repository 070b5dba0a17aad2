"""fused_margin.insightface against an independent float64 model of arcface_torch.

The model (:func:`arcface_torch_model`) follows arcface_torch's ``PartialFC_V2`` and
``CombinedMarginLoss`` step by step, for every rank in one process:

1. all-gather: the global batch ``E`` and labels ``Y`` are the ranks' in rank order;
2. rank ``r`` owns ``num_local = C // n + (r < C % n)`` classes from
   ``class_start = (C // n) * r + min(r, C % n)``; a label outside becomes -1, the others
   ``y - class_start``;
3. sampling (``sample_rate < 1``, :func:`arcface_torch_sample`): ``num_sample =
   int(sample_rate * num_local)``; if the positives fit, ``perm = torch.rand(num_local)``
   (rank ``r``'s generator state), positives set to 2, the top ``num_sample`` indices,
   sorted; else the positives; labels are re-indexed with ``searchsorted`` and the shard
   is ``W_r[index]``;
4. cosines ``normalize(E) @ normalize(W_r).T``, clamped to [-1, 1] (with autograd);
5. inter-class filtering (threshold > 0): non-target cosines above it multiplied by 0;
6. margin: ArcFace (m1 = 1, m3 = 0) replaces the target cosine by ``cos(acos(c) + m2)``
   *in place under no_grad* (so the gradient is that of ``c``); CosFace (m3 > 0)
   subtracts m3 with autograd; then everything times ``s``;
7. cross-entropy over all ranks' logits: the value ``-mean(log(max(p_y, 1e-30)))``, the
   gradient of the logits written out as arcface_torch's backward does,
   ``(softmax - onehot) / B_global`` (not the gradient of the capped value);
8. that gradient back through step 4-6 with autograd; each rank's embeddings receive
   ``world_size`` times their rows of it (arcface_torch's all-gather backward).
"""

from __future__ import annotations

import datetime
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fused_margin as fm
from fused_margin.distributed import full_weight_from_state_dicts, reshard_state_dicts
from fused_margin.insightface import ROW_LOSS_CAP, CombinedMarginLoss, PartialFC_V2
from tests.utils import assert_rel_close, run_ranks, tolerance

# float64. Near theta = 0 the target logit s * cos(theta + m) has condition number
# ~1/sin(theta) in c, so there a 1e-16 difference in how c is rounded (the kernel's GEMM
# vs normalize-then-matmul) moves the loss by up to ~1e-7: the rows at theta = 0 and pi
# are built so that every computation gives c = +-1 exactly (powers of two on one axis).
TOL64 = tolerance("insightface", torch.float64)

# (s, m1, m2, m3, interclass_filtering_threshold): arcface_torch's configs and the quirks
MARGINS = {
    "arcface": (64.0, 1.0, 0.5, 0.0, 0.0),
    "cosface": (64.0, 1.0, 0.0, 0.4, 0.0),
    "combined_is_cosface": (64.0, 0.9, 0.4, 0.15, 0.0),  # m1, m2 ignored there
    "arcface_filtered": (64.0, 1.0, 0.5, 0.0, 0.2),
    "cosface_filtered": (32.0, 1.0, 0.0, 0.35, 0.1),
}


# ----------------------------------------------------------------------------------
# The model of arcface_torch (float64)
# ----------------------------------------------------------------------------------


def _shard(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    num_local = num_classes // world_size + int(rank < num_classes % world_size)
    start = num_classes // world_size * rank + min(rank, num_classes % world_size)
    return start, num_local


def arcface_torch_sample(local: torch.Tensor, num_local: int, num_sample: int) -> torch.Tensor:
    """arcface_torch's ``PartialFC_V2.sample``: the kept shard classes, sorted. When the
    positives (labels >= 0) fit in ``num_sample``, ``torch.rand(num_local)`` from the CPU
    generator, positives set to 2, the top ``num_sample``; else the positives, no draw."""
    positive = torch.unique(local[local >= 0], sorted=True)
    if num_sample - positive.numel() >= 0:
        perm = torch.rand(size=[num_local])
        perm[positive] = 2.0
        return perm.topk(num_sample).indices.sort().values
    return positive


def arcface_torch_model(
    xs: list[torch.Tensor], labels: list[torch.Tensor], weight: torch.Tensor, margins: tuple, *,
    sample_rate: float = 1.0, seed: int = 0,
) -> dict[str, Any]:
    s, m1, m2, m3, threshold = margins
    world_size = len(xs)
    e = torch.cat(xs).double().detach().requires_grad_(True)
    y = torch.cat([lab.reshape(-1) for lab in labels]).long()
    w_full = weight.double().detach().requires_grad_(True)
    num_classes, batch = w_full.shape[0], e.shape[0]
    rows = torch.arange(batch)
    per_rank = []
    for r in range(world_size):
        start, num_local = _shard(num_classes, r, world_size)
        local = torch.where((y >= start) & (y < start + num_local), y - start, torch.full_like(y, -1))
        index = torch.arange(num_local)
        if sample_rate < 1:
            torch.manual_seed(seed + r)
            index = arcface_torch_sample(local, num_local, int(sample_rate * num_local))
            local = torch.where(local >= 0, torch.searchsorted(index, local.clamp_min(0)), local)
        w_r = w_full[start:start + num_local][index]
        cos = (F.normalize(e, dim=1) @ F.normalize(w_r, dim=1).T).clamp(-1.0, 1.0)
        has = local >= 0
        is_target = torch.zeros_like(cos, dtype=torch.bool)
        is_target[rows[has], local[has]] = True
        if threshold > 0:
            dirty = ((cos > threshold) & ~is_target).double()
            cos = (1.0 - dirty) * cos
        if m1 == 1.0 and m3 == 0.0:
            with torch.no_grad():
                cos[rows[has], local[has]] = torch.cos(torch.acos(cos[rows[has], local[has]]) + m2)
        else:
            cos = cos.index_put((rows[has], local[has]), cos[rows[has], local[has]] - m3)
        per_rank.append({"z": cos * s, "local": local, "index": index, "start": start})
    z_all = torch.cat([p["z"] for p in per_rank], dim=1).detach()
    target_col = torch.zeros(batch, dtype=torch.long)
    offset = 0
    for p in per_rank:
        has = p["local"] >= 0
        target_col[has] = p["local"][has] + offset
        offset += p["z"].shape[1]
    prob = torch.softmax(z_all, dim=1)
    loss = -torch.log(prob[rows, target_col].clamp_min(1e-30)).mean()
    dz = (prob - F.one_hot(target_col, z_all.shape[1]).double()) / batch
    zs = [p["z"] for p in per_rank]
    grads = torch.autograd.grad(zs, (e, w_full), list(dz.split([z.shape[1] for z in zs], dim=1)))
    de, dw = grads
    bounds = [0]
    for x in xs:
        bounds.append(bounds[-1] + x.shape[0])
    return {
        "loss": loss.detach(),
        "dx": [world_size * de[bounds[r]:bounds[r + 1]] for r in range(world_size)],
        "dW": [dw[_shard(num_classes, r, world_size)[0]:][: _shard(num_classes, r, world_size)[1]]
               for r in range(world_size)],
        "weight_index": [p["index"] for p in per_rank],
        "row_loss": -torch.log(prob[rows, target_col]),
    }


def _special_rows(weight: torch.Tensor, labels: torch.Tensor, dim: int) -> torch.Tensor:
    """Embeddings with rows at theta = 0, theta near pi, theta = 3.0 (theta + m > pi) and
    theta = pi (probability of the label below 1e-30 at s = 64: the loss is capped), the
    rest random; the weight rows of rows 0 and 3's labels are set (in place) for c = +-1."""
    x = torch.randn(labels.shape[0], dim, dtype=torch.float64)
    if labels[3] == labels[0]:
        labels[3] = (labels[0] + 1) % weight.shape[0]
    for b, axis, sign in ((0, 0, 1.0), (3, 1, -1.0)):  # c = 1 and c = -1, exactly
        weight[labels[b]] = 0.0
        weight[labels[b], axis] = 0.5
        x[b] = 0.0
        x[b, axis] = 2.0 * sign
    w = F.normalize(weight, dim=1)

    def at_angle(b: int, theta: float) -> None:
        u = w[labels[b]]
        v = torch.randn(dim, dtype=torch.float64)
        v = F.normalize(v - (v @ u) * u, dim=0)
        x[b] = 2.5 * (math.cos(theta) * u + math.sin(theta) * v)

    at_angle(1, math.pi - 1e-4)
    at_angle(2, 3.0)
    return x


def _inputs(world_size: int, num_classes: int, sizes: list[int], dim: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (sum(sizes),), generator=gen)
    torch.manual_seed(seed + 7919)  # not the weight's stream
    x = _special_rows(weight, labels, dim)
    xs, ls, start = [], [], 0
    for b in sizes:
        xs.append(x[start:start + b])
        ls.append(labels[start:start + b].reshape(-1, 1) if len(ls) % 2 == 0 else labels[start:start + b])
        start += b
    return {"x": xs, "labels": ls, "weight": weight}


# ----------------------------------------------------------------------------------
# One process: a Gloo group of one, in this process
# ----------------------------------------------------------------------------------


def _run(module: PartialFC_V2, x: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad()
    loss = module(x, labels)
    loss.backward()
    return {"loss": loss.detach(), "dx": x.grad, "dW": module.weight.grad.clone()}


def _check(got: dict, want: dict, rank: int, tol: float, what: str) -> None:
    assert_rel_close(got["loss"], want["loss"], tol, f"{what}: loss")
    assert_rel_close(got["dx"], want["dx"][rank], tol, f"{what}: dx")
    assert_rel_close(got["dW"], want["dW"][rank], tol, f"{what}: dW")


@pytest.mark.parametrize("name", sorted(MARGINS))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_world_of_one_matches_arcface_torch(world_of_one, name, backend):
    data = _inputs(1, 13, [9], 6, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        margin = CombinedMarginLoss(*MARGINS[name])
    module = PartialFC_V2(margin, 6, 13, backend=backend).double()
    module.load_full_weight(data["weight"])
    labels = data["labels"][0]
    before = labels.clone()
    got = _run(module, data["x"][0], labels)
    assert labels.shape == before.shape and torch.equal(labels, before)  # not modified in place
    want = arcface_torch_model(data["x"], data["labels"], data["weight"], MARGINS[name])
    _check(got, want, 0, TOL64, name)
    if name in ("arcface", "cosface"):
        assert float(want["row_loss"][3]) > ROW_LOSS_CAP  # the capped row is there


def test_world_of_one_triton_fp32(world_of_one):
    data = _inputs(1, 13, [9], 6, seed=4)
    for name in ("arcface", "cosface_filtered"):
        module = PartialFC_V2(CombinedMarginLoss(*MARGINS[name]), 6, 13, backend="triton")
        module.load_full_weight(data["weight"].float())
        got = _run(module, data["x"][0].float(), data["labels"][0])
        want = arcface_torch_model(data["x"], data["labels"], data["weight"], MARGINS[name])
        _check(got, want, 0, 1e-5, name)


def test_theta_beyond_pi_value(world_of_one):
    """One row at theta = 3.0 (m = 0.5): arcface_torch's target logit is s * cos(3.5) with
    no fallback; the core ArcFace's default fallback s * (cos 3 - m sin m) makes the loss
    larger by s * (cos 3.5 - cos 3 + m sin m) = 18.76. This module gives arcface_torch's."""
    w = torch.eye(4, dtype=torch.float64)
    x = torch.tensor([[math.cos(3.0), math.sin(3.0), 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0])
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 4, 4, backend="reference").double()
    module.load_full_weight(w)
    ours = float(module(x, labels).detach())
    model = float(arcface_torch_model([x], [labels], w, MARGINS["arcface"])["loss"])
    core = float(fm.margin_cross_entropy(x, w, labels, fm.MarginSpec.arcface(64.0, 0.5), backend="reference"))
    assert ours == pytest.approx(model, rel=1e-12)
    gap = 64.0 * (math.cos(3.5) - math.cos(3.0) + 0.5 * math.sin(0.5))
    assert gap == pytest.approx(18.76, abs=0.01) and core - ours == pytest.approx(gap, rel=1e-10)


def test_margin_module_on_logits_matches_model():
    """Called on materialized cosines, CombinedMarginLoss returns arcface_torch's logits,
    with its gradient, and leaves its inputs alone."""
    cos = (torch.rand(7, 10, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    labels = torch.tensor([[0], [3], [-1], [9], [2], [2], [5]])
    for name, margins in MARGINS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = CombinedMarginLoss(*margins)
        before = cos.detach().clone()
        out = module(cos, labels)
        assert torch.equal(cos.detach(), before)
        s, m1, m2, m3, t = margins
        ref = cos.detach().clone()
        flat = labels.reshape(-1)
        has = flat >= 0
        rows = torch.arange(7)[has]
        if t > 0:
            mask = ref > t
            mask[rows, flat[has]] = False
            ref[mask] = 0.0
        if m1 == 1.0 and m3 == 0.0:
            ref[rows, flat[has]] = torch.cos(torch.acos(ref[rows, flat[has]]) + m2)
        else:
            ref[rows, flat[has]] -= m3
        assert_rel_close(out, s * ref, 1e-14, name)
        upstream = torch.randn(7, 10, dtype=torch.float64)
        (grad,) = torch.autograd.grad(out, cos, upstream)
        keep = torch.ones_like(ref)
        if t > 0:
            keep[mask] = 0.0
        assert torch.equal(grad, s * upstream * keep), name


def test_checkpoints_are_arcface_torchs(world_of_one):
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 11)
    state = module.state_dict()
    assert list(state) == ["weight"] and state["weight"].shape == (11, 8)
    theirs = {"weight": torch.randn(11, 8)}
    module.load_state_dict(theirs, strict=True)
    assert torch.equal(module.weight, theirs["weight"])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        module.load_state_dict({"weight": theirs["weight"], "step": torch.tensor(0)}, strict=True)
    # arcface_torch's per-rank files of a 3-GPU run (11 classes: 4, 4, 3), resharded to 2
    full = torch.randn(11, 8)
    three = [{"weight": full[0:4].clone()}, {"weight": full[4:8].clone()}, {"weight": full[8:11].clone()}]
    two = reshard_state_dicts(three, 2)
    assert [list(sd) for sd in two] == [["weight"], ["weight"]]
    assert torch.equal(two[0]["weight"], full[:6]) and torch.equal(two[1]["weight"], full[6:])
    assert torch.equal(full_weight_from_state_dicts(two), full)
    module.load_full_weight(three)
    assert torch.equal(module.weight, full)
    with pytest.raises(ValueError, match="rank order"):
        reshard_state_dicts([three[2], three[0], three[1]], 2)
    with pytest.raises(ValueError, match="got keys"):
        reshard_state_dicts([{"weight": full[:6], "momentum": full[:6]}, {"weight": full[6:]}], 2)


def test_bad_arguments(world_of_one):
    with pytest.raises(ValueError, match="m1=0.9, m3=0.0"):
        CombinedMarginLoss(64, 0.9, 0.4, 0.0)
    with pytest.warns(UserWarning, match="ignores m1 and m2"):
        CombinedMarginLoss(64, 1.0, 0.5, 0.2)
    with pytest.raises(TypeError, match="margin_loss must be"):
        PartialFC_V2(lambda logits, labels: logits, 8, 11)
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 11)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\) or \(4, 1\)"):
        module(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long))
    # no label value is ignored here, and the message says nothing of one
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\); got 11 at position 2"):
        module(torch.randn(4, 8), torch.tensor([0, 1, 11, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\); got -1 at position 1"):
        module(torch.randn(4, 8), torch.tensor([0, -1, 3, 2]))


def _arcface_margin() -> CombinedMarginLoss:
    return CombinedMarginLoss(64, 1.0, 0.5, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_initial_weight_is_arcface_torchs_draw(world_of_one, dtype):
    """From the same seed, the weight arcface_torch draws (``torch.normal(0, 0.01,
    (num_local, D))`` in the default dtype), bitwise, and the same global random state
    after: no other draw at construction."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for seed in (0, 2048):
            torch.manual_seed(seed)
            module = PartialFC_V2(_arcface_margin(), 8, 37, 0.5)
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            want = torch.normal(0, 0.01, (37, 8))
            assert module.weight.dtype == dtype and torch.equal(module.weight.detach(), want)
            assert torch.equal(state, torch.get_rng_state())
    finally:
        torch.set_default_dtype(default)


def _peak_bytes(build) -> tuple[Any, int]:
    """``build()``'s result and the peak of the CPU memory it held while it ran (the
    profiler's allocations and frees, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = build()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return result, peak


def test_construction_holds_one_weight(world_of_one):
    module, peak = _peak_bytes(lambda: PartialFC_V2(_arcface_margin(), 64, 8192))
    weight_bytes = module.weight.numel() * module.weight.element_size()
    assert weight_bytes <= peak < 1.5 * weight_bytes


@pytest.mark.parametrize("distinct", [4, 10, 15])
def test_sampling_is_arcface_torchs_rule(world_of_one, distinct):
    """``num_sample`` = 10 of 40 classes; the batch's labels hold fewer, as many and more
    distinct classes: the kept classes and the random state after are arcface_torch's
    (no draw when the positives are more), and so is the loss."""
    num_classes, rate = 40, 0.25
    labels = torch.randperm(num_classes)[:distinct].repeat(2)
    x = torch.randn(labels.shape[0], DIM, dtype=torch.float64)
    module = PartialFC_V2(_arcface_margin(), DIM, num_classes, rate, backend="reference").double()
    torch.manual_seed(5)
    loss = module(x, labels)
    state = torch.get_rng_state()
    torch.manual_seed(5)
    want = arcface_torch_sample(labels, num_classes, int(rate * num_classes))
    assert torch.equal(module.weight_index, want)
    assert torch.equal(state, torch.get_rng_state())
    assert module.weight_index.numel() == max(10, distinct)
    model = arcface_torch_model([x], [labels], module.weight.detach(), MARGINS["arcface"], sample_rate=rate, seed=5)
    assert_rel_close(loss.detach(), model["loss"], TOL64, "sampled loss")


@pytest.mark.gpu
def test_sampling_on_a_gpu_is_the_cpu_draw(tmp_path):
    """On a GPU the draw is the CPU generator's, moved: the classes kept from one seed
    are those of the CPU rule, and the GPU's random state is untouched."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        module = PartialFC_V2(_arcface_margin(), DIM, 40, 0.25).cuda()
        labels = torch.tensor([3, 17, 17, 29])
        torch.manual_seed(9)
        cuda_state = torch.cuda.get_rng_state()
        module(torch.randn(4, DIM, device="cuda"), labels.cuda())
        assert torch.equal(cuda_state, torch.cuda.get_rng_state())
        torch.manual_seed(9)
        assert torch.equal(module.weight_index.cpu(), arcface_torch_sample(labels, 40, 10))
    finally:
        dist.destroy_process_group()


def test_margins_are_read_at_every_step(world_of_one):
    """Changing the margin module's attributes (a margin schedule) changes the next
    step, as in arcface_torch; a combination it cannot compute raises there."""
    data = _inputs(1, 13, [9], 6, seed=5)
    x, labels = data["x"][0], data["labels"][0]
    margin = _arcface_margin()
    module = PartialFC_V2(margin, 6, 13, backend="reference").double()
    module.load_full_weight(data["weight"])
    before = module(x, labels).detach()
    for name, value in (("m2", 0.3), ("s", 32.0), ("interclass_filtering_threshold", 0.2)):
        setattr(margin, name, value)
        got = _run(module, x, labels)
        want = arcface_torch_model(data["x"], data["labels"], data["weight"],
                                   (margin.s, margin.m1, margin.m2, margin.m3, margin.interclass_filtering_threshold))
        _check(got, want, 0, TOL64, f"{name} = {value}")
        assert not torch.equal(got["loss"], before)
        before = got["loss"]
    margin.m1 = 0.9
    with pytest.raises(ValueError, match="m1=0.9, m3=0.0"):
        module(x, labels)


def test_arguments_are_checked_in_the_constructor(world_of_one):
    margin = _arcface_margin()
    with pytest.raises(TypeError, match="sample_rate must be a real number, got True"):
        PartialFC_V2(margin, 8, 11, sample_rate=True)
    with pytest.raises(ValueError, match=r"sample_rate must lie in \(0, 1\], got 1.5"):
        PartialFC_V2(margin, 8, 11, sample_rate=1.5)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'nope'"):
        PartialFC_V2(margin, 8, 11, backend="nope")
    with pytest.raises(TypeError, match="embedding_size must be an integer, got 8.0"):
        PartialFC_V2(margin, 8.0, 11)
    with pytest.raises(TypeError, match="num_classes must be an integer, got True"):
        PartialFC_V2(margin, 8, True)
    with pytest.raises(ValueError, match="fp16 must be True or False, got 1"):
        PartialFC_V2(margin, 8, 11, fp16=1)
    with pytest.raises(TypeError, match="m2 must be a real number, got 'a'"):
        CombinedMarginLoss(64, 1.0, "a", 0.0)
    with pytest.raises(ValueError, match="s must be positive, got -1"):
        CombinedMarginLoss(-1, 1.0, 0.5, 0.0)
    # numpy and 0-dim tensor scalars stand for their values
    margin = CombinedMarginLoss(np.float64(64), torch.tensor(1.0), np.float32(0.5), 0)
    module = PartialFC_V2(margin, np.int64(8), torch.tensor(11), np.float32(0.5))
    assert (module.embedding_size, module.num_classes, module.num_sample) == (8, 11, 5)
    assert type(module.embedding_size) is int and type(module.sample_rate) is float


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 11)


def test_core_combined_head_options():
    """The core heads' new options: straight-through and beyond_pi on the combined margin."""
    spec = fm.MarginSpec.combined(64.0, (1.0, 0.5, 0.0), straight_through=True, beyond_pi="none")
    x = torch.tensor([[math.cos(3.0), math.sin(3.0), 0.0]], dtype=torch.float64)
    w = torch.eye(3, dtype=torch.float64)
    loss = fm.margin_cross_entropy(x, w, torch.tensor([0]), spec, backend="reference")
    model = arcface_torch_model([x], [torch.tensor([0])], w, MARGINS["arcface"])["loss"]
    assert float(loss) == pytest.approx(float(model), rel=1e-12)
    head = fm.CombinedMarginLoss(3, 3, margins=(1.0, 0.5, 0.0), straight_through=True, beyond_pi="easy_margin")
    assert head.spec().target.easy_margin and head.spec().target.straight_through
    with pytest.raises(ValueError, match="beyond_pi must be one of"):
        fm.ArcFaceLoss(3, 3, beyond_pi="wrap")
    with pytest.raises(ValueError, match="straight_through must be True or False"):
        fm.MarginSpec.combined(straight_through="yes")


# ----------------------------------------------------------------------------------
# Gloo, 2 and 4 processes, uneven shards, sampling
# ----------------------------------------------------------------------------------

DIM = 6
DIST_CASES = {
    # (margins, classes, batch per rank, sample_rate): uneven shards and batches; the
    # sampled cases have fewer positives per shard than num_sample (the random draw runs)
    2: [("arcface", 11, [5, 4], 1.0), ("cosface_filtered", 11, [4, 4], 1.0), ("arcface_filtered", 23, [3, 2], 0.5),
        ("cosface", 25, [3, 2], 0.4)],
    4: [("arcface", 11, [3, 4, 4, 5], 1.0), ("combined_is_cosface", 30, [2, 1, 1, 1], 0.6)],
}


def _case_data(world_size: int, i: int, case: tuple) -> dict[str, Any]:
    name, num_classes, sizes, rate = case
    return {"name": name, "num_classes": num_classes, "sizes": sizes, "rate": rate, "seed": 100 * world_size + i,
            **_inputs(world_size, num_classes, sizes, DIM, seed=100 * world_size + i)}


def _worker(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=90))
    cases = torch.load(os.path.join(folder, "data.pt"), weights_only=False)
    results = []
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            margin = CombinedMarginLoss(*MARGINS[case["name"]])
        module = PartialFC_V2(margin, DIM, case["num_classes"], case["rate"], backend="cpu").double()
        module.load_full_weight(case["weight"])
        labels = case["labels"][rank]
        before = labels.clone()
        torch.manual_seed(case["seed"] + rank)  # the sampling draw, as the model seeds it
        got = _run(module, case["x"][rank], labels)
        got["weight_index"] = module.weight_index
        got["labels_unchanged"] = labels.shape == before.shape and bool(torch.equal(labels, before))
        got["attributes"] = (module.class_start, module.num_local, module.num_sample, module.rank, module.world_size)
        results.append(got)
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(folder: Path, world_size: int, cases: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    torch.save(cases, folder / "data.pt")
    return run_ranks(_worker, (world_size, str(folder)), world_size, folder, f"the {world_size}-process group")


@pytest.mark.parametrize("world_size", sorted(DIST_CASES))
def test_gloo_ranks_match_arcface_torch(tmp_path, world_size):
    cases = [_case_data(world_size, i, c) for i, c in enumerate(DIST_CASES[world_size])]
    results = _spawn(tmp_path, world_size, cases)
    for i, case in enumerate(cases):
        margins = MARGINS[case["name"]]
        want = arcface_torch_model(case["x"], case["labels"], case["weight"], margins, sample_rate=case["rate"],
                                   seed=case["seed"])
        for rank in range(world_size):
            got = results[rank][i]
            what = f"{case['name']} world {world_size} rank {rank} rate {case['rate']}"
            assert got["labels_unchanged"], what
            start, num_local = _shard(case["num_classes"], rank, world_size)
            assert got["attributes"] == (start, num_local, int(case["rate"] * num_local), rank, world_size), what
            if case["rate"] < 1:
                assert torch.equal(got["weight_index"], want["weight_index"][rank]), what
                assert got["weight_index"].numel() < num_local, what  # sampling dropped classes
            assert_rel_close(got["loss"], want["loss"], TOL64, f"{what}: loss")
            assert_rel_close(got["dx"], want["dx"][rank], TOL64, f"{what}: dx")
            assert_rel_close(got["dW"], want["dW"][rank], TOL64, f"{what}: dW")
