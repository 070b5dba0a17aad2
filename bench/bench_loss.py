"""Benchmark of the fused margin-softmax loss against eager PyTorch, its compiled form,
peer libraries and the GEMM floor, over a sweep of class counts.

    .venv/bin/python bench/bench_loss.py                      # what `make bench` runs
    .venv/bin/python bench/bench_loss.py --heads cosface,arcface --classes 2^12..2^16

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

Results: a markdown table on stdout, and ``bench/results/bench_loss_<device>_<date>.json``
and ``.png`` (time and memory versus C), plus the metadata a reader needs to trust a
number: device, versions, command line, git commit, date, machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SCHEMA = "fused_margin.bench_loss/1"
RESULT_MARKER = "@@fused_margin_bench_result@@"

#: Implementations that are not fused backends of the registry, in table order.
NON_BACKEND_IMPLS = ("eager", "compile", "pml", "liger", "cce", "floor")
#: Backends with a variant per option value, named 'backend:value' (e.g. 'triton:atomic'):
#: the option set on the backend in the measuring process. The plain name runs the default.
BACKEND_VARIANTS = {"triton": ("backward_mode", ("gemm", "recompute", "atomic"))}


def split_impl(impl: str) -> tuple[str, dict[str, str]]:
    """``('triton', {'backward_mode': 'atomic'})`` for 'triton:atomic'; ``(impl, {})`` else."""
    name, _, value = impl.partition(":")
    if not value:
        return impl, {}
    option, _values = BACKEND_VARIANTS[name]
    return name, {option: value}
#: Loss agreement with the float64 reference, per input dtype (max relative error per sample).
LOSS_TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 2e-2, "float16": 1e-2}
#: Gradient agreement with the float64 reference on the sampled rows of dX and dW
#: (norm-wise relative error of each block), per input dtype.
GRAD_TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 3e-2, "float16": 1e-2}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---------------------------------------------------------------------------------
# Heads under test: the library's spec and, where one exists, the peer's equivalent.
# ---------------------------------------------------------------------------------


def _pml_module(name: str, num_classes: int, dim: int) -> Any:
    """pytorch-metric-learning's loss equal to our head ``name`` (its W is (D, C))."""
    from pytorch_metric_learning import losses, reducers

    per_sample = reducers.DoNothingReducer()
    if name == "cosface":
        return losses.CosFaceLoss(num_classes, dim, margin=0.35, scale=64, reducer=per_sample)
    if name == "arcface":  # PML takes the margin in degrees
        return losses.ArcFaceLoss(num_classes, dim, margin=math.degrees(0.5), scale=64, reducer=per_sample)
    if name == "normface":
        return losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=1.0 / 30.0, reducer=per_sample)
    if name == "subcenter_arcface":
        return losses.SubCenterArcFaceLoss(
            num_classes, dim, margin=math.degrees(0.5), scale=64, sub_centers=3, reducer=per_sample
        )
    raise KeyError(name)


def head_spec(name: str):
    """The head as a :class:`fused_margin.MarginSpec` with the library's defaults."""
    from fused_margin import MarginSpec

    factories: dict[str, Callable[[], Any]] = {
        "softmax": MarginSpec.softmax,
        "normface": MarginSpec.normface,
        "cosface": MarginSpec.cosface,
        "arcface": MarginSpec.arcface,
        "combined": MarginSpec.combined,
        "cs_softmax": MarginSpec.cs_softmax,
        "so_softmax": MarginSpec.so_softmax,
        "circle": MarginSpec.circle,
        "curricularface": MarginSpec.curricularface,
        "sphereface": MarginSpec.sphereface,
        "lsoftmax": MarginSpec.lsoftmax,
        "subcenter_arcface": lambda: MarginSpec.arcface(num_subcenters=3),
    }
    if name not in factories:
        raise ValueError(f"unknown head {name!r}; choose from {sorted(factories)}")
    return factories[name]()


HEAD_NAMES = (
    "softmax", "normface", "cosface", "arcface", "combined", "cs_softmax", "so_softmax", "circle",
    "curricularface", "sphereface", "lsoftmax", "subcenter_arcface",
)
PML_HEADS = ("cosface", "arcface", "normface", "subcenter_arcface")
#: Liger and cut-cross-entropy fuse the plain linear + cross-entropy only.
LINEAR_CE_HEADS = ("softmax",)

IMPL_LABELS = {
    "eager": "eager PyTorch",
    "compile": "torch.compile(eager)",
    "pml": "pytorch-metric-learning",
    "liger": "Liger fused linear CE",
    "cce": "cut-cross-entropy",
    "floor": "floor: 3 GEMMs",
    "reference": "reference backend (custom op)",
}


def impl_label(impl: str, dtype: str | None = None) -> str:
    """The table's name of ``impl``; the eager baselines say how they multiply (what a
    user writes: 16-bit GEMMs in the input dtype, the softmax in fp32)."""
    label = IMPL_LABELS.get(impl, f"fused [{impl}]")
    if impl in ("eager", "compile") and dtype in ("bfloat16", "float16"):
        short = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
        label += f" ({short} GEMMs, fp32 softmax)"
    return label


# ---------------------------------------------------------------------------------
# Process-level measurement helpers (used inside the child processes).
# ---------------------------------------------------------------------------------


def _proc_status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def current_rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise), so that RSS
    reflects live tensors, not what the allocator happens to cache."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def limit_cpu_memory(limit_bytes: int | None) -> None:
    """Make allocations past ``limit_bytes`` fail (PyTorch then raises, which the worker
    reports as OOM) instead of waking the kernel's OOM killer on a shared machine."""
    if limit_bytes:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return "out of memory" in text.lower() or "can't allocate memory" in text or "Cannot allocate memory" in text


class MemoryMeter:
    """Peak memory above a baseline: CUDA allocator statistics, or the process RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.method = (
            "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM of a fresh process"
        )

    def set_baseline(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self.baseline = current_rss_bytes()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()
            if not reset_peak_rss():
                self.method = "ru_maxrss of a fresh process (includes warm-up)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


class Timer:
    """Forward/backward split of one iteration: CUDA events on a GPU (no host sync
    inside the iteration), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def __enter__(self) -> Timer:
        if self.cuda:
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            self._events[0].record()
        else:
            self._marks = [time.perf_counter()]
        return self

    def mark(self) -> None:
        if self.cuda:
            self._events[1].record()
        else:
            self._marks.append(time.perf_counter())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._events[2].record()
            torch.cuda.synchronize(self.device)
        else:
            self._marks.append(time.perf_counter())

    def split_ms(self) -> tuple[float, float]:
        if self.cuda:
            e = self._events
            return e[0].elapsed_time(e[1]), e[1].elapsed_time(e[2])
        m = self._marks
        return (m[1] - m[0]) * 1e3, (m[2] - m[1]) * 1e3


# ---------------------------------------------------------------------------------
# Inputs and the cases under test.
# ---------------------------------------------------------------------------------


def make_inputs(
    batch: int, num_rows: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (B, D), W (num_rows, D)): the same values in every process for the same
    arguments (generated on the device by a seeded generator)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, dim, device=device, generator=gen).to(dtype)
    # InsightFace initializes class weights N(0, 0.01); the scale matters for the
    # unnormalized (softmax) head only, where it keeps the logits O(1).
    w = (torch.randn(num_rows, dim, device=device, generator=gen) * 0.01).to(dtype)
    return x, w


def make_labels(batch: int, num_classes: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randint(0, num_classes, (batch,), device=device, generator=gen)


def check_weight_rows(labels: torch.Tensor, check_rows: list[int], num_rows: int, k: int, count: int) -> list[int]:
    """Rows of W whose gradient is checked: the target rows of the checked embeddings
    (where the target transform acts) and ``count`` rows spread over W."""
    targets = (labels[torch.tensor(check_rows, device=labels.device)] * k).tolist()
    spread = [round(i * (num_rows - 1) / max(count - 1, 1)) for i in range(min(count, num_rows))]
    return sorted(set(targets) | set(spread))


@dataclass
class Case:
    """One implementation on one set of inputs: ``forward()`` returns the loss (per
    sample (B,), or a scalar), ``backward(out)`` back-propagates the mean loss."""

    forward: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], Any]
    params: list[torch.Tensor]
    per_sample: bool = True


def _mean_backward(out: torch.Tensor) -> None:
    (out.mean() if out.dim() else out).backward()


def build_case(impl: str, head: str, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, spec: Any) -> Case:
    """The callable pair for ``impl``; raises ImportError where a peer is missing."""
    import fused_margin as fm

    x.requires_grad_(True)
    w.requires_grad_(True)
    if impl == "compile":
        def eager_loss(xx: torch.Tensor, ww: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return fm.margin_cross_entropy(xx, ww, yy, spec, reduction="none", backend="eager")

        compiled = torch.compile(eager_loss)
        return Case(lambda: compiled(x, w, y), _mean_backward, [x, w])
    if impl == "pml":
        module = _pml_module(head, w.shape[0] // spec.num_subcenters, w.shape[1]).to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            module.W.copy_(w.T)
        return Case(lambda: module(x, y)["loss"]["losses"], _mean_backward, [x, module.W])
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return Case(
            lambda: liger_fused_linear_cross_entropy(x, w, y, reduction="none"), _mean_backward, [x, w]
        )
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        # Its Triton kernel needs a GPU; elsewhere the package offers its torch.compile path.
        cce_impl = "cce" if x.device.type == "cuda" else "torch_compile"
        return Case(
            lambda: linear_cross_entropy(x, w, y, reduction="none", impl=cce_impl), _mean_backward, [x, w]
        )
    # 'eager', 'reference' and every fused backend (a variant: its options are set on the
    # backend by the caller): the library's public function.
    backend = split_impl(impl)[0]
    return Case(
        lambda: fm.margin_cross_entropy(x, w, y, spec, reduction="none", backend=backend), _mean_backward, [x, w]
    )


def _stats(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": [round(s, 4) for s in samples],
    }


def time_iterations(
    step: Callable[[Timer], None], device: torch.device, warmup: int, repeat: int, min_time: float,
    max_repeat: int, on_warmup_done: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """At least ``repeat`` timed iterations, more (up to ``max_repeat``) until they add up
    to ``min_time`` seconds: cheap shapes get more samples for the same wall time."""
    for _ in range(warmup):
        with Timer(device) as t:
            step(t)
    if on_warmup_done is not None:
        on_warmup_done()
    fwd: list[float] = []
    bwd: list[float] = []
    while len(fwd) < max(repeat, 1) or (len(fwd) < max_repeat and (sum(fwd) + sum(bwd)) * 1e-3 < min_time):
        with Timer(device) as t:
            step(t)
        f, b = t.split_ms()
        fwd.append(f)
        bwd.append(b)
    total = [f + b for f, b in zip(fwd, bwd, strict=True)]
    return {"fwd_ms": _stats(fwd), "bwd_ms": _stats(bwd), "total_ms": _stats(total)}


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
            return {"status": "OOM", "reason": _first_line(error)}
        return {"status": "error", "reason": f"{type(error).__name__}: {_first_line(error)}"}
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
            entry["losses_error"] = f"{type(error).__name__}: {_first_line(error)}"
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
        return {"status": status, "reason": f"{type(error).__name__}: {_first_line(error)}"}


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


# ---------------------------------------------------------------------------------
# Metadata.
# ---------------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "fused_margin": _dist_version("fused_margin"),
        "numpy": _dist_version("numpy"),
        "pytorch_metric_learning": _dist_version("pytorch-metric-learning"),
        "liger_kernel": _dist_version("liger-kernel"),
        "cut_cross_entropy": _dist_version("cut-cross-entropy"),
        "cuda": torch.version.cuda,
    }


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "os": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
            name = match.group(1).strip() if match else name
        mem = _meminfo_bytes("MemTotal")
        info.update(name=name, cores=os.cpu_count(), threads=torch.get_num_threads(), memory_bytes=mem)
    return info


def _meminfo_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    return None


def git_info() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def device_slug(info: dict[str, Any]) -> str:
    if info["type"] == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


# ---------------------------------------------------------------------------------
# The parent: plan the sweep, run the children, assemble, print, save.
# ---------------------------------------------------------------------------------


def run_child(script: Path, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs ``script --worker`` in a fresh interpreter with ``job`` on stdin."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--worker"], input=json.dumps(job), capture_output=True, text=True,
            timeout=timeout, cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"no result within {timeout:.0f} s", "wall_s": timeout}
    wall = time.perf_counter() - start
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["wall_s"] = round(wall, 2)
            return result
    if done.returncode < 0 and -done.returncode == 9:
        return {"status": "OOM", "reason": "child killed by SIGKILL (kernel OOM killer?)", "wall_s": wall}
    tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {done.returncode}"]
    return {"status": "error", "reason": f"worker failed: {tail[0][:300]}", "wall_s": round(wall, 2)}


def run_job(script: Path, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measurements always run in a fresh child. The probe and the reference/floor job
    measure no memory, so on the CPU they run here, saving an interpreter start each;
    with a GPU they run in a child too, so that this process never holds a CUDA context."""
    if job["device"] == "cpu" and job["kind"] in ("probe", "reference"):
        worker = worker_probe if job["kind"] == "probe" else worker_reference
        start = time.perf_counter()
        result = worker({**job, "in_process": True})
        return {**result, "wall_s": round(time.perf_counter() - start, 2)}
    return run_child(script, job, timeout)


def worker_main(dispatch: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    job = json.loads(sys.stdin.read())
    try:
        result = dispatch[job["kind"]](job)
    except Exception as error:  # noqa: BLE001 - the parent records it
        result = {"status": "OOM" if is_oom(error) else "error",
                  "reason": f"{type(error).__name__}: {_first_line(error)}"}
    print(RESULT_MARKER + json.dumps(result), flush=True)


def parse_classes(text: str) -> list[int]:
    """'4096,8192', '2^12..2^18' (every power of two between), '2**20', '1000000'."""

    def one(token: str) -> int:
        token = token.strip()
        m = re.fullmatch(r"2(?:\^|\*\*)(\d+)", token)
        value = 2 ** int(m.group(1)) if m else int(token)
        if value < 2:
            raise argparse.ArgumentTypeError(f"class counts must be >= 2, got {token!r}")
        return value

    out: list[int] = []
    for part in text.split(","):
        if ".." in part:
            lo, hi = (one(p) for p in part.split(".."))
            if lo & (lo - 1) or hi & (hi - 1):
                raise argparse.ArgumentTypeError(f"range ends must be powers of two, got {part!r}")
            out += [2**k for k in range(lo.bit_length() - 1, hi.bit_length())]
        else:
            out.append(one(part))
    return sorted(set(out))


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def select_impls(requested: list[str], probe: dict[str, Any]) -> list[str]:
    """``all`` = every registered fused backend (not 'reference') + eager, compile, peers
    and the floor; ``-name`` removes one; names add themselves."""
    fused = sorted({name for head in probe["backends"].values() for name in head if name != "reference"})
    chosen: list[str] = []
    for token in requested:
        if token == "all":
            chosen += [*fused, *NON_BACKEND_IMPLS]
        elif token.startswith("-"):
            chosen = [c for c in chosen if c != token[1:]]
        else:
            chosen.append(token)
    known = {*fused, "reference", *NON_BACKEND_IMPLS}
    known |= {f"{name}:{value}" for name, (_, values) in BACKEND_VARIANTS.items() if name in fused for value in values}
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; known: {sorted(known)}")
    return list(dict.fromkeys(chosen))


def applicability(impl: str, head: str, classes: int, args: argparse.Namespace, probe: dict[str, Any]) -> str | None:
    """Why ``impl`` is skipped at this point of the sweep (None: run it)."""
    base, _ = split_impl(impl)
    if base in probe["backends"].get(head, {}):
        reasons = probe["backends"][head][base]
        if reasons:
            return "; ".join(reasons)
    if impl == "pml" and head not in PML_HEADS:
        return "no equivalent loss in pytorch-metric-learning"
    if impl in ("liger", "cce") and head not in LINEAR_CE_HEADS:
        return "fuses the plain linear softmax head only"
    if impl == "liger" and args.device_type != "cuda":
        return "Liger Kernel needs a GPU"
    caps = {"compile": args.compile_max_classes, "pml": args.peer_max_classes, "eager": args.eager_max_classes,
            "reference": args.eager_max_classes}
    cap = caps.get(impl)
    if cap and classes > cap:
        flag = {"compile": "--compile-max-classes", "pml": "--peer-max-classes"}.get(impl, "--eager-max-classes")
        return f"time budget: C > {cap} ({flag})"
    return None


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


def run_sweep(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole sweep. ``save`` receives the result as it stands after every row (rows
    not yet measured are absent, ``complete`` is False), so that a run killed at any
    point leaves what it measured; SIGINT/SIGTERM end the sweep early, and the result
    then says so (``interrupted``)."""
    from tqdm import tqdm

    script = Path(__file__).resolve()
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

    probe = run_job(script, {**base, "kind": "probe", "heads": args.heads}, child_timeout())
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

    progress = tqdm(total=len(planned) + len(args.heads), desc="bench", unit="run", file=sys.stderr,
                    disable=args.no_progress, dynamic_ncols=True)
    try:
        for head in args.heads:
            _sweep_head(head, args, script, base, impls, probe, check_rows, itemsize, deadline, over_budget,
                        child_timeout, rows, losses, grads, references, progress, checkpoint)
    except (Interrupted, KeyboardInterrupt) as error:
        interrupted = f"stopped by {str(error) or 'SIGINT'} after {len(rows)} row(s)"
        print(f"bench_loss: {interrupted}; writing the rows measured so far", file=sys.stderr, flush=True)
    progress.close()
    return snapshot(complete=interrupted is None)


#: seconds a child started inside --time-budget may run past it
BUDGET_GRACE_S = 30.0


def _sweep_head(head, args, script, base, impls, probe, check_rows, itemsize, deadline, over_budget,
                child_timeout, rows, losses, grads, references, progress, checkpoint) -> None:
    progress.set_postfix_str(f"{head}: float64 reference + GEMM floor")
    ref_job = {**base, "kind": "reference", "head": head, "classes_list": args.classes, "floor": "floor" in impls,
               "check_rows": check_rows}
    if deadline is not None:
        ref_job["deadline_unix"] = time.time() + (deadline - time.monotonic())
    ref = run_job(script, ref_job, child_timeout())
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
            result = run_child(script, {**base, "kind": "measure", "head": head, "classes": classes,
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
        "device": probe["device"],
        "versions": probe["versions"],
        "command": shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]),
        "git": git_info(),
        "load_average": {"start": load_start, "end": load_average()},
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
# Presentation: markdown table and plot, both drawn from the result dict only.
# ---------------------------------------------------------------------------------


def _fmt_ms(stats: dict[str, Any] | None) -> str:
    if not stats:
        return ""
    med = stats["median"]
    half = (stats["max"] - stats["min"]) / 2
    digits = 1 if med >= 10 else 2
    return f"{med:.{digits}f} ±{half:.{digits}f}"


def _fmt_bytes(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def _fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def _fmt_err(value: float | None, ok: bool) -> str:
    return "" if value is None else f"{value:.1e}" + ("" if ok else " ✗")


def markdown_tables(result: dict[str, Any]) -> str:
    """One markdown table per head, from a result dict (what report.py also uses)."""
    cfg = result["config"]
    lines: list[str] = []
    for head in cfg["heads"]:
        lines.append(f"**{head}** — B={cfg['batch']}, D={cfg['dim']}, {cfg['dtype']}; time: median ±half-range of "
                     f"at least {cfg['repeat']} timed runs (more up to {cfg.get('min_time_s')} s); "
                     "memory: peak above the inputs")
        lines.append("")
        rows = [r for r in result["rows"] if r["head"] == head]
        # An implementation skipped for one reason at every C gets one line under the table.
        not_run: dict[str, str] = {}
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = [r for r in rows if r["impl"] == impl]
            if all(r["status"] == "skipped" for r in mine) and len({r.get("reason") for r in mine}) == 1:
                not_run[impl] = f"{mine[0]['label']}: {mine[0].get('reason')}"
        # the gradient check's column where the run made one (older results have none)
        with_grads = any("grad_max_rel_err" in r for r in rows)
        lines.append("| C | implementation | fwd ms | bwd ms | total ms | speed-up vs eager | × floor | useful TFLOP/s "
                     "| peak MiB | memory vs eager | loss rel. err |" + (" grad rel. err |" if with_grads else ""))
        lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if with_grads else ""))
        blank = " |" if with_grads else ""
        for row in rows:
            if row["impl"] in not_run:
                continue
            if row["status"] != "ok":
                status = row["status"] if row["status"] != "skipped" else "skipped"
                reason = f" ({row['reason']})" if row.get("reason") else ""
                lines.append(f"| {row['classes']} | {row['label']} | {status}{reason} | | | | | | | | |{blank}")
                continue
            err = row.get("loss_max_rel_err")
            err_text = "" if err is None else f"{err:.1e}" + ("" if row.get("loss_ok", True) else " ✗")
            mem = _fmt_bytes(row.get("peak_extra_bytes"))
            if row["impl"] == "floor":
                mem += " (analytic)"
            lines.append(
                f"| {row['classes']} | {row['label']} | {_fmt_ms(row.get('fwd_ms'))} | {_fmt_ms(row.get('bwd_ms'))} "
                f"| {_fmt_ms(row.get('total_ms'))} | {_fmt_ratio(row.get('speedup_vs_eager'))} "
                f"| {_fmt_ratio(row.get('time_vs_floor'))} | {row.get('useful_tflops', 0):.3g} | {mem} "
                f"| {_fmt_ratio(row.get('memory_vs_eager'))} | {err_text} |"
                + (f" {_fmt_err(row.get('grad_max_rel_err'), row.get('grad_ok', True))} |" if with_grads else "")
            )
        lines.append("")
        if not_run:
            lines.append("Not run: " + "; ".join(not_run.values()) + ".")
            lines.append("")
    return "\n".join(lines)


def header_text(result: dict[str, Any]) -> str:
    d, v, g = result["device"], result["versions"], result["git"]
    if d["type"] == "cpu":
        where = f"CPU: {d['name']} ({d.get('threads')} threads, {d.get('cores')} cores)"
    else:
        where = f"GPU: {d['name']} ({d.get('memory_bytes', 0) / 2**30:.0f} GiB)"
    commit = (g.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if g.get("dirty") else "")
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val and k in ("python", "torch", "triton", "cuda"))
    load = result.get("load_average") or {}
    text = (f"{where}; {result['date']}; {vers}; commit {commit}; "
            f"load average {load.get('start')} → {load.get('end')}; command `{result['command']}`")
    if result.get("environment"):
        text += "; environment " + " ".join(f"`{k}={val}`" for k, val in result["environment"].items())
    if result.get("note"):
        text += f"\n\nNote: {result['note']}"
    return text


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = result["config"]["heads"]
    fig, axes = plt.subplots(len(heads), 2, figsize=(11, 4 * len(heads)), squeeze=False)
    for (ax_t, ax_m), head in zip(axes, heads, strict=True):
        rows = [r for r in result["rows"] if r["head"] == head and r["status"] == "ok"]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["classes"])
            cs = [r["classes"] for r in mine]
            style = {"linestyle": "--", "color": "black"} if impl == "floor" else {"marker": "o"}
            (line,) = ax_t.plot(cs, [r["total_ms"]["median"] for r in mine], label=mine[0].get("label", impl_label(impl)), **style)
            ax_t.fill_between(cs, [r["total_ms"]["min"] for r in mine], [r["total_ms"]["max"] for r in mine],
                              color=line.get_color(), alpha=0.15, linewidth=0)
            mem = [(r["classes"], r["peak_extra_bytes"] / 2**20) for r in mine if r.get("peak_extra_bytes")]
            if mem:
                ax_m.plot(*zip(*mem, strict=True), label=mine[0].get("label", impl_label(impl)), **style)
        for ax, ylabel in ((ax_t, "forward + backward (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("classes C")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_title(f"{head}: time")
        ax_m.set_title(f"{head}: memory")
        ax_t.legend(fontsize=8)
    cfg, d = result["config"], result["device"]
    fig.suptitle(f"fused_margin bench, {d['type']} {d.get('name', '')}, B={cfg['batch']} D={cfg['dim']} "
                 f"{cfg['dtype']}, {result['date'][:10]}, commit {(result['git'].get('commit') or '?')[:8]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available else cpu")
    p.add_argument("--heads", type=_csv, default=None,
                   help=f"comma-separated, from {', '.join(HEAD_NAMES)} (default: cosface on CPU; "
                        "cosface,softmax on GPU)")
    p.add_argument("--classes", type=parse_classes, default=None,
                   help="class counts: '4096,65536', '2^12..2^18' (default CPU 2^12..2^18, GPU 2^14..2^21)")
    p.add_argument("--batch", type=int, default=None, help="B (default CPU 256, GPU 1024)")
    p.add_argument("--dim", type=int, default=512, help="D, the embedding size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default CPU float32, GPU bfloat16")
    p.add_argument("--backends", type=_csv, default=["all"],
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
        available = _meminfo_bytes("MemAvailable")
        args.cpu_memory_limit_bytes = int(0.7 * available) if available else None
    return args


def _write_json(path: Path, result: dict[str, Any]) -> None:
    # write-then-rename: a reader (or a kill) never sees half a file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


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
        _write_json(paths["json"], result)
        if args.live_json is not None:
            args.live_json.parent.mkdir(parents=True, exist_ok=True)
            _write_json(args.live_json, result)

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
        print(f"plot failed: {type(error).__name__}: {_first_line(error)}", file=sys.stderr)
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
