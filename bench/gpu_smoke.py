"""The GPU smoke check: the few results a first minute on a GPU must give, one JSON line
per result on stdout as each is measured (a run cut off at any point keeps what it
printed). No pytest, no child processes.

    python bench/gpu_smoke.py                         # on a GPU: CosFace, B=1024, D=512
    python bench/gpu_smoke.py --device cpu --tiny     # the same checks on the CPU (Triton interpreter)

Each line is a JSON object with ``"check"``:

* ``"correctness"``: every Triton backward mode ('gemm', 'recompute', 'atomic') in
  bf16, fp16 and fp32 (under ``input_precision`` 'ieee' and 'tf32'): loss, dX and dW
  (norm-wise relative error, and the largest per-row relative error of dW) against
  float64 on the same rounded inputs, and against eager PyTorch on the same dtypes
  (``backend='eager'``: GEMMs in the input dtype, softmax in fp32). ``ok``: finite, and
  no error above eager's plus a small tolerance (the three-way rule of the tests).
  Inputs: random, with ignored rows, peaked rows (``c_y = 1``) and a random upstream
  gradient.
* ``"timing"``: forward and backward time of each mode and of the floor (three plain
  GEMMs of the same shapes) at ``--classes-time``, with the peak memory above the inputs.
* ``"compile"``: ``torch.compile(fullgraph=True)`` of a training step (backbone and
  fused head) with the 'aot_eager' and 'inductor' backends: compile time, and the
  loss and gradients against the uncompiled step.

The shapes (B=1024, D=512, bf16 CosFace; C a multiple of 16) are those of the benchmark
and the GPU tests, so the Triton kernels this compiles are in the JIT cache for them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

DTYPE_NAMES = ("bfloat16", "float16", "float32")
MODES = ("gemm", "recompute", "atomic")
#: the kernel's excess error over same-dtype eager that a correct kernel stays under
#: (bf16: eager rounds the logits to bf16, the kernel keeps them in fp32, so the kernel
#: is usually the more accurate; the tolerance covers the gradient GEMMs' dU rounding)
EXCESS_TOL = {"bfloat16": 2e-3, "float16": 5e-4, "float32:ieee": 1e-5, "float32:tf32": 2e-3}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, default=str), flush=True)


def guarded(check: str, what: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    """Runs one check and emits its line; an exception is a line too (status 'error')."""
    start = time.perf_counter()
    try:
        record = {"check": check, **what, **fn()}
    except Exception as error:  # noqa: BLE001 - report and go on to the next check
        record = {"check": check, **what, "ok": False, "status": "error",
                  "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:400] if str(error) else ''}",
                  "where": traceback.format_exc(limit=-3).strip().splitlines()[-3:]}
    record["wall_s"] = round(time.perf_counter() - start, 3)
    emit(record)


def rel_err(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def max_row_rel_err(a, b) -> float:
    """The largest relative error of one row (a class's dW): what a norm-wise error over
    the whole matrix hides when a few large rows dominate it (e.g. fp16 underflow)."""
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    norms = torch.linalg.vector_norm(b, dim=1)
    live = norms > 1e-3 * norms.max()  # rows with a gradient worth measuring
    err = torch.linalg.vector_norm(a - b, dim=1)[live] / norms[live]
    return float(err.max()) if err.numel() else 0.0


class Smoke:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        import fused_margin as fm
        from fused_margin.backends.triton import BACKEND

        self.torch, self.fm, self.backend = torch, fm, BACKEND
        self.args = args
        self.device = torch.device(args.device)
        self.spec = fm.MarginSpec.cosface()

    # ---- helpers ---------------------------------------------------------------

    def inputs(self, batch: int, classes: int, seed: int):
        torch = self.torch
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, self.args.dim, generator=gen, dtype=torch.float64)
        w = torch.randn(classes, self.args.dim, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, classes, (batch,), generator=gen)
        labels[: min(2, batch)] = torch.tensor([0, classes - 1])[: min(2, batch)]
        x[:2] = 3.0 * w[labels[:2]]  # peaked rows: c_y = 1
        labels[-3:] = -100  # ignored rows
        upstream = torch.randn(batch, generator=gen, dtype=torch.float64)
        return x.to(self.device), w.to(self.device), labels.to(self.device), upstream.to(self.device)

    def loss_and_grads(self, x, w, labels, upstream, backend: str):
        xx = x.detach().clone().requires_grad_(True)
        ww = w.detach().clone().requires_grad_(True)
        loss = self.fm.margin_cross_entropy(xx, ww, labels, self.spec, reduction="none", backend=backend)
        loss.backward(upstream.to(loss.dtype))
        return loss.detach(), xx.grad, ww.grad

    def set_options(self, mode: str | None, precision: str | None) -> None:
        self.backend.backward_mode = mode
        self.backend.input_precision = precision

    # ---- checks ----------------------------------------------------------------

    def correctness(self, dtype_name: str, precision: str | None, mode: str) -> dict[str, Any]:
        torch = self.torch
        dtype = getattr(torch, dtype_name)
        x, w, labels, upstream = self.inputs(self.args.batch, self.args.classes_check, seed=1)
        x, w = x.to(dtype), w.to(dtype)
        ref = self.loss_and_grads(x.double(), w.double(), labels, upstream, "eager")
        previous = torch.get_float32_matmul_precision()
        try:
            # same-dtype eager under the same fp32 GEMM precision as the kernel
            torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
            eager = self.loss_and_grads(x, w, labels, upstream, "eager")
        finally:
            torch.set_float32_matmul_precision(previous)
        self.set_options(mode, precision)
        try:
            mine = self.loss_and_grads(x, w, labels, upstream, "triton")
        finally:
            self.set_options(None, None)
        key = dtype_name if dtype_name != "float32" else f"float32:{precision}"
        tol = EXCESS_TOL[key]
        out: dict[str, Any] = {"tolerance": tol}
        ok = True
        for what, a, e, r in zip(("loss", "dx", "dw"), mine, eager, ref):
            err, err_eager = rel_err(a, r), rel_err(e, r)
            out[f"{what}_err"], out[f"{what}_err_eager"] = err, err_eager
            ok &= math.isfinite(err) and err <= err_eager + tol
        out["dw_row_err"], out["dw_row_err_eager"] = max_row_rel_err(mine[2], ref[2]), max_row_rel_err(eager[2], ref[2])
        ok &= out["dw_row_err"] <= out["dw_row_err_eager"] + 10 * tol
        out["ok"] = bool(ok)
        return out

    def _timeit(self, step: Callable[[], tuple[Any, Any]], repeat: int) -> dict[str, Any]:
        torch = self.torch
        cuda = self.device.type == "cuda"
        for _ in range(self.args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        fwd, bwd = [], []
        def mark(marks: list) -> None:
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks.append(event)
            else:
                marks.append(time.perf_counter())

        for _ in range(repeat):
            marks: list = []
            mark(marks)
            forward, backward = step()
            mark(marks)
            backward(forward)
            mark(marks)
            if cuda:
                torch.cuda.synchronize()
                fwd.append(marks[0].elapsed_time(marks[1]))
                bwd.append(marks[1].elapsed_time(marks[2]))
            else:
                fwd.append((marks[1] - marks[0]) * 1e3)
                bwd.append((marks[2] - marks[1]) * 1e3)
        fwd.sort()
        bwd.sort()
        out = {"fwd_ms": fwd[len(fwd) // 2], "bwd_ms": bwd[len(bwd) // 2], "repeat": repeat}
        out["total_ms"] = out["fwd_ms"] + out["bwd_ms"]
        if cuda:
            out["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return out

    def timing(self, mode: str) -> dict[str, Any]:
        torch = self.torch
        dtype = getattr(torch, self.args.dtype)
        batch, classes, dim = self.args.batch, self.args.classes_time, self.args.dim
        gen = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(batch, dim, device=self.device, generator=gen).to(dtype).requires_grad_(True)
        w = (torch.randn(classes, dim, device=self.device, generator=gen) * 0.01).to(dtype).requires_grad_(True)
        labels = torch.randint(0, classes, (batch,), device=self.device, generator=gen)
        flops = 6 * batch * classes * dim
        if mode == "floor":
            grad_logits = torch.randn(batch, classes, device=self.device, dtype=dtype)

            def step():
                x.grad = w.grad = None
                with torch.no_grad():
                    torch.mm(x, w.T)
                return None, lambda _: (torch.mm(grad_logits, w.detach()), torch.mm(grad_logits.T, x.detach()))

            out = self._timeit(step, self.args.repeat)
            out.pop("peak_extra_mib", None)
        else:
            self.set_options(mode, None)

            def step():
                x.grad = w.grad = None
                loss = self.fm.margin_cross_entropy(x, w, labels, self.spec, backend="triton")
                return loss, lambda out: out.backward()

            try:
                out = self._timeit(step, self.args.repeat)
            finally:
                self.set_options(None, None)
        out["useful_tflops"] = flops / (out["total_ms"] * 1e-3) / 1e12
        out["ok"] = math.isfinite(out["total_ms"])
        return out

    def compile_step(self, compiler: str) -> dict[str, Any]:
        torch = self.torch
        torch._dynamo.reset()
        batch, classes, dim = self.args.batch, self.args.classes_check, self.args.dim
        gen = torch.Generator().manual_seed(3)
        backbone = torch.nn.Linear(dim, dim).to(self.device)
        head = self.fm.CosFaceLoss(classes, dim, backend="triton", device=self.device)
        inputs = torch.randn(batch, dim, generator=gen).to(self.device)
        labels = torch.randint(0, classes, (batch,), generator=gen).to(self.device)
        labels[-3:] = -100
        params = [*backbone.parameters(), *head.parameters()]

        def forward(a, b):
            return head(backbone(a), b)

        def step(fn):
            for p in params:
                p.grad = None
            loss = fn(inputs, labels)
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in params]

        eager_loss, eager_grads = step(forward)
        compiled = torch.compile(forward, fullgraph=True, backend=compiler)
        start = time.perf_counter()
        loss, grads = step(compiled)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        out = {"compile_s": round(compile_s, 2), "loss_err": rel_err(loss, eager_loss),
               "grad_err": max(rel_err(a, b) for a, b in zip(grads, eager_grads))}
        out["ok"] = bool(out["loss_err"] < 1e-5 and out["grad_err"] < 1e-4)
        return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="small shapes (the CPU rehearsal under the interpreter)")
    p.add_argument("--checks", default="correctness,timing,compile", help="comma-separated subset")
    p.add_argument("--batch", type=int, default=None, help="B (default 1024; --tiny 24)")
    p.add_argument("--dim", type=int, default=None, help="D (default 512; --tiny 32)")
    p.add_argument("--classes-check", type=int, default=None, help="C of the correctness checks (16384; --tiny 200)")
    p.add_argument("--classes-time", type=int, default=None, help="C of the timings (262144; --tiny 512)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="dtype of the timings")
    p.add_argument("--repeat", type=int, default=None, help="timed iterations (default 10; --tiny 2)")
    p.add_argument("--warmup", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (24 if tiny else 1024)
    args.dim = args.dim or (32 if tiny else 512)
    args.classes_check = args.classes_check or (200 if tiny else 16384)
    args.classes_time = args.classes_time or (512 if tiny else 262144)
    args.repeat = args.repeat or (2 if tiny else 10)
    if args.device == "cpu":
        args.warmup = min(args.warmup, 1)
        # Triton reads the variable when it is first imported (here, through fused_margin)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    smoke = Smoke(args)
    torch = smoke.torch
    env = {"check": "env", "torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
           "batch": args.batch, "dim": args.dim, "classes_check": args.classes_check,
           "classes_time": args.classes_time}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    emit(env)
    # Order of value, and of JIT reuse: bf16 values first, then bf16 timings (the same
    # compiled kernels at a larger C), then the other dtypes (new compilations), compile.
    configs = [("bfloat16", None), ("float16", None), ("float32", "ieee"), ("float32", "tf32")]

    def correctness(selected):
        if "correctness" in checks:
            for dtype_name, precision in selected:
                for mode in MODES:
                    guarded("correctness", {"dtype": dtype_name, "precision": precision, "mode": mode},
                            lambda d=dtype_name, p=precision, m=mode: smoke.correctness(d, p, m))

    correctness([c for c in configs if c[0] == args.dtype])
    if "timing" in checks:
        for mode in ("floor", *MODES):
            guarded("timing", {"mode": mode, "dtype": args.dtype, "classes": args.classes_time},
                    lambda m=mode: smoke.timing(m))
    correctness([c for c in configs if c[0] != args.dtype])
    if "compile" in checks:
        for compiler in ("aot_eager", "inductor"):
            guarded("compile", {"compiler": compiler}, lambda c=compiler: smoke.compile_step(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
