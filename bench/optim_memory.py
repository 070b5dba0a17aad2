"""Peak memory of a head's training step, with the optimizer after the backward (W, its
gradient and the optimizer state) against the optimizer inside the backward
(``fused_margin.optim.apply_optimizer_in_backward``: W and the state only).

Each (optimizer, placement) runs in a fresh process: a CosFace head of ``--classes``
classes and ``--dim`` features (fp32), random embeddings of ``--batch`` rows, ``--steps``
training steps (forward, backward, step); the figure is the process's peak memory
(CPU: VmHWM; GPU: ``torch.cuda.max_memory_allocated``) above what it held before the
head was built.

    python -m bench.optim_memory                       # C = 262144, D = 512, CPU
    python -m bench.optim_memory --json bench/results/optim/optim_memory_cpu.json
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/optim_memory.py): run it as the module bench.optim_memory
    from cli import run_as_module  # bench/ is sys.path[0] when a file in it runs

    run_as_module(__file__)

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import torch

from .harness import (
    command_line,
    current_rss_bytes,
    device_info,
    git_info,
    load_average,
    peak_rss_bytes,
    reset_peak_rss,
    run_child,
    versions,
    worker_main,
    write_json,
)
from .tables import markdown_table

SCHEMA = "fused_margin.optim_memory/1"
#: optimizer name -> (class name in torch.optim, keyword arguments, state tensors per weight)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any], int]] = {
    "sgd": ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, 1),
    "adamw": ("AdamW", {"lr": 1e-3, "weight_decay": 0.05}, 2),
}


def worker_step(job: dict[str, Any]) -> dict[str, Any]:
    import fused_margin as fm
    from fused_margin.optim import apply_optimizer_in_backward

    device = torch.device(job["device"])
    classes, dim, batch = job["classes"], job["dim"], job["batch"]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, dim, device=device, generator=gen)
    labels = torch.randint(0, classes, (batch,), device=device, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        before = current_rss_bytes()
    head = fm.CosFaceLoss(classes, dim, backend=job["backend"]).to(device)
    name, kwargs, _ = OPTIMIZERS[job["optimizer"]]
    cls = getattr(torch.optim, name)
    if job["fused"]:
        optimizer = apply_optimizer_in_backward(cls, [head.weight], kwargs)
    else:
        optimizer = cls(head.parameters(), **kwargs)
    for _ in range(job["steps"]):
        optimizer.zero_grad(set_to_none=True)
        loss = head(x, labels)
        loss.backward()
        optimizer.step()
    finite = bool(torch.isfinite(head.weight).all())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
    return {"status": "ok", "peak_bytes": peak - before, "loss": float(loss.detach()), "weight_finite": finite}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available else cpu")
    p.add_argument("--backend", default="auto", help="the head's backend (default 'auto')")
    p.add_argument("--classes", type=int, default=262144)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--optimizers", default="sgd,adamw", help="comma-separated: " + ", ".join(OPTIMIZERS))
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = dt.datetime.now(dt.timezone.utc)
    weight_bytes = args.classes * args.dim * 4
    rows = []
    for opt in args.optimizers.split(","):
        if opt not in OPTIMIZERS:
            raise SystemExit(f"--optimizers: unknown {opt!r} (known: {', '.join(OPTIMIZERS)})")
        runs = {}
        for fused in (False, True):
            job = {"kind": "step", "device": device, "backend": args.backend, "classes": args.classes,
                   "dim": args.dim, "batch": args.batch, "steps": args.steps, "optimizer": opt, "fused": fused}
            runs["fused" if fused else "plain"] = run_child("bench.optim_memory", job, args.timeout)
        state = OPTIMIZERS[opt][2]
        plain, fused = runs["plain"].get("peak_bytes"), runs["fused"].get("peak_bytes")
        rows.append({
            "optimizer": opt, "plain": runs["plain"], "fused": runs["fused"],
            "model_plain_bytes": (2 + state) * weight_bytes, "model_fused_bytes": (1 + state) * weight_bytes,
            "saved_bytes": None if plain is None or fused is None else plain - fused,
            "saved_over_weight": None if plain is None or fused is None else (plain - fused) / weight_bytes,
        })
    return {
        "schema": SCHEMA, "date": started.isoformat(timespec="seconds"), "device": device_info(torch.device(device)),
        "versions": versions(), "git": git_info(), "load_average": load_average(),
        "command": command_line(),
        "config": {"classes": args.classes, "dim": args.dim, "batch": args.batch, "steps": args.steps,
                   "backend": args.backend, "dtype": "float32", "weight_bytes": weight_bytes},
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    mib = 2**20

    def fmt(value: int | None) -> str:
        return "-" if value is None else f"{value / mib:,.0f}"

    rows = []
    for row in result["rows"]:
        rows.append([
            row["optimizer"], fmt(row["model_plain_bytes"]), fmt(row["plain"].get("peak_bytes")),
            fmt(row["model_fused_bytes"]), fmt(row["fused"].get("peak_bytes")), fmt(row["saved_bytes"]),
            "-" if row["saved_over_weight"] is None else f"{row['saved_over_weight']:.2f}",
        ])
    cfg = result["config"]
    columns = [("optimizer", "left"), ("W + grad + state MiB", "right"), ("measured peak MiB", "right"),
               ("W + state MiB (in backward)", "right"), ("measured peak MiB", "right"), ("saved MiB", "right"),
               ("saved / W", "right")]
    return markdown_table(columns, rows, caption=f"C = {cfg['classes']}, D = {cfg['dim']}, fp32, B = {cfg['batch']}, "
                          f"{result['device'].get('name', '')}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main({"step": worker_step})
        return 0
    result = measure(args)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
