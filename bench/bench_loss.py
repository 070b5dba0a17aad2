"""Benchmark of the fused margin-softmax loss against eager PyTorch, its compiled form,
peer libraries and the GEMM floor, over a sweep of class counts.

    .venv/bin/python -m bench.bench_loss                      # what `make bench` runs
    .venv/bin/python -m bench.bench_loss --heads cosface,arcface --classes 2^12..2^16
    .venv/bin/python bench/bench_loss.py ...                  # the same

What is measured, per (head, class count C, implementation):

* forward, backward and total time: median and min/max over ``--repeat`` timed
  iterations after ``--warmup`` untimed ones (CUDA events on a GPU, ``perf_counter``
  on the CPU); every iteration starts with the parameter gradients set to None;
* peak memory above the inputs: on a GPU ``torch.cuda.max_memory_allocated``; on the
  CPU the peak resident set (``VmHWM``) of the process. Allocator caches lie about
  both, so **every measurement runs in a fresh child process**, and the high-water
  mark is reset after the warm-up (``/proc/self/clear_refs``), so compilation and
  first-call allocations do not count;
* the loss of the timed implementation, per sample, against the float64 reference on
  the same inputs (max relative error).

Implementations: every fused backend the registry has and that can run these inputs
(discovered at run time), the eager reference (``backend='eager'``: plain autograd
through the materialized logits), ``torch.compile`` of it, pytorch-metric-learning's
equivalent loss, Liger Kernel's and Apple's cut-cross-entropy fused linear
cross-entropy on the plain softmax head (when importable), and the floor: the three
plain GEMMs of the same shapes (logits, dX, dW), timed with ``torch.mm``.

FLOP model (docs/design.md section 5): the floor is ``6*B*C*D`` FLOPs (three GEMMs of
``2*B*C*D``); a fused kernel does ``8*B*C*D`` (it recomputes the logits in the
backward). Reported throughput is *useful* FLOP/s: ``6*B*C*D / total time``. The
memory floor above the inputs is their gradients: ``(B*D + C*D) * itemsize``.

The shared measurement helpers live in ``harness.py``, the implementations under test
in ``cases.py`` and the rendering (tables, plot, header) in ``tables.py``.

Results: a markdown table on stdout, and ``bench/results/bench_loss_<device>_<date>.json``
and ``.png`` (time and memory versus C), plus the metadata a reader needs to trust a
number: device, versions, command line, git commit, date, machine load.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/bench_loss.py): run it as the module bench.bench_loss
    from cli import run_as_module  # bench/ is sys.path[0] when a file in it runs

    run_as_module(__file__)

import argparse
import copy
import datetime as dt
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .cases import (
    DTYPES,
    HEAD_NAMES,
    NON_BACKEND_IMPLS,
    applicability,
    build_case,
    check_weight_rows,
    head_spec,
    impl_label,
    make_inputs,
    make_labels,
    select_impls,
    split_impl,
)
from .harness import (
    RESULTS_DIR,
    MemoryMeter,
    Timer,
    csv_list,
    default_cpu_memory_limit,
    device_info,
    device_slug,
    first_line,
    is_oom,
    limit_cpu_memory,
    load_average,
    parse_classes,
    provenance,
    run_child,
    time_iterations,
    versions,
    worker_main,
    write_json,
)
from .tables import SCHEMAS, header_text, markdown_tables, plot

SCHEMA = SCHEMAS["bench_loss"]
#: the module that the measuring child processes run (``python -m WORKER_MODULE --worker``)
WORKER_MODULE = "bench.bench_loss"
#: Loss agreement with the float64 reference, per input dtype (max relative error per sample).
LOSS_TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2, "float16": 1e-2}
#: Gradient agreement with the float64 reference on the sampled rows of dX and dW
#: (norm-wise relative error of each block), per input dtype.
GRAD_TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 3e-2, "float16": 1e-2}

# ---------------------------------------------------------------------------------
# Child-process workers. Each returns a JSON-able dict; `main` dispatches on job["kind"].
# ---------------------------------------------------------------------------------


def _worker_setup(job: dict[str, Any]) -> torch.device:
    device = torch.device(job["device"])
    if device.type == "cpu" and not job.get("in_process"):
        limit_cpu_memory(job.get("cpu_memory_limit_bytes"))
    if job.get("flush_denormal"):
        torch.set_flush_denormal(True)
    return device


def worker_measure(job: dict[str, Any]) -> dict[str, Any]:
    """Time and measure one implementation at one shape (a fresh process per call)."""
    from fused_margin.backends import get_backend
    from fused_margin.kernel_params import KernelParams

    device = _worker_setup(job)
    dtype = DTYPES[job["dtype"]]
    spec = head_spec(job["head"])
    impl = job["impl"]
    batch, classes, dim = job["batch"], job["classes"], job["dim"]
    try:
        x, w = make_inputs(batch, classes * spec.num_subcenters, dim, dtype, device, job["seed"])
        y = make_labels(batch, classes, device, job["seed"])
    except Exception as error:  # noqa: BLE001 - inputs alone may not fit
        if is_oom(error):
            return {"status": "OOM", "reason": "inputs do not fit"}
        raise
    if impl not in NON_BACKEND_IMPLS:
        base, options = split_impl(impl)
        backend = get_backend(base)
        reasons = backend.not_supported_reasons(x, w, KernelParams.from_spec(spec))
        if reasons:
            return {"status": "skipped", "reason": "; ".join(reasons)}
        for option, value in options.items():  # this process measures this one variant
            setattr(backend, option, value)
    try:
        case = build_case(impl, job["head"], x, w, y, spec)
    except ImportError as error:
        return {"status": "skipped", "reason": f"not installed ({error.name or error})"}
    del w  # the PML case holds its own (D, C) copy; the others keep a reference
    meter = MemoryMeter(device)
    meter.set_baseline()
    first_loss: list[torch.Tensor] = []
    first_grads: dict[str, list] = {}
    grad_rows = job.get("check_rows") if job.get("check_grads") else None

    def step(t: Timer) -> None:
        for p in case.params:
            p.grad = None
        out = case.forward()
        t.mark()
        case.backward(out)
        if not first_loss:
            first_loss.append(out.detach().float().cpu())
            if grad_rows is not None:  # the sampled gradient rows, outside the timed part of the run
                gx, gw = case.params[0].grad, case.params[1].grad
                if impl == "pml":  # its weight is (D, C)
                    gw = gw.T
                w_rows = check_weight_rows(y, grad_rows, gw.shape[0], spec.num_subcenters, len(grad_rows))
                first_grads["dx_rows"] = gx[torch.tensor(grad_rows, device=gx.device)].double().cpu().tolist()
                first_grads["dw_rows"] = gw[torch.tensor(w_rows, device=gw.device)].double().cpu().tolist()

    try:
        timings = time_iterations(step, device, job["warmup"], job["repeat"], job["min_time"], job["max_repeat"],
                                  meter.reset_peak)
        peak = meter.peak()
    except Exception as error:  # noqa: BLE001 - report, never crash the sweep
        if is_oom(error):
            return {"status": "OOM", "reason": first_line(error)}
        return {"status": "error", "reason": f"{type(error).__name__}: {first_line(error)}"}
    loss = first_loss[0]
    return {
        "status": "ok",
        **timings,
        "peak_bytes": peak,
        "baseline_bytes": meter.baseline,
        "peak_extra_bytes": max(0, peak - meter.baseline),
        "memory_method": meter.method,
        "loss_mean": float(loss.mean()),
        "losses": loss.tolist() if loss.dim() else None,
        **first_grads,
    }


def worker_reference(job: dict[str, Any]) -> dict[str, Any]:
    """For one head, at every class count: the float64 reference loss of the rows in
    ``check_rows`` (on the same inputs the measurements use; a row's loss depends on its
    own embedding only, so a subset checks every implementation at a fraction of the
    float64 cost) and the time of the three plain GEMMs."""
    import fused_margin as fm

    device = _worker_setup(job)
    dtype = DTYPES[job["dtype"]]
    spec = head_spec(job["head"])
    batch, dim = job["batch"], job["dim"]
    out: dict[str, Any] = {}
    deadline = job.get("deadline_unix")  # --time-budget: no class count starts after it
    for classes in job["classes_list"]:
        entry: dict[str, Any] = {}
        rows = classes * spec.num_subcenters
        if deadline is not None and time.time() > deadline:
            entry["losses_error"] = "time budget spent (--time-budget)"
            if job.get("floor", True):
                entry["floor"] = {"status": "skipped", "reason": "time budget spent (--time-budget)"}
            out[str(classes)] = entry
            continue
        try:
            x, w = make_inputs(batch, rows, dim, dtype, device, job["seed"])
            y = make_labels(batch, classes, device, job["seed"])
            check = torch.tensor(job["check_rows"], device=device)
            # Row chunks keep each (chunk, C) float64 temporary near 256 MiB.
            chunk = max(1, (1 << 25) // rows)
            if job.get("check_grads"):
                # dW needs every row: the whole batch in float64, backpropagating the
                # mean loss (1/B per row, as the measurements do), chunk by chunk
                x64 = x.double().requires_grad_(True)
                w64 = w.double().requires_grad_(True)
                losses = []
                for i in range(0, batch, chunk):
                    part = fm.margin_cross_entropy(x64[i : i + chunk], w64, y[i : i + chunk], spec,
                                                   reduction="none", backend="eager")
                    (part.sum() / batch).backward()
                    losses.append(part.detach())
                all_losses = torch.cat(losses)
                w_rows = check_weight_rows(y, job["check_rows"], rows, spec.num_subcenters, len(job["check_rows"]))
                entry["losses"] = all_losses[check].cpu().tolist()
                entry["dx_rows"] = x64.grad[check].cpu().tolist()
                entry["dw_rows"] = w64.grad[torch.tensor(w_rows, device=device)].cpu().tolist()
                entry["w_rows"] = w_rows
                del x64, w64, losses
            else:
                xc, yc = x[check], y[check]
                with torch.no_grad():
                    w64 = w.double()
                    losses = [
                        fm.margin_cross_entropy(xc[i : i + chunk].double(), w64, yc[i : i + chunk], spec,
                                                reduction="none", backend="eager")
                        for i in range(0, xc.shape[0], chunk)
                    ]
                    entry["losses"] = torch.cat(losses).cpu().tolist()
                    del w64, losses
            entry["rows"] = job["check_rows"]
        except Exception as error:  # noqa: BLE001
            entry["losses_error"] = f"{type(error).__name__}: {first_line(error)}"
        if job.get("floor", True):
            if deadline is not None and time.time() > deadline:
                entry["floor"] = {"status": "skipped", "reason": "time budget spent (--time-budget)"}
            else:
                entry["floor"] = _time_floor(job, device, dtype, batch, rows, dim)
        out[str(classes)] = entry
    return {"status": "ok", "classes": out}


def _time_floor(job: dict[str, Any], device: torch.device, dtype: torch.dtype, batch: int, rows: int,
                dim: int) -> dict[str, Any]:
    """The three GEMMs of a linear layer's forward and backward at these shapes
    (logits = x W^T; dX = G W; dW = G^T x), with a dense random G in place of the
    softmax gradient (so no denormals: the floor is the GEMM speed itself)."""
    try:
        x, w = make_inputs(batch, rows, dim, dtype, device, job["seed"])
        grad_logits = torch.randn(batch, rows, device=device, dtype=dtype)

        def step(t: Timer) -> None:
            torch.mm(x, w.T)
            t.mark()
            torch.mm(grad_logits, w)
            torch.mm(grad_logits.T, x)

        timings = time_iterations(step, device, job["warmup"], job["repeat"], job["min_time"], job["max_repeat"])
        return {"status": "ok", **timings}
    except Exception as error:  # noqa: BLE001
        status = "OOM" if is_oom(error) else "error"
        return {"status": status, "reason": f"{type(error).__name__}: {first_line(error)}"}


def worker_probe(job: dict[str, Any]) -> dict[str, Any]:
    """Device description, versions, and which fused backends can run each head here."""
    from fused_margin import available_backends
    from fused_margin.backends import get_backend
    from fused_margin.kernel_params import KernelParams

    requested = job["device"]
    device = torch.device(requested if requested != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[job["dtype"]] if job.get("dtype") else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backends: dict[str, dict[str, list[str]]] = {}
    for head in job["heads"]:
        spec = head_spec(head)
        x, w = make_inputs(job["batch"], 64 * spec.num_subcenters, job["dim"], dtype, device, 0)
        params = KernelParams.from_spec(spec)
        backends[head] = {}
        for name in available_backends():
            try:
                backends[head][name] = list(get_backend(name).not_supported_reasons(x, w, params))
            except Exception as error:  # noqa: BLE001 - a backend still being written
                backends[head][name] = [f"not_supported_reasons raised {type(error).__name__}: {error}"]
    return {
        "status": "ok",
        "device": device_info(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": versions(),
        "backends": backends,
    }


# ---------------------------------------------------------------------------------
# The parent: plan the sweep, run the children, assemble, print, save.
# ---------------------------------------------------------------------------------


def run_job(module: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measurements always run in a fresh child. The probe and the reference/floor job
    measure no memory, so on the CPU they run here, saving an interpreter start each;
    with a GPU they run in a child too, so that this process never holds a CUDA context."""
    if job["device"] == "cpu" and job["kind"] in ("probe", "reference"):
        worker = worker_probe if job["kind"] == "probe" else worker_reference
        start = time.perf_counter()
        result = worker({**job, "in_process": True})
        return {**result, "wall_s": round(time.perf_counter() - start, 2)}
    return run_child(module, job, timeout)


def assemble_row(
    head: str, classes: int, impl: str, args: argparse.Namespace, result: dict[str, Any]
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "head": head, "classes": classes, "batch": args.batch, "dim": args.dim, "dtype": args.dtype,
        "impl": impl, "label": impl_label(impl, args.dtype), "status": result.get("status", "error"),
        "reason": result.get("reason"), "warmup": args.warmup, "repeat": args.repeat,
    }
    for key in ("fwd_ms", "bwd_ms", "total_ms", "peak_bytes", "baseline_bytes", "peak_extra_bytes",
                "memory_method", "loss_mean", "wall_s"):
        if key in result:
            row[key] = result[key]
    return row


def _block_rel_err(mine: list | None, ref: list | None) -> float | None:
    if mine is None or ref is None:
        return None
    a, b = torch.tensor(mine, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    if a.shape != b.shape:
        return None
    if not torch.isfinite(a).all():
        return math.inf
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def finish_rows(rows: list[dict[str, Any]], losses: dict[tuple[str, int, str], list[float] | None],
                references: dict[tuple[str, int], dict[str, Any]], args: argparse.Namespace,
                grads: dict[tuple[str, int, str], tuple[list | None, list | None]] | None = None) -> None:
    """Loss and gradient checks against the float64 reference; ratios against eager and the floor."""
    tol = LOSS_TOLERANCE[args.dtype]
    grads = grads or {}
    by_key = {(r["head"], r["classes"], r["impl"]): r for r in rows}
    for row in rows:
        head, classes, impl = row["head"], row["classes"], row["impl"]
        spec_rows = classes * head_spec(head).num_subcenters
        # 3 GEMMs of 2*B*C*D FLOPs each: the useful work of any implementation.
        row["useful_flops"] = 6 * args.batch * spec_rows * args.dim
        if row["status"] != "ok":
            continue
        reference = references.get((head, classes), {})
        ref, ref_rows = reference.get("losses"), reference.get("rows")
        mine = losses.get((head, classes, impl))
        if impl == "floor":
            pass
        elif ref is None:
            row["loss_check"] = "no reference"
        elif mine is not None and len(mine) == args.batch:
            pairs = zip(ref_rows, ref, strict=True)
            row["loss_max_rel_err"] = max(abs(mine[i] - b) / max(abs(b), 1e-12) for i, b in pairs)
            row["loss_check"] = f"per sample, {len(ref_rows)} rows"
        else:
            row["loss_check"] = "not per sample: not checked"
        if "loss_max_rel_err" in row:
            row["loss_tolerance"] = tol
            row["loss_ok"] = bool(row["loss_max_rel_err"] <= tol)
        dx_rows, dw_rows = grads.get((head, classes, impl), (None, None))
        dx_err = _block_rel_err(dx_rows, reference.get("dx_rows"))
        dw_err = _block_rel_err(dw_rows, reference.get("dw_rows"))
        if dx_err is not None and dw_err is not None:
            row["dx_rel_err"], row["dw_rel_err"] = dx_err, dw_err
            row["grad_max_rel_err"] = max(dx_err, dw_err)
            row["grad_check"] = (f"dX rows {len(ref_rows)}, dW rows {len(reference['w_rows'])} "
                                 "(targets of those rows and rows spread over W)")
            row["grad_tolerance"] = GRAD_TOLERANCE[args.dtype]
            row["grad_ok"] = bool(row["grad_max_rel_err"] <= row["grad_tolerance"])
        total = row["total_ms"]["median"]
        row["useful_tflops"] = row["useful_flops"] / (total * 1e-3) / 1e12
        eager = by_key.get((head, classes, "eager"))
        if eager and eager["status"] == "ok":
            row["speedup_vs_eager"] = eager["total_ms"]["median"] / total
            if "peak_extra_bytes" in row and eager.get("peak_extra_bytes"):
                row["memory_vs_eager"] = row["peak_extra_bytes"] / eager["peak_extra_bytes"]
        floor = by_key.get((head, classes, "floor"))
        if floor and floor["status"] == "ok":
            row["time_vs_floor"] = total / floor["total_ms"]["median"]


class Interrupted(Exception):
    """SIGTERM (or SIGINT) while sweeping: the rows measured so far are kept and written."""


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


class _NoProgress:
    """The progress bar's calls, doing nothing: ``--no-progress`` runs without tqdm installed."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def run_sweep(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole sweep. ``save`` receives the result as it stands after every row (rows
    not yet measured are absent, ``complete`` is False), so that a run killed at any
    point leaves what it measured; SIGINT/SIGTERM end the sweep early, and the result
    then says so (``interrupted``)."""
    module = WORKER_MODULE
    started = dt.datetime.now(dt.timezone.utc)
    load_start = load_average()
    base = {"device": args.device, "dtype": args.dtype, "batch": args.batch, "dim": args.dim, "seed": args.seed,
            "flush_denormal": args.flush_denormal, "cpu_memory_limit_bytes": args.cpu_memory_limit_bytes,
            "warmup": args.warmup, "repeat": args.repeat, "min_time": args.min_time, "max_repeat": args.max_repeat,
            "check_grads": args.check_grads}
    # --time-budget: no job starts once it is spent (the reference job stops between
    # class counts); what is left is reported as skipped
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    over_budget = f"time budget spent (--time-budget {args.time_budget} s)"

    def child_timeout() -> float:
        # a child started near the end of the budget may not outlive it by much
        if deadline is None:
            return args.worker_timeout
        return max(1.0, min(args.worker_timeout, deadline - time.monotonic() + BUDGET_GRACE_S))

    probe = run_job(module, {**base, "kind": "probe", "heads": args.heads}, child_timeout())
    if probe.get("status") != "ok":
        raise SystemExit(f"probe failed: {probe.get('reason')}")
    impls = select_impls(args.backends, probe)
    itemsize = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    # Evenly spread rows (first and last included) whose loss is checked in float64.
    count = min(args.batch, args.check_rows)
    check_rows = sorted({round(i * (args.batch - 1) / max(count - 1, 1)) for i in range(count)})

    rows: list[dict[str, Any]] = []
    losses: dict[tuple[str, int, str], list[float] | None] = {}
    grads: dict[tuple[str, int, str], tuple[list | None, list | None]] = {}
    references: dict[tuple[str, int], dict[str, Any]] = {}
    planned = [(h, c, i) for h in args.heads for c in args.classes for i in impls if i != "floor"]
    interrupted: str | None = None

    def snapshot(complete: bool) -> dict[str, Any]:
        done = copy.deepcopy(rows)
        order = {impl: i for i, impl in enumerate(impls)}
        done.sort(key=lambda r: (args.heads.index(r["head"]), r["classes"], order.get(r["impl"], len(order))))
        finish_rows(done, losses, references, args, grads)
        return _result(args, started, load_start, probe, impls, check_rows, done, complete, interrupted)

    def checkpoint() -> None:
        if save is not None:
            save(snapshot(complete=False))

    if args.no_progress:
        progress = _NoProgress()
    else:
        from tqdm import tqdm

        progress = tqdm(total=len(planned) + len(args.heads), desc="bench", unit="run", file=sys.stderr,
                        dynamic_ncols=True)
    try:
        for head in args.heads:
            _sweep_head(head, args, module, base, impls, probe, check_rows, itemsize, deadline, over_budget,
                        child_timeout, rows, losses, grads, references, progress, checkpoint)
    except (Interrupted, KeyboardInterrupt) as error:
        interrupted = f"stopped by {str(error) or 'SIGINT'} after {len(rows)} row(s)"
        print(f"bench_loss: {interrupted}; writing the rows measured so far", file=sys.stderr, flush=True)
    progress.close()
    return snapshot(complete=interrupted is None)


#: seconds a child started inside --time-budget may run past it
BUDGET_GRACE_S = 30.0


def _sweep_head(head, args, module, base, impls, probe, check_rows, itemsize, deadline, over_budget,
                child_timeout, rows, losses, grads, references, progress, checkpoint) -> None:
    progress.set_postfix_str(f"{head}: float64 reference + GEMM floor")
    ref_job = {**base, "kind": "reference", "head": head, "classes_list": args.classes, "floor": "floor" in impls,
               "check_rows": check_rows}
    if deadline is not None:
        ref_job["deadline_unix"] = time.time() + (deadline - time.monotonic())
    ref = run_job(module, ref_job, child_timeout())
    progress.update()
    num_k = head_spec(head).num_subcenters
    for classes in args.classes:
        entry = ref.get("classes", {}).get(str(classes), {})
        references[(head, classes)] = entry
        if "floor" in impls:
            floor = entry.get("floor") or {"status": ref.get("status", "error"), "reason": ref.get("reason")}
            row = assemble_row(head, classes, "floor", args, floor)
            if row["status"] == "ok":
                # Memory floor above the inputs: their gradients, nothing of size B x C.
                row["peak_extra_bytes"] = (args.batch * args.dim + classes * num_k * args.dim) * itemsize
                row["memory_method"] = "analytic: (B*D + C*D) * itemsize"
            rows.append(row)
    checkpoint()
    failed_at: dict[str, int] = {}
    for classes in args.classes:
        for impl in impls:
            if impl == "floor":
                continue
            reason = applicability(impl, head, classes, args, probe)
            if reason is None and deadline is not None and time.monotonic() > deadline:
                reason = over_budget
            if reason is None and impl in failed_at:
                reason = f"OOM at C={failed_at[impl]}"
            if reason is not None:
                rows.append(assemble_row(head, classes, impl, args, {"status": "skipped", "reason": reason}))
                progress.update()
                continue
            progress.set_postfix_str(f"{head} C={classes} {impl}")
            result = run_child(module, {**base, "kind": "measure", "head": head, "classes": classes,
                                        "impl": impl, "check_rows": check_rows}, child_timeout())
            if result.get("status") == "OOM":
                failed_at[impl] = classes
            losses[(head, classes, impl)] = result.pop("losses", None)
            grads[(head, classes, impl)] = (result.pop("dx_rows", None), result.pop("dw_rows", None))
            row = assemble_row(head, classes, impl, args, result)
            rows.append(row)
            progress.update()
            _print_row(row)
            checkpoint()


def _print_row(row: dict[str, Any]) -> None:
    """One line per measured row on stdout as it is measured (logs of a killed run keep them)."""
    total = (row.get("total_ms") or {}).get("median")
    what = f"{total:.3f} ms" if total is not None else f"{row['status']}: {row.get('reason')}"
    print(f"row {row['head']} C={row['classes']} {row['impl']}: {what}", flush=True)


def _result(args, started, load_start, probe, impls, check_rows, rows, complete, interrupted) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "kind": "bench_loss",
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
        "complete": complete,
        "interrupted": interrupted,
        **provenance(probe["device"], probe["versions"], load_start),
        "note": args.note,
        # backend options set through the environment (e.g. the Triton backward mode)
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("FUSED_MARGIN_") or k in ("TRITON_INTERPRET", "OMP_NUM_THREADS")},
        "triton_options": _triton_options(),
        "config": {
            "heads": args.heads, "classes": args.classes, "batch": args.batch, "dim": args.dim,
            "dtype": args.dtype, "impls": impls, "warmup": args.warmup, "repeat": args.repeat,
            "min_time_s": args.min_time, "max_repeat": args.max_repeat, "check_rows": check_rows, "seed": args.seed,
            "time_budget_s": args.time_budget, "worker_timeout_s": args.worker_timeout,
            "check_grads": args.check_grads,
            "flush_denormal": args.flush_denormal, "float32_matmul_precision": _fp32_matmul_precision(),
            "compile_max_classes": args.compile_max_classes, "peer_max_classes": args.peer_max_classes,
            "eager_max_classes": args.eager_max_classes, "cpu_memory_limit_bytes": args.cpu_memory_limit_bytes,
        },
        "flop_model": {
            "floor_flops": "6*B*C*D (logits, dX, dW: three GEMMs of 2*B*C*D)",
            "fused_flops": "8*B*C*D (forward 2BCD; backward 4BCD + 2BCD to recompute the logits) for the cpu and "
                           "cuda backends and Triton's 'gemm' (default) and 'atomic' backwards; Triton's "
                           "'recompute' backward recomputes the logits in each of its two kernels and per slice "
                           "of D (512 columns with 16-bit operands: 10*B*C*D at D=512)",
            "useful_tflops": "floor_flops / total time",
            "memory_floor": "inputs + their gradients: peak above inputs >= (B*D + C*D) * itemsize",
        },
        "backend_support": probe["backends"],
        "rows": rows,
    }


def _fp32_matmul_precision() -> str:
    from fused_margin.backends.triton import torch_fp32_matmul_precision

    return torch_fp32_matmul_precision()


def _triton_options() -> dict:
    """The Triton backend's options as this run resolves them (attributes unset, so from
    the environment and the defaults); reading them imports no Triton."""
    from fused_margin.backends.triton import BACKEND

    try:
        return {"backward_mode": BACKEND.backward_implementation(), "input_precision": BACKEND.precision(),
                "grad_dot_fp32": BACKEND.gradient_dot_fp32()}
    except ValueError as e:  # a bad environment value: the Triton rows report it too
        return {"error": str(e)}


# ---------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available else cpu")
    p.add_argument("--heads", type=csv_list, default=None,
                   help=f"comma-separated, from {', '.join(HEAD_NAMES)} (default: cosface on CPU; "
                        "cosface,softmax on GPU)")
    p.add_argument("--classes", type=parse_classes, default=None,
                   help="class counts: '4096,65536', '2^12..2^18' (default CPU 2^12..2^18, GPU 2^14..2^21)")
    p.add_argument("--batch", type=int, default=None, help="B (default CPU 256, GPU 1024)")
    p.add_argument("--dim", type=int, default=512, help="D, the embedding size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default CPU float32, GPU bfloat16")
    p.add_argument("--backends", type=csv_list, default=["all"],
                   help="implementations: 'all' (fused backends that can run + eager, compile, pml, liger, cce, "
                        "floor), names to add (also 'reference', and a backend variant: 'triton:recompute', "
                        "'triton:atomic' run the Triton backend with that backward mode), '-name' to drop: "
                        "e.g. all,-compile,triton:atomic")
    p.add_argument("--repeat", type=int, default=None, help="timed iterations, at least (default CPU 3, GPU 10)")
    p.add_argument("--min-time", type=float, default=None,
                   help="more timed iterations until they add up to this many seconds (default CPU 2, GPU 1)")
    p.add_argument("--max-repeat", type=int, default=50, help="at most this many timed iterations")
    p.add_argument("--check-rows", type=int, default=32,
                   help="rows whose loss is checked against the float64 reference (spread over the batch)")
    p.add_argument("--no-check-grads", dest="check_grads", action="store_false",
                   help="skip the gradient check (dX on the checked rows, dW on their target rows and rows spread "
                        "over W, against float64: the reference then runs the whole batch)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default CPU 1, GPU 3)")
    p.add_argument("--compile-max-classes", type=int, default=None,
                   help="skip torch.compile above this C (default CPU 2^14: compiling costs ~10 s per shape "
                        "on 2 cores; GPU: no limit)")
    p.add_argument("--peer-max-classes", type=int, default=None,
                   help="skip pytorch-metric-learning above this C (default CPU 2^16, GPU: no limit)")
    p.add_argument("--eager-max-classes", type=int, default=None, help="skip eager above this C (default: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flush-denormal", action="store_true",
                   help="torch.set_flush_denormal(True) in the measuring processes (docs/design.md section 5)")
    p.add_argument("--cpu-memory-limit-gb", type=float, default=None,
                   help="per-process allocation limit on the CPU, reported as OOM (default 70%% of MemAvailable)")
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="seconds per child process (default CPU 900, GPU 180: one measurement with its JIT "
                        "compilations; a hung compile must not eat a whole --time-budget)")
    p.add_argument("--live-json", type=Path, default=None,
                   help="also write the result as it stands to this file after every measured row (a run "
                        "killed at any point leaves the rows measured so far)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no further measurement starts (the rest is reported as skipped "
                        "and the results are written as usual); default: none")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON and PNG")
    p.add_argument("--note", default=None, help="free text stored with the results (e.g. machine load)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    args.device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = args.device_type
    gpu = args.device_type == "cuda"
    args.heads = args.heads or (["cosface", "softmax"] if gpu else ["cosface"])
    for head in args.heads:
        if head not in HEAD_NAMES:
            raise SystemExit(f"--heads: unknown head {head!r}; choose from {', '.join(HEAD_NAMES)}")
    args.classes = args.classes or parse_classes("2^14..2^21" if gpu else "2^12..2^18")
    args.batch = args.batch or (1024 if gpu else 256)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.repeat = args.repeat or (10 if gpu else 3)
    args.min_time = args.min_time if args.min_time is not None else (1.0 if gpu else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.worker_timeout is None:
        args.worker_timeout = 180.0 if gpu else 900.0
    if args.compile_max_classes is None and not gpu:
        args.compile_max_classes = 2**14
    if args.peer_max_classes is None and not gpu:
        args.peer_max_classes = 2**16
    if args.cpu_memory_limit_gb is not None:
        args.cpu_memory_limit_bytes = int(args.cpu_memory_limit_gb * 2**30)
    else:
        args.cpu_memory_limit_bytes = default_cpu_memory_limit()
    return args


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main({"measure": worker_measure, "reference": worker_reference, "probe": worker_probe})
        return 0
    args = resolve_defaults(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    paths: dict[str, Path] = {}

    def save(result: dict[str, Any]) -> None:
        if "json" not in paths:
            stem = f"bench_loss_{device_slug(result['device'])}_{stamp}"
            paths["json"], paths["png"] = args.out / f"{stem}.json", args.out / f"{stem}.png"
        result["plot"] = paths["png"].name
        write_json(paths["json"], result)
        if args.live_json is not None:
            args.live_json.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.live_json, result)

    # SIGTERM ends the sweep as SIGINT does: with the rows measured so far written out
    signal.signal(signal.SIGTERM, _raise_interrupted)
    result = run_sweep(args, save)
    save(result)
    print(header_text(result))
    print()
    print(markdown_tables(result))
    try:
        plot(result, paths["png"])
    except Exception as error:  # noqa: BLE001 - the JSON is the result; the plot is drawn from it
        print(f"plot failed: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
    bad = [r for r in result["rows"] if r.get("loss_ok") is False or r.get("grad_ok") is False]
    print(f"wrote {paths['json']} and {result['plot']} ({result['duration_s']} s)")
    if bad:
        names = ", ".join(f"{r['head']}/{r['classes']}/{r['impl']}" for r in bad)
        print(f"MISMATCH against the float64 reference in {len(bad)} row(s): {names}")
        return 1
    if result["interrupted"]:
        print(f"INCOMPLETE: {result['interrupted']}")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
