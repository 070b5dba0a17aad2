"""Class-sharded heads (fused_margin.distributed) on Gloo, 2 and 4 processes on loopback.

Each process group is spawned once per module (spawning costs seconds) and runs every
case of its scenario; the parent then compares each case with the single-process
ground truth: ``margin_cross_entropy(..., backend='eager')`` (or the head module) in
float64 on the concatenated batch with the full weight.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fused_margin as fm
from fused_margin import MarginSpec
from fused_margin.distributed import (
    ShardedMarginLoss,
    gather_full_weight,
    reshard_state_dicts,
    shard_range,
    shard_weight,
)
from tests.utils import HEAD_SPECS, assert_rel_close, run_ranks, tolerance

# Heads with state (updated from the global batch), built in the workers from a name.
HEAD_MODULES = {
    "curricularface_head": (fm.CurricularFaceLoss, {"device": "meta"}),
    "sphereface_head": (fm.SphereFaceLoss, {"device": "meta"}),
    "adaface_head": (fm.AdaFaceLoss, {"device": "meta", "dtype": torch.float64}),
}

SPECS = dict(HEAD_SPECS)
SPECS["magface"] = fm.MagFaceLoss(2, 2).spec()


# ----------------------------------------------------------------------------------
# Cases: inputs per rank, the full weight, options
# ----------------------------------------------------------------------------------


def _case(
    name: str,
    head: str,
    *,
    world_size: int,
    num_classes: int,
    sizes: list[int],
    dim: int = 8,
    label_range: tuple[int, int] | None = None,
    ignore: int = 1,
    steps: int = 1,
    dtype: torch.dtype = torch.float64,
    x_scale: float = 1.0,
    seed: int = 0,
    garbage: bool = False,
    **options: Any,
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    k = SPECS[head].num_subcenters if head in SPECS else 1
    low, high = label_range or (0, num_classes)
    xs, labels = [], []
    for b in sizes:
        xs.append((torch.randn(b, dim, generator=gen, dtype=torch.float64) * x_scale).to(dtype))
        labels.append(torch.randint(low, high, (b,), generator=gen))
    for i in range(ignore):  # ignored rows, on the first ranks
        labels[i % world_size][-1] = -100
        if garbage:  # padding rows often hold garbage: they must stay out of everything
            xs[i % world_size][-1] = float("nan") if i % 2 == 0 else float("inf")
    weight = torch.randn(num_classes * k, dim, generator=gen, dtype=torch.float64).to(dtype)
    upstream = [torch.randn(b, generator=gen, dtype=torch.float64) for b in sizes]
    return {
        "name": name, "head": head, "world_size": world_size, "num_classes": num_classes, "dim": dim,
        "sizes": sizes, "x": xs, "labels": labels, "weight": weight, "upstream": upstream, "steps": steps,
        "dtype": dtype, "options": options,
    }


def _world2_cases() -> list[dict[str, Any]]:
    common = {"world_size": 2, "num_classes": 13, "sizes": [5, 3]}  # shards of 7 and 6 classes
    cases = [
        _case(head, head, seed=i, x_scale=15.0 if head == "magface" else 1.0, **common)
        for i, head in enumerate(
            ["cosface", "arcface", "cs_softmax", "so_softmax", "sphereface", "curricularface", "lsoftmax",
             "subcenter_arcface", "magface"]
        )
    ]
    cases += [
        _case("cosface_sum", "cosface", reduction="sum", seed=20, **common),
        _case("cosface_none", "cosface", reduction="none", seed=21, **common),
        _case("arcface_smoothing_accuracy", "arcface", label_smoothing=0.1, return_accuracy=True, seed=22,
              **common),
        _case("arcface_ddp_grad", "arcface", embedding_grad="ddp", seed=23, **common),
        _case("cosface_eager", "cosface", backend="eager", seed=24, **common),
        _case("cosface_auto_fp32", "cosface", backend="auto", dtype=torch.float32, seed=25, **common),
        _case("arcface_no_target_on_rank1", "arcface", label_range=(0, 7), seed=26, **common),
        _case("cosface_equal_batches", "cosface", world_size=2, num_classes=12, sizes=[4, 4], seed=27),
        _case("cosface_sampled", "cosface", world_size=2, num_classes=80, sizes=[6, 5], steps=2,
              sample_rate=0.25, sample_seed=7, label_smoothing=0.1, seed=28),
        # a shard of one class: "sampling" keeps it, and every rank still runs the same collectives
        _case("cosface_sampled_one_class_shard", "cosface", world_size=2, num_classes=3, sizes=[2, 3],
              sample_rate=0.5, sample_seed=1, label_smoothing=0.1, seed=33),
        _case("curricularface_sampled", "curricularface", world_size=2, num_classes=80, sizes=[6, 5],
              sample_rate=0.3, sample_seed=3, seed=29),
        _case("curricularface_head", "curricularface_head", steps=2, seed=30, **common),
        _case("sphereface_head", "sphereface_head", steps=2, seed=31, **common),
        _case("adaface_head", "adaface_head", steps=2, x_scale=15.0, seed=32, **common),
        _case("arcface_garbage_in_ignored_rows", "arcface", ignore=2, garbage=True, seed=34, **common),
        _case("curricularface_head_garbage_in_ignored_rows", "curricularface_head", steps=2, ignore=2, garbage=True,
              seed=35, **common),
    ]
    return cases


def _world4_cases() -> list[dict[str, Any]]:
    common = {"world_size": 4, "num_classes": 10, "sizes": [3, 2, 4, 3]}  # shards of 3, 3, 2, 2
    return [
        _case("cosface_4", "cosface", seed=40, **common),
        _case("cs_softmax_4_no_target_on_ranks_2_3", "cs_softmax", label_range=(0, 6), seed=41, **common),
        _case("so_softmax_4_none", "so_softmax", reduction="none", seed=42, **common),
        _case("arcface_4_sampled", "arcface", world_size=4, num_classes=80, sizes=[3, 3, 3, 3],
              sample_rate=0.5, sample_seed=11, steps=2, seed=43),
        _case("curricularface_head_4", "curricularface_head", steps=2, seed=44, **common),
    ]


# ----------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------


def _make_head(case: dict[str, Any]) -> MarginSpec | fm.MarginHead:
    if case["head"] in HEAD_MODULES:
        cls, kwargs = HEAD_MODULES[case["head"]]
        return cls(case["num_classes"], case["dim"], **kwargs)
    return SPECS[case["head"]]


def _module(case: dict[str, Any], rank: int, *, seed: int | None = None) -> ShardedMarginLoss:
    options = dict(case["options"])
    sample_seed = options.pop("sample_seed", None)
    module = ShardedMarginLoss(
        _make_head(case), case["num_classes"], case["dim"], seed=sample_seed if seed is None else seed,
        dtype=case["dtype"], device=case["x"][rank].device, timeout=60.0,
        **{"backend": "reference", "embedding_grad": "exact", **options},
    )
    module.load_full_weight(case["weight"])
    return module


def _run_case(case: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    module = _module(case, rank)
    twin = _module(case, rank) if case["options"].get("sample_rate", 1.0) < 1.0 else None
    steps = []
    for _ in range(case["steps"]):
        module.zero_grad()
        x = case["x"][rank].clone().requires_grad_(True)
        out = module(x, case["labels"][rank])
        loss, accuracy = out if isinstance(out, tuple) else (out, None)
        grad = case["upstream"][rank].to(loss.dtype) if loss.dim() else torch.ones_like(loss)
        loss.backward(grad)
        twin_sample = None
        if twin is not None:  # same seed: the same sample, step after step
            twin(case["x"][rank], case["labels"][rank])
            twin_sample = twin.sampled_classes
        steps.append({
            "loss": loss.detach(), "dx": x.grad, "dW": module.weight.grad.clone(), "accuracy": accuracy,
            "sampled": module.sampled_classes, "twin_sampled": twin_sample,
        })
    return steps


def _scenario_cases(rank: int, world_size: int, data: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {case["name"]: _run_case(case, rank) for case in data["cases"]}
    if "checkpoint" in data:  # in the same group: a 4-process spawn costs ~20 s on 2 cores
        results["checkpoint"] = _scenario_checkpoint(rank, world_size, data["checkpoint"])
    return results


def _record_error(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test inspects the type and message
        return type(err).__name__, str(err)
    return None


def _scenario_checkpoint(rank: int, world_size: int, case: dict[str, Any]) -> dict[str, Any]:
    module = _module(case, rank)
    full = gather_full_weight(module)
    on_zero = gather_full_weight(module, dst=0)
    state = module.state_dict()
    # a fresh module (other seed, other weight) restored from the checkpoint samples the same
    clone = _module(case, rank, seed=12345)
    with torch.no_grad():
        clone.weight.zero_()
    clone.load_state_dict(state)
    module.train(), clone.train()
    x, labels = case["x"][rank], case["labels"][rank]
    module(x, labels)
    clone(x, labels)
    # a shard of another rank is refused with a clear message
    other = {**state, "_extra_state": {**state["_extra_state"], "class_start": -1}}
    wrong = _record_error(lambda: clone.load_state_dict(other))
    return {
        "full": full, "on_zero": on_zero, "state": state, "clone_weight": clone.weight.detach().clone(),
        "sampled": module.sampled_classes, "clone_sampled": clone.sampled_classes, "wrong_load": wrong,
    }


def _scenario_bad_config(rank: int, world_size: int, data: dict[str, Any]) -> dict[str, Any]:
    spec = MarginSpec.cosface()
    out: dict[str, Any] = {}
    module = ShardedMarginLoss(spec, 13, 8, timeout=30.0, dtype=torch.float64)
    labels = torch.tensor([0, 5, 7, 12])
    x8 = torch.randn(4, 8, dtype=torch.float64)
    x_rank = x8 if rank == 0 else torch.randn(4, 6, dtype=torch.float64)
    out["embedding_size_mismatch"] = _record_error(lambda: module(x_rank, labels))
    out["module_embedding_size"] = _record_error(lambda: module(torch.randn(4, 6, dtype=torch.float64), labels))
    bad_labels = labels if rank == 0 else torch.tensor([0, 13, 7, 1])
    out["label_out_of_range"] = _record_error(lambda: module(x8, bad_labels))
    # a backward would hang: only rank 0's embeddings need the gradient's reduce-scatter
    out["requires_grad_mismatch"] = _record_error(lambda: module(x8.clone().requires_grad_(rank == 0), labels))
    other = ShardedMarginLoss(spec, 13 + rank, 8, timeout=30.0, dtype=torch.float64)
    out["num_classes_mismatch"] = _record_error(lambda: other(x8, labels))
    # after the errors, the group is still consistent: a good step runs on every rank
    loss = module(x8.requires_grad_(True), labels)
    loss.backward()
    out["ok_after_errors"] = (float(loss), bool(torch.isfinite(x8.grad).all()))
    # rank 1 never calls forward: rank 0 must fail within its timeout instead of hanging
    if rank == 0:
        quick = ShardedMarginLoss(spec, 13, 8, timeout=1.0, dtype=torch.float64)
        start = time.monotonic()
        out["timeout"] = _record_error(lambda: quick(x8, labels))
        out["timeout_elapsed"] = time.monotonic() - start
    else:
        ShardedMarginLoss(spec, 13, 8, dtype=torch.float64)
        time.sleep(4.0)
    out["no_destroy"] = True  # a collective is left pending on rank 0
    return out


def _scenario_head_state(rank: int, world_size: int, data: dict[str, Any]) -> dict[str, Any]:
    """A meta-device CurricularFace head: its t gets storage here and follows .to()."""
    module = ShardedMarginLoss(fm.CurricularFaceLoss(10, 4, device="meta"), 10, 4, timeout=30.0)
    head = module.head
    out: dict[str, Any] = {"weight_meta": head.weight.is_meta, "t_initial": (head.t.device.type, float(head.t))}
    module.to(torch.float64)
    out["t_dtype"] = head.t.dtype
    module(torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 3, 9, -100, 5, 1]))
    out["t_after_step"] = float(head.t)
    restored = ShardedMarginLoss(fm.CurricularFaceLoss(10, 4, device="meta"), 10, 4, timeout=30.0).to(torch.float64)
    restored.load_state_dict(module.state_dict())
    out["t_restored"] = float(restored.head.t)
    return out


def _scenario_fused_optimizer(rank: int, world_size: int, data: dict[str, Any]) -> dict[str, Any]:
    """Each rank's shard trained by an optimizer in the backward (fused_margin.optim)."""
    from fused_margin.optim import apply_optimizer_in_backward

    out: dict[str, Any] = {}
    for case in data["cases"]:
        module = ShardedMarginLoss(
            MarginSpec.cosface(), case["num_classes"], case["dim"], reduction="none", embedding_grad="exact",
            backend="cpu", sample_rate=case["sample_rate"], seed=7, dtype=torch.float64, timeout=60.0,
        )
        module.load_full_weight(case["weight"])
        opt = apply_optimizer_in_backward(case["cls"], [module.weight], case["options"])
        steps = []
        for step in range(case["steps"]):
            x = case["x"][step][rank].clone().requires_grad_(True)
            with warnings.catch_warnings():
                # an update deferred to the end of the backward (the shard held elsewhere) warns
                warnings.simplefilter("error", RuntimeWarning)
                module(x, case["labels"][step][rank]).backward(case["upstream"][step][rank])
            opt.step()
            opt.zero_grad()
            steps.append({"weight": gather_full_weight(module), "sampled": module.sampled_classes,
                          "grad_is_none": module.weight.grad is None})
        out[case["name"]] = {"steps": steps, "state": opt.state_dict()["state"][0]}
    return out


SCENARIOS = {"cases": _scenario_cases, "bad_config": _scenario_bad_config, "head_state": _scenario_head_state,
             "fused_optimizer": _scenario_fused_optimizer}


def _worker(rank: int, world_size: int, folder: str, scenario: str, backend: str) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{folder}/store", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=90),
    )
    data = torch.load(os.path.join(folder, "data.pt"), weights_only=False)
    result = SCENARIOS[scenario](rank, world_size, data)
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    if not result.get("no_destroy"):
        dist.destroy_process_group()


def _spawn(folder: Path, world_size: int, scenario: str, data: dict[str, Any], *, backend: str = "gloo",
           deadline_s: float = 150.0) -> list[dict[str, Any]]:
    """Runs ``scenario`` on ``world_size`` fresh processes; returns each rank's result."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(data, folder / "data.pt")
    return run_ranks(_worker, (world_size, str(folder), scenario, backend), world_size, folder,
                     f"the {scenario!r} process group", deadline_s)


# ----------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------


def _reference(case: dict[str, Any], sampled: list[list[torch.Tensor | None]]) -> list[dict[str, Any]]:
    """Per step: loss, dx (rows of the concatenated batch), dW, accuracy, in float64."""
    x = torch.cat(case["x"]).double()
    labels = torch.cat(case["labels"])
    weight = case["weight"].double()
    options = case["options"]
    reduction = options.get("reduction", "mean")
    upstream = torch.cat(case["upstream"])
    head = None
    if case["head"] in HEAD_MODULES:
        cls, kwargs = HEAD_MODULES[case["head"]]
        head = cls(case["num_classes"], case["dim"], dtype=torch.float64, backend="eager", reduction=reduction)
        with torch.no_grad():
            head.weight.copy_(weight)
    steps = []
    for step in range(case["steps"]):
        xr = x.clone().requires_grad_(True)
        if head is not None:
            head.zero_grad()
            loss = head(xr, labels)
            wr = head.weight
        else:
            wr = weight.clone().requires_grad_(True)
            class_index, ref_labels = None, labels
            if sampled[0][step] is not None:
                class_index = torch.cat([s[step] for s in sampled])
                positions = torch.searchsorted(class_index, labels.clamp_min(0))
                assert torch.equal(class_index[positions][labels >= 0], labels[labels >= 0]), "a positive was dropped"
                ref_labels = torch.where(labels >= 0, positions, labels)
            loss, accuracy = fm.margin_cross_entropy(
                xr, wr, ref_labels, SPECS[case["head"]], class_index=class_index, reduction=reduction,
                label_smoothing=options.get("label_smoothing", 0.0), return_accuracy=True, backend="eager",
            )
        grad = upstream if loss.dim() else torch.ones_like(loss)
        loss.backward(grad)
        steps.append({"loss": loss.detach(), "dx": xr.grad, "dW": wr.grad.clone(),
                      "accuracy": None if head is not None else accuracy})
    return steps


def _check_case(case: dict[str, Any], results: list[dict[str, Any]]) -> None:
    world_size, name = case["world_size"], case["name"]
    per_rank = [r[name] for r in results]
    sampled = [[s["sampled"] for s in steps] for steps in per_rank]
    reference = _reference(case, sampled)
    tol = case.get("tol") or tolerance("sharded", case["dtype"])
    k = SPECS[case["head"]].num_subcenters if case["head"] in SPECS else 1
    bounds = [0]
    for b in case["sizes"]:
        bounds.append(bounds[-1] + b)
    ddp = world_size if case["options"].get("embedding_grad") == "ddp" else 1
    for step, ref in enumerate(reference):
        for rank in range(world_size):
            got = per_rank[rank][step]
            what = f"{name} step {step} rank {rank}"
            rows = slice(bounds[rank], bounds[rank + 1])
            ref_loss = ref["loss"][rows] if ref["loss"].dim() else ref["loss"]
            assert got["loss"].shape == ref_loss.shape, what
            assert_rel_close(got["loss"], ref_loss, tol, f"{what}: loss")
            assert_rel_close(got["dx"], ddp * ref["dx"][rows], tol, f"{what}: embeddings' gradient")
            start, end = shard_range(case["num_classes"], rank, world_size)
            assert_rel_close(got["dW"], ref["dW"][start * k : end * k], tol, f"{what}: shard gradient")
            if got["accuracy"] is not None:
                assert float(got["accuracy"]) == pytest.approx(float(ref["accuracy"])), f"{what}: accuracy"
            if got["sampled"] is not None:
                kept = got["sampled"]
                assert torch.equal(kept, got["twin_sampled"]), f"{what}: same seed, different sample"
                assert bool((kept >= start).all() and (kept < end).all()), f"{what}: kept a class of another rank"
                labels = torch.cat(case["labels"])
                positives = labels[(labels >= start) & (labels < end)].unique()
                num_sample = max(1, int(case["options"]["sample_rate"] * (end - start)))
                assert kept.numel() == max(num_sample, positives.numel()), what
                unused = torch.ones(end - start, dtype=torch.bool)
                unused[kept - start] = False
                assert bool((got["dW"].view(end - start, k, -1)[unused] == 0).all()), f"{what}: unused rows moved"
    if case["steps"] > 1 and per_rank[0][0]["sampled"] is not None:
        assert not torch.equal(per_rank[0][0]["sampled"], per_rank[0][1]["sampled"]), "the sample never changes"


# ----------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------

CASES_2 = _world2_cases()
CASES_4 = _world4_cases()
CHECKPOINT_CASE = _case("ckpt", "cosface", world_size=4, num_classes=10, sizes=[3, 2, 4, 3], sample_rate=0.5,
                        sample_seed=5, seed=50)


@pytest.fixture(scope="module")
def world2_results(tmp_path_factory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("world2"), 2, "cases", {"cases": CASES_2})


@pytest.fixture(scope="module")
def world4_results(tmp_path_factory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("world4"), 4, "cases", {"cases": CASES_4, "checkpoint": CHECKPOINT_CASE})


@pytest.mark.parametrize("case", CASES_2, ids=lambda c: c["name"])
def test_two_ranks_match_single_process(case, world2_results):
    _check_case(case, world2_results)


@pytest.mark.parametrize("case", CASES_4, ids=lambda c: c["name"])
def test_four_ranks_match_single_process(case, world4_results):
    _check_case(case, world4_results)


def test_checkpoint_gather_and_reshard(world4_results):
    results = [r["checkpoint"] for r in world4_results]
    full = CHECKPOINT_CASE["weight"]
    for rank, result in enumerate(results):
        assert torch.equal(result["full"], full), f"rank {rank}: gather_full_weight"
        assert (result["on_zero"] is None) == (rank != 0), f"rank {rank}: gather_full_weight(dst=0)"
        assert torch.equal(result["clone_weight"], shard_weight(full, rank, 4)), f"rank {rank}: load_state_dict"
        assert torch.equal(result["sampled"], result["clone_sampled"]), f"rank {rank}: restored generator"
        assert result["wrong_load"] is not None and result["wrong_load"][0] == "ValueError"
        assert "reshard_state_dicts" in result["wrong_load"][1]
    states = [r["state"] for r in results]
    two = reshard_state_dicts(states[::-1], 2)  # any order
    for rank, state in enumerate(two):
        assert torch.equal(state["weight"], shard_weight(full, rank, 2))
        start, end = shard_range(10, rank, 2)
        assert (state["_extra_state"]["class_start"], state["_extra_state"]["class_end"]) == (start, end)
    back = reshard_state_dicts(two, 4)
    for rank, state in enumerate(back):
        assert torch.equal(state["weight"], states[rank]["weight"])
    with pytest.raises(ValueError, match="some rank is missing"):
        reshard_state_dicts(states[:3], 2)


def test_bad_configurations_fail_on_every_rank(tmp_path):
    results = _spawn(tmp_path, 2, "bad_config", {})
    for rank, result in enumerate(results):
        for check in ("embedding_size_mismatch", "module_embedding_size", "label_out_of_range",
                      "requires_grad_mismatch", "num_classes_mismatch"):
            assert result[check] is not None, f"rank {rank}: {check} did not raise"
            assert result[check][0] == "ValueError", f"rank {rank}: {check}: {result[check]}"
        message = result["embedding_size_mismatch"][1]
        assert "8 on rank 0" in message and "6 on rank 1" in message, message
        assert "embedding_size=8" in result["module_embedding_size"][1]
        assert "rank 1" in result["label_out_of_range"][1] and "got 13 at position 1" in result["label_out_of_range"][1]
        assert "13 on rank 0" in result["num_classes_mismatch"][1]
        assert "embeddings.requires_grad=" in result["requires_grad_mismatch"][1]
        loss, grads_finite = result["ok_after_errors"]
        assert loss == loss and grads_finite
    error, message = results[0]["timeout"]
    assert error == "TimeoutError" and "did not join" in message, message
    assert results[0]["timeout_elapsed"] < 30.0


def test_meta_head_state_is_materialized_and_follows_the_module(tmp_path):
    (result,) = _spawn(tmp_path, 1, "head_state", {})
    assert result["weight_meta"], "the head's weight must stay on meta (no allocation)"
    assert result["t_initial"] == ("cpu", 0.0)
    assert result["t_dtype"] == torch.float64
    assert 0.0 < abs(result["t_after_step"]) < 1.0  # updated from the batch's target cosines
    assert result["t_restored"] == result["t_after_step"]


def test_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedMarginLoss(MarginSpec.cosface(), 10, 8)


def test_split_rule():
    for num_classes, world_size in [(10, 4), (13, 2), (7, 7), (100, 3)]:
        ranges = [shard_range(num_classes, r, world_size) for r in range(world_size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
    assert shard_range(10, 0, 4) == (0, 3) and shard_range(10, 3, 4) == (8, 10)
    w = torch.arange(30.0).view(10 * 3, 1)
    assert torch.equal(shard_weight(w, 1, 4, num_subcenters=3), w[9:18])
    with pytest.raises(ValueError, match="at least world_size"):
        shard_range(3, 0, 4)


def _gpu_cases(world_size: int) -> list[dict[str, Any]]:
    sizes = [33, 31][:world_size]
    return [
        _case("nccl_arcface", "arcface", world_size=world_size, num_classes=1001, dim=64, sizes=sizes,
              backend="auto", dtype=torch.float32, seed=60),
        _case("nccl_cosface_sampled", "cosface", world_size=world_size, num_classes=1000, dim=64, sizes=sizes,
              backend="auto", dtype=torch.float32, sample_rate=0.2, sample_seed=1, steps=2, seed=61),
        _case("nccl_curricularface_head", "curricularface_head", world_size=world_size, num_classes=999, dim=64,
              sizes=sizes, backend="auto", dtype=torch.float32, steps=2, seed=62),
    ]


@pytest.mark.gpu
def test_nccl_two_gpus_match_single_process(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    _run_gpu_cases(tmp_path, _gpu_cases(2))


@pytest.mark.gpu
def test_nccl_world_of_one_gpu_matches_single_process(tmp_path):
    # One GPU cannot host two NCCL ranks; a world of one still runs the NCCL code paths
    # (reduce-scatter, the timed wait, the CUDA sampling generator) against the reference.
    _run_gpu_cases(tmp_path, _gpu_cases(1))


def _run_gpu_cases(tmp_path: Path, cases: list[dict[str, Any]]) -> None:
    world_size = cases[0]["world_size"]
    for case in cases:
        case["tol"] = tolerance("sharded-gpu", torch.float32)  # another kernel: other summation orders
        case["x"] = [x.cuda(r) for r, x in enumerate(case["x"])]
        case["labels"] = [y.cuda(r) for r, y in enumerate(case["labels"])]
        case["upstream"] = [u.cuda(r) for r, u in enumerate(case["upstream"])]
    results = _spawn(tmp_path, world_size, "cases", {"cases": cases}, backend="nccl")
    for case in cases:
        case["x"] = [x.cpu() for x in case["x"]]
        case["labels"] = [y.cpu() for y in case["labels"]]
        case["upstream"] = [u.cpu() for u in case["upstream"]]
        cpu_results = [
            {case["name"]: [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                            for s in r[case["name"]]]}
            for r in results
        ]
        _check_case(case, cpu_results)


def test_embedding_grad_default_is_what_a_ddp_backbone_needs():
    # DDP and FSDP average the backbone's gradients over ranks; 'ddp' undoes that
    import inspect

    assert inspect.signature(ShardedMarginLoss).parameters["embedding_grad"].default == "ddp"


def _fused_optimizer_case(name: str, cls: type, options: dict[str, Any], sample_rate: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    sizes, steps, num_classes, dim = [5, 3], 3, 13, 8
    xs, labels, upstream = [], [], []
    for _ in range(steps):
        xs.append([torch.randn(b, dim, generator=gen, dtype=torch.float64) for b in sizes])
        labels.append([torch.randint(0, num_classes, (b,), generator=gen) for b in sizes])
        upstream.append([torch.rand(b, generator=gen, dtype=torch.float64) + 0.5 for b in sizes])
    return {"name": name, "cls": cls, "options": options, "sample_rate": sample_rate, "steps": steps,
            "num_classes": num_classes, "dim": dim, "weight": torch.randn(num_classes, dim, generator=gen,
                                                                          dtype=torch.float64),
            "x": xs, "labels": labels, "upstream": upstream}


def test_fused_optimizer_on_two_ranks_matches_one_process(tmp_path):
    """ShardedMarginLoss with its shard updated in the backward on 2 Gloo ranks equals the plain
    optimizer on the full weight in one process (sampled classes: the same kept classes)."""
    cases = [
        _fused_optimizer_case("sgd", torch.optim.SGD, {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-2}, 1.0, 70),
        _fused_optimizer_case("adamw_sampled", torch.optim.AdamW, {"lr": 5e-2, "weight_decay": 0.1}, 0.5, 71),
    ]
    results = _spawn(tmp_path, 2, "fused_optimizer", {"cases": cases})
    for case in cases:
        name = case["name"]
        weight = nn.Parameter(case["weight"].clone())
        plain = case["cls"]([weight], foreach=False, **case["options"])
        for step in range(case["steps"]):
            labels = torch.cat(case["labels"][step])
            class_index, ref_labels = None, labels
            if case["sample_rate"] < 1.0:
                class_index = torch.cat([r[name]["steps"][step]["sampled"] for r in results])
                ref_labels = torch.searchsorted(class_index, labels)
                assert torch.equal(class_index[ref_labels], labels), "a positive was dropped"
                assert class_index.numel() < case["num_classes"], "nothing was left out of the sample"
            loss = fm.margin_cross_entropy(torch.cat(case["x"][step]), weight, ref_labels, MarginSpec.cosface(),
                                           class_index=class_index, reduction="none", backend="cpu")
            loss.backward(torch.cat(case["upstream"][step]))
            plain.step()
            plain.zero_grad()
            for rank, result in enumerate(results):
                got = result[name]["steps"][step]
                assert got["grad_is_none"], f"{name} rank {rank}: the shard's gradient was formed"
                assert_rel_close(got["weight"], weight.detach(), tolerance("sharded", torch.float64), f"{name} step {step} rank {rank}: weight")
        for rank, result in enumerate(results):
            start, end = shard_range(case["num_classes"], rank, 2)
            for key, value in plain.state[weight].items():
                got = result[name]["state"][key]
                if key == "step":
                    assert float(got) == float(value), f"{name} rank {rank}: step"
                else:
                    assert_rel_close(got, value[start:end], tolerance("sharded", torch.float64), f"{name} rank {rank}: {key}")
