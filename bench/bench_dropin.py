"""Side by side: the drop-in heads against what they replace, on the same shapes.

* ``arcface_torch (eager)``: InsightFace arcface_torch's computation for one process,
  written out here the way it computes (normalize, linear, clamp, the ArcFace margin in
  place under no_grad, then a cross-entropy whose hand-written backward reuses the
  softmax it saved), against ``fused_margin.insightface.PartialFC_V2`` (a Gloo group of
  one process, the CPU backend);
* ``pytorch-metric-learning ArcFaceLoss`` against ``fused_margin.pml.ArcFaceLoss``.

Every (implementation, class count) runs in a fresh process: forward + backward, the
median and half-range of ``--repeats`` timed runs after one warm-up, and the peak RSS
above the inputs (VmHWM after resetting it, Linux) during the first step. Prints a
markdown table; ``--json`` writes the figures.

    python -m bench.bench_dropin --classes 16384 65536 --json bench/results/dropin_cpu.json   # or bench/bench_dropin.py
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/bench_dropin.py): run it as the module bench.bench_dropin
    from cli import run_as_module  # bench/ is sys.path[0] when a file in it runs

    run_as_module(__file__)

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: the children run from here (``python -m bench.bench_dropin``)
REPO_ROOT = Path(__file__).resolve().parents[1]

IMPLEMENTATIONS = {
    "arcface_torch": "arcface_torch (eager)",
    "insightface": "fused_margin.insightface.PartialFC_V2 [cpu]",
    "pml": "pytorch-metric-learning ArcFaceLoss",
    "fused_pml": "fused_margin.pml.ArcFaceLoss [cpu]",
}


def _arcface_torch_step_factory(num_classes: int, dim: int):
    """arcface_torch's ArcFace head for world size 1 (its collectives are then no-ops)."""
    import torch
    import torch.nn.functional as F

    class _CrossEntropy(torch.autograd.Function):
        # the softmax computed in place in the logits buffer and saved for the backward,
        # loss -mean(log(max(p_y, 1e-30))), gradient (p - onehot) / B
        @staticmethod
        def forward(ctx, logits, labels):
            logits = logits.sub_(logits.max(dim=1, keepdim=True).values).exp_()
            logits.div_(logits.sum(dim=1, keepdim=True))
            p_y = logits.gather(1, labels[:, None])
            ctx.save_for_backward(logits, labels)
            return -p_y.clamp_min(1e-30).log().mean()

        @staticmethod
        def backward(ctx, grad):
            prob, labels = ctx.saved_tensors
            prob[torch.arange(prob.shape[0]), labels] -= 1.0
            return prob.div_(prob.shape[0]).mul_(grad), None

    weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, dim)))
    s, m = 64.0, 0.5

    def step(x, labels):
        logits = F.linear(F.normalize(x), F.normalize(weight)).clamp(-1, 1)
        rows = torch.arange(x.shape[0])
        with torch.no_grad():
            logits[rows, labels] = torch.cos(torch.acos(logits[rows, labels]) + m)
        loss = _CrossEntropy.apply(logits * s, labels)
        loss.backward()
        return loss

    return step, weight


def _worker(impl: str, batch: int, num_classes: int, dim: int, repeats: int, threads: int) -> dict:
    import torch

    from .harness import current_rss_bytes, peak_rss_bytes, release_freed_memory, reset_peak_rss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if impl == "arcface_torch":
        step_fn, weight = _arcface_torch_step_factory(num_classes, dim)
    elif impl == "insightface":
        import torch.distributed as dist

        from fused_margin.insightface import CombinedMarginLoss, PartialFC_V2

        store = f"/tmp/bench_dropin_store_{os.getpid()}"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), dim, num_classes, backend="cpu")
        weight = module.weight

        def step_fn(x, labels):
            loss = module(x, labels)
            loss.backward()
            return loss
    else:
        if impl == "pml":
            from pytorch_metric_learning.losses import ArcFaceLoss
        else:
            from fused_margin.pml import ArcFaceLoss
        kwargs = {} if impl == "pml" else {"backend": "cpu"}
        module = ArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=28.6, scale=64, **kwargs)
        weight = module.W

        def step_fn(x, labels):
            loss = module(x, labels)
            loss.backward()
            return loss

    x = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch,))

    def run() -> float:
        x.grad = None
        weight.grad = None
        start = time.perf_counter()
        loss = step_fn(x, labels)
        elapsed = time.perf_counter() - start
        assert math.isfinite(float(loss))
        return elapsed

    release_freed_memory()
    baseline = current_rss_bytes()
    exact_peak = reset_peak_rss()
    run()  # the warm-up step is the memory step (the gradients' buffers included)
    peak = peak_rss_bytes() - baseline
    times = [run() for _ in range(repeats)]
    return {
        "impl": impl, "classes": num_classes, "batch": batch, "dim": dim,
        "median_ms": 1e3 * statistics.median(times), "half_range_ms": 1e3 * (max(times) - min(times)) / 2,
        "peak_mib": peak / 2**20, "memory_method": "VmHWM reset" if exact_peak else "ru_maxrss (includes start-up)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, *numbers = args.worker
        print(json.dumps(_worker(impl, *(int(v) for v in numbers))))
        return
    rows = []
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    for num_classes in args.classes:
        for impl in args.impls:
            cmd = [sys.executable, "-m", "bench.bench_dropin", "--worker", impl, str(args.batch), str(num_classes), str(args.dim),
                   str(args.repeats), str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO_ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    meta = {
        "started": started, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads, "load_average": [load_before, os.getloadavg()],
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    pairs = {"insightface": "arcface_torch", "fused_pml": "pml"}
    by_key = {(r["impl"], r["classes"]): r for r in rows}
    print(f"B={args.batch}, D={args.dim}, float32, CPU, {args.threads} threads; forward + backward; "
          f"median ±half-range of {args.repeats} runs; peak RSS above the inputs during one step\n")
    print("| C | implementation | fwd+bwd ms | peak MiB | vs the one it replaces |")
    print("|---:|---|---:|---:|---|")
    for r in rows:
        base = by_key.get((pairs.get(r["impl"], ""), r["classes"]))
        versus = ""
        if base is not None:
            versus = (f"{base['median_ms'] / r['median_ms']:.2f}x faster, "
                      f"{base['peak_mib'] / max(r['peak_mib'], 1e-9):.2f}x less memory")
        print(f"| {r['classes']} | {IMPLEMENTATIONS[r['impl']]} | {r['median_ms']:.1f} ±{r['half_range_ms']:.1f} "
              f"| {r['peak_mib']:.0f} | {versus} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
