"""End-to-end large-class training, as a face-recognition user runs it.

    .venv/bin/python bench/train_facerec.py                   # CPU default: a few minutes
    .venv/bin/python bench/train_facerec.py --device cuda     # GPU default: 2^20 classes

A small convolutional backbone (four conv layers, BN-FC-BN embedding as in
InsightFace) learns synthetic identities: identity ``k`` has a fixed random centre
image (a seeded random function of ``k``, so a million identities cost no memory) and
every sample is a fresh noisy rendering of it (random shift, contrast, pixel noise),
generated on the fly from a seeded generator, identical for every head. One SGD step
(momentum 0.9, weight decay 5e-4, InsightFace's settings) per batch. The head is
swappable (``--head-impls``):

* ``eager``: this library's head module with ``backend='eager'`` (autograd through
  the materialized (B, C) logits);
* ``insightface``: an eager head written the way InsightFace's ``arcface_torch``
  computes it (normalize, linear, clamp, margin on the target logit via indexing,
  cross-entropy); written here, for ArcFace and CosFace;
* each fused backend of the registry that can run here (discovered at run time);
* ``<backend>+optim`` (e.g. ``cpu+optim``): that backend with the head's SGD step fused
  into the backward (``fused_margin.optim.apply_optimizer_in_backward``): the class
  weights' gradient is never allocated; the backbone keeps its own SGD.

All start from the same weights (same seed) and see the same batches.

Reported per head: samples/s of the training step (forward, backward, SGD; data
generation excluded and reported apart), peak memory of the whole process (CPU: the
VmHWM of a fresh child process; GPU: ``torch.cuda.max_memory_allocated``), the
training accuracy (top-1 of the margin-free logits on each batch before its update,
averaged over the last ``--acc-window`` steps), face recognition's open-set metrics on
``--verify-identities`` identities never trained on (``protocols.py``: TAR at FAR,
LFW-style 10-fold accuracy, rank-1 and rank-5 identification), and the **largest class
count whose training step fits ``--memory-budget-gb``**, found by a search with fresh child
processes: a linear model ``peak(C) = a + b*C`` through the two measured points
nearest the budget proposes the next C (secant steps), each proposal is run for two
training steps in a fresh process, and the answer is the largest C measured to fit.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/train_facerec.py): run it as the module bench.train_facerec
    from cli import run_as_module  # bench/ is sys.path[0] when a file in it runs

    run_as_module(__file__)

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import protocols
from .harness import (
    RESULTS_DIR,
    csv_list,
    default_cpu_memory_limit,
    device_info,
    device_slug,
    is_oom,
    limit_cpu_memory,
    load_average,
    parse_classes,
    peak_rss_bytes,
    provenance,
    run_child,
    sample_stats,
    versions,
    worker_main,
)
from .tables import FUSED_OPTIM, SCHEMAS, facerec_impl_label, facerec_table

SCHEMA = SCHEMAS["train_facerec"]
HEADS = ("arcface", "cosface")


# ---------------------------------------------------------------------------------
# Data, backbone, heads.
# ---------------------------------------------------------------------------------


class IdentityRenderer:
    """Synthetic identities rendered on the fly.

    Identity ``k``'s latent code is ``sqrt(2) * cos(k * omega + phi)`` with random
    frequencies and phases (L of each): a deterministic random-looking function of
    ``k`` (codes of distinct identities are nearly uncorrelated), so no per-identity
    table is stored. The centre image is ``tanh`` of a fixed random linear map of the
    code, smoothed; a sample is the centre shifted by up to 2 pixels, with random
    contrast and Gaussian pixel noise of std ``noise``.
    """

    def __init__(self, image_size: int, noise: float, seed: int, device: torch.device, latent: int = 32) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.omega = (torch.rand(latent, generator=gen, dtype=torch.float64) * 2 * math.pi).to(device)
        self.phi = (torch.rand(latent, generator=gen, dtype=torch.float64) * 2 * math.pi).to(device)
        self.decoder = (torch.randn(latent, 3 * image_size**2, generator=gen) / math.sqrt(latent)).to(device)
        self.image_size = image_size
        self.noise = noise

    def __call__(self, labels: Tensor, gen: torch.Generator) -> Tensor:
        # float64 phases: k * omega reaches 2*pi*10^6, where float32 keeps only ~2 digits
        codes = (math.sqrt(2.0) * torch.cos(labels.double()[:, None] * self.omega + self.phi)).float()
        size = self.image_size
        centre = (codes @ self.decoder).view(-1, 3, size, size)
        centre = torch.tanh(2.0 * F.avg_pool2d(centre, 3, 1, 1))
        shift = torch.randint(-2, 3, (2,), generator=gen, device=labels.device).tolist()
        images = torch.roll(centre, shifts=shift, dims=(2, 3))
        contrast = 1.0 + 0.2 * torch.randn(images.shape[0], 1, 1, 1, generator=gen, device=labels.device)
        return images * contrast + self.noise * torch.randn(images.shape, generator=gen, device=labels.device)


def make_backbone(dim: int, image_size: int, width: int, in_channels: int = 3) -> nn.Sequential:
    """Four 3x3 conv blocks (conv-BN-PReLU; ``width``, 2x, 4x, 4x channels; three with
    stride 2), then InsightFace's embedding layer: BN, flatten, linear, BN. Images are
    (B, ``in_channels``, ``image_size``, ``image_size``), the size a multiple of 8."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)]

    side = image_size // 8
    w = width
    return nn.Sequential(
        *block(in_channels, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 2),
        nn.BatchNorm2d(4 * w), nn.Flatten(), nn.Linear(4 * w * side * side, dim, bias=False), nn.BatchNorm1d(dim),
    )


class InsightFaceStyleHead(nn.Module):
    """An eager margin head computed the way InsightFace's ``arcface_torch`` does it
    (our code): cosines from normalized embeddings and weights by one linear, clamped to
    [-1, 1]; the margin applied to the target entries through indexing; scale; plain
    cross-entropy over the full (B, C) logits.

    ArcFace (``m2 > 0``): the target becomes ``cos(acos(c_y) + m2)`` under ``no_grad``,
    so the gradient is that of ``s * c_y`` (straight-through, as InsightFace does).
    CosFace (``m3 > 0``): ``c_y - m3`` with autograd.
    """

    def __init__(self, num_classes: int, dim: int, scale: float, m2: float, m3: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, 0.0, 0.01)  # as MarginHead and InsightFace
        self.scale, self.m2, self.m3 = scale, m2, m3

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1.0, 1.0)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        rows = torch.arange(labels.shape[0], device=labels.device)
        if self.m2 > 0:
            with torch.no_grad():
                logits[rows, labels] = torch.cos(torch.acos(logits[rows, labels]) + self.m2)
        if self.m3 > 0:
            logits[rows, labels] = logits[rows, labels] - self.m3
        return F.cross_entropy(logits * self.scale, labels), accuracy


def make_head(impl: str, head: str, num_classes: int, dim: int) -> nn.Module:
    import fused_margin as fm

    if impl == "insightface":
        if head == "arcface":
            return InsightFaceStyleHead(num_classes, dim, 64.0, 0.5, 0.0)
        return InsightFaceStyleHead(num_classes, dim, 64.0, 0.0, 0.35)
    impl = impl.removesuffix(FUSED_OPTIM)
    if head == "arcface":
        # straight_through: the gradient InsightFace's ArcFace uses, so all heads compare like for like
        return fm.ArcFaceLoss(num_classes, dim, straight_through=True, backend=impl, return_accuracy=True)
    return fm.CosFaceLoss(num_classes, dim, backend=impl, return_accuracy=True)


# ---------------------------------------------------------------------------------
# The child process: train (or probe memory) with one head.
# ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_train(job: dict[str, Any]) -> dict[str, Any]:
    """``job['steps']`` SGD steps with one head; per-step loss, accuracy, step time, and
    the process's peak memory."""
    device = torch.device(job["device"])
    if device.type == "cpu":
        limit_cpu_memory(job.get("cpu_memory_limit_bytes"))
    classes, batch, dim, impl = job["classes"], job["batch"], job["dim"], job["impl"]
    torch.manual_seed(job["seed"])
    try:
        renderer = IdentityRenderer(job["image_size"], job["noise"], job["seed"], device)
        backbone = make_backbone(dim, job["image_size"], job["width"]).to(device)
        head = make_head(impl, job["head"], classes, dim).to(device)
    except Exception as error:  # noqa: BLE001
        if is_oom(error):
            return {"status": "OOM", "reason": "model does not fit"}
        raise
    backend = impl.removesuffix(FUSED_OPTIM)
    if backend != "eager" and backend != "insightface":
        from fused_margin.backends import get_backend
        from fused_margin.kernel_params import KernelParams

        probe_x = torch.zeros(batch, dim, device=device)
        reasons = get_backend(backend).not_supported_reasons(probe_x, head.weight,
                                                             KernelParams.from_spec(head.spec()))
        if reasons:
            return {"status": "skipped", "reason": "; ".join(reasons)}
    sgd = {"lr": job["lr"], "momentum": 0.9, "weight_decay": 5e-4}
    optimizers = []
    if impl.endswith(FUSED_OPTIM):
        from fused_margin.optim import apply_optimizer_in_backward

        # the head's weight is updated inside the backward: no gradient buffer of C x D
        optimizers.append(apply_optimizer_in_backward(torch.optim.SGD, [head.weight], sgd))
        trained = [*backbone.parameters(), *(p for p in head.parameters() if p is not head.weight)]
    else:
        trained = [*backbone.parameters(), *head.parameters()]
    optimizers.append(torch.optim.SGD(trained, **sgd))
    data_gen = torch.Generator(device=device).manual_seed(job["seed"] + 1)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(job.get("amp")))
    losses, accuracies, step_ms, data_ms = [], [], [], []
    try:
        for _ in range(job["steps"]):
            t0 = time.perf_counter()
            labels = torch.randint(0, classes, (batch,), generator=data_gen, device=device)
            images = renderer(labels, data_gen)
            _sync(device)
            t1 = time.perf_counter()
            with amp:
                embeddings = backbone(images)
            # The head runs in float32 with float32 weights, as InsightFace's does.
            loss, accuracy = head(embeddings.float(), labels)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            _sync(device)
            t2 = time.perf_counter()
            losses.append(round(float(loss.detach()), 5))
            accuracies.append(round(float(accuracy), 5))
            data_ms.append((t1 - t0) * 1e3)
            step_ms.append((t2 - t1) * 1e3)
    except Exception as error:  # noqa: BLE001
        if is_oom(error):
            return {"status": "OOM", "reason": str(error).strip().splitlines()[0][:200]}
        raise
    result: dict[str, Any] = {"status": "ok", "losses": losses, "accuracies": accuracies,
                              "step_ms": step_ms, "data_ms": data_ms}
    if device.type == "cuda":
        result.update(peak_bytes=torch.cuda.max_memory_allocated(device),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(device),
                      memory_method="torch.cuda.max_memory_allocated")
    else:
        result.update(peak_bytes=peak_rss_bytes(), memory_method="VmHWM (peak RSS) of a fresh process")
    if job.get("verify_identities"):  # after the memory is read: the training step's peak only
        with amp:
            result["verification"] = verify_heldout(backbone, renderer, job)
    return result


@torch.no_grad()
def verify_heldout(backbone: nn.Module, renderer: IdentityRenderer, job: dict[str, Any]) -> dict[str, Any]:
    """Face recognition's open-set metrics on identities never trained on: identities
    ``classes .. classes + verify_identities - 1`` (the renderer draws any integer), each
    rendered ``verify_images`` times (every rendering round with its own shift, contrast
    and noise). Every pair: TAR at FAR; LFW-style 10-fold accuracy on sampled pairs; 1:N
    identification with the first round as the gallery and the others as probes."""
    device = next(backbone.parameters()).device
    backbone.eval()
    identities, rounds = job["verify_identities"], job["verify_images"]
    gen = torch.Generator(device=device).manual_seed(job["seed"] + 2)
    ids = torch.arange(job["classes"], job["classes"] + identities, device=device)
    embeddings = torch.cat([backbone(renderer(ids, gen)).float().cpu() for _ in range(rounds)])
    labels = torch.arange(identities).repeat(rounds)
    scores = protocols.pair_scores(embeddings, labels)["all"]
    pairs = protocols.sample_pairs(labels, folds=protocols.KFOLD_FOLDS, pairs_per_fold=protocols.KFOLD_PAIRS,
                                   seed=job["seed"])
    cosines = protocols.pair_cosines(embeddings, pairs["first"], pairs["second"])
    first = torch.arange(identities)
    return {"identities": identities, "images_per_identity": rounds, "num_genuine": scores.num_genuine,
            "num_impostor": scores.num_impostor,
            "tar_at_far": protocols.tar_at_far(scores.genuine, scores.impostor_top, scores.num_impostor),
            "kfold": protocols.kfold_accuracy(cosines, pairs["genuine"], pairs["fold"]),
            "identification": protocols.identification(embeddings[first], labels[first], embeddings[identities:],
                                                       labels[identities:])}


# ---------------------------------------------------------------------------------
# The parent.
# ---------------------------------------------------------------------------------


def _round_classes(value: float) -> int:
    step = 1024 if value >= 16384 else 64
    return max(step, int(value // step) * step)


#: Proposals aim this far below the budget: peak RSS varies by ~1-2% between identical
#: runs, and a proposal that lands just over the budget costs a whole extra probe.
CAPACITY_TARGET = 0.98


def _line_through_nearest(points: list[dict[str, Any]], budget: int) -> dict[str, float] | None:
    """``peak(C) = a + b*C`` through the two measured points nearest the budget, and the
    C where it reaches ``CAPACITY_TARGET * budget``."""
    measured = sorted((p for p in points if p["peak_bytes"] is not None), key=lambda p: abs(p["peak_bytes"] - budget))
    pair = [measured[0]] if measured else []
    pair += [p for p in measured[1:] if p["classes"] != pair[0]["classes"]][:1]
    if len(pair) < 2:
        return None
    (c1, m1), (c2, m2) = ((p["classes"], p["peak_bytes"]) for p in pair)
    slope = (m2 - m1) / (c2 - c1)
    if slope <= 0:
        return None
    intercept = m1 - slope * c1
    return {"intercept_bytes": intercept, "bytes_per_class": slope,
            "predicted_max_classes": int((budget - intercept) / slope),
            "proposal": int((CAPACITY_TARGET * budget - intercept) / slope), "fitted_at": sorted([c1, c2])}


def find_capacity(module: str, base: dict[str, Any], impl: str, budget: int, probes: int,
                  timeout: float) -> dict[str, Any]:
    """Largest C whose training step peaks within ``budget`` bytes.

    Every point is the peak of two training steps in a fresh process (the second step
    has the momentum buffers: steady state). The first two points are 8x apart, so that
    their difference (the per-class bytes) dwarfs the RSS noise; then secant steps on
    the line through the two measured points nearest the budget (aiming 2% below it),
    kept inside the bracket of known fits and misses. The answer is the largest C
    *measured* to fit; the model's own prediction is reported beside it.
    """
    start = base["classes"]
    points: list[dict[str, Any]] = []

    def probe(classes: int) -> None:
        result = run_child(module, {**base, "kind": "train", "impl": impl, "classes": classes, "steps": 2}, timeout)
        peak = result.get("peak_bytes") if result.get("status") == "ok" else None
        points.append({"classes": classes, "peak_bytes": peak, "fits": peak is not None and peak <= budget,
                       "status": result.get("status"), "wall_s": result.get("wall_s")})

    probe(start)
    probe(start * 8 if points[0]["fits"] else max(64, start // 8))
    model = _line_through_nearest(points, budget)
    while len(points) < max(probes, 2):
        lower = max((p["classes"] for p in points if p["fits"]), default=0)
        upper = min((p["classes"] for p in points if not p["fits"]), default=None)
        if model is not None:
            proposal = _round_classes(model["proposal"])
        else:  # no line yet (a point failed to run): bisect, or grow
            proposal = _round_classes((lower + upper) / 2) if upper else _round_classes(2 * lower)
        if upper is not None and not lower < proposal < upper:
            proposal = _round_classes((lower + upper) / 2)
        tight = upper is not None and upper - lower <= max(0.02 * lower, 1024)
        if tight or proposal <= lower or proposal in {p["classes"] for p in points}:
            break
        probe(proposal)
        model = _line_through_nearest(points, budget) or model
    fitting = [p["classes"] for p in points if p["fits"]]
    return {
        "budget_bytes": budget,
        "max_classes": max(fitting) if fitting else None,
        "method": "search with fresh child processes: each point is the peak memory of 2 training steps; secant "
                  "steps on a linear peak(C) model; max_classes is the largest C measured to fit",
        "model": model,
        "points": points,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available else cpu")
    p.add_argument("--head", choices=HEADS, default="arcface")
    p.add_argument("--head-impls", type=csv_list, default=["all"],
                   help="'all' (eager, insightface, every fused backend that can run), names, '-name' to drop")
    p.add_argument("--classes", type=lambda s: parse_classes(s)[0], default=None,
                   help="identities (default CPU 8192, GPU 2^20)")
    p.add_argument("--batch", type=int, default=None, help="default CPU 256, GPU 512")
    p.add_argument("--dim", type=int, default=None, help="embedding size (default CPU 256, GPU 512)")
    p.add_argument("--image-size", type=int, default=32, help="square images, a multiple of 8")
    p.add_argument("--width", type=int, default=None, help="channels of the first conv (default CPU 16, GPU 64)")
    p.add_argument("--steps", type=int, default=None, help="SGD steps (default CPU 100, GPU 300)")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the throughput")
    p.add_argument("--acc-window", type=int, default=20, help="accuracy and loss: mean over the last N steps")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--noise", type=float, default=0.5, help="pixel noise std of the renderings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify-identities", type=int, default=200,
                   help="identities never trained on, for the verification metrics (0 skips them)")
    p.add_argument("--verify-images", type=int, default=10, help="renderings of each verification identity")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast for the backbone (default: on with CUDA)")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="budget for the capacity search (default CPU 2, GPU 90%% of the device); 0 skips it")
    p.add_argument("--capacity-probes", type=int, default=None,
                   help="child runs per head for the capacity search, at least 2 (default CPU 4, GPU 6)")
    p.add_argument("--worker-timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--note", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def summarize(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out = {k: v for k, v in run.items() if k not in ("step_ms", "data_ms")}
    if run.get("status") != "ok":
        return out
    timed = run["step_ms"][args.warmup_steps:] or run["step_ms"]
    out["step_ms"] = sample_stats(timed)
    out["data_ms_median"] = sample_stats(run["data_ms"])["median"]
    out["samples_per_s"] = args.batch * len(timed) / (sum(timed) * 1e-3)
    window = run["accuracies"][-args.acc_window:]
    out["train_accuracy"] = sum(window) / len(window)
    out["train_loss"] = sum(run["losses"][-args.acc_window:]) / len(window)
    return out


def agreement(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each head's final training accuracy against eager's. 'Noise' is the binomial
    standard error of a mean over acc_window batches; agreeing means within 3 combined
    standard errors. It does not cover run-to-run divergence of the trajectories."""
    eager = next((r for r in runs if r["impl"] == "eager" and r["status"] == "ok"), None)
    out = []
    if eager is None:
        return out
    n = args.acc_window * args.batch
    for run in runs:
        if run["impl"] == "eager" or run["status"] != "ok":
            continue
        p = (run["train_accuracy"] + eager["train_accuracy"]) / 2
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        diff = run["train_accuracy"] - eager["train_accuracy"]
        # Same seed: same initial weights and first batch, so the first losses must be
        # one number up to rounding; later steps drift apart as rounding compounds.
        first, first_eager = run["losses"][0], eager["losses"][0]
        out.append({"impl": run["impl"], "versus": "eager", "accuracy": run["train_accuracy"],
                    "accuracy_versus": eager["train_accuracy"], "difference": diff,
                    "standard_error": se, "agrees": abs(diff) <= 3 * math.sqrt(2) * se,
                    "first_loss_rel_diff": abs(first - first_eager) / max(abs(first_eager), 1e-12)})
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main({"train": worker_train})
        return 0
    from tqdm import tqdm

    import fused_margin as fm

    module = "bench.train_facerec"  # what the measuring children run
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    args.classes = args.classes or (2**20 if gpu else 8192)
    args.batch = args.batch or (512 if gpu else 256)
    args.dim = args.dim or (512 if gpu else 256)
    args.steps = args.steps or (300 if gpu else 100)
    args.amp = gpu if args.amp is None else args.amp
    args.width = args.width or (64 if gpu else 16)
    args.capacity_probes = args.capacity_probes if args.capacity_probes is not None else (6 if gpu else 4)
    if args.image_size % 8:
        raise SystemExit("--image-size must be a multiple of 8")
    if args.verify_identities and (args.verify_identities < 2 * protocols.KFOLD_FOLDS or args.verify_images < 2):
        raise SystemExit(f"--verify-identities must be 0 or at least {2 * protocols.KFOLD_FOLDS} (got "
                         f"{args.verify_identities}) and --verify-images at least 2 (got {args.verify_images})")
    if args.memory_budget_gb is None:
        total = torch.cuda.get_device_properties(0).total_memory if gpu else 2 * 2**30
        budget = int(0.9 * total) if gpu else total
    else:
        budget = int(args.memory_budget_gb * 2**30)
    cpu_limit = default_cpu_memory_limit()

    fused = [name for name in fm.available_backends() if name not in ("reference", "eager")]
    impls: list[str] = []
    for token in args.head_impls:
        if token == "all":
            impls += ["eager", "insightface", *fused, *(f"{name}{FUSED_OPTIM}" for name in fused)]
        elif token.startswith("-"):
            impls = [i for i in impls if i != token[1:]]
        else:
            impls.append(token)
    impls = list(dict.fromkeys(impls))
    unknown = [i for i in impls if i.removesuffix(FUSED_OPTIM) not in ("eager", "insightface", "reference", *fused)
               or i in (f"eager{FUSED_OPTIM}", f"insightface{FUSED_OPTIM}")]
    if unknown:
        raise SystemExit(f"--head-impls: unknown {unknown}")

    started = dt.datetime.now(dt.timezone.utc)
    load_start = load_average()
    base = {"device": device, "head": args.head, "classes": args.classes, "batch": args.batch, "dim": args.dim,
            "image_size": args.image_size, "width": args.width, "noise": args.noise, "lr": args.lr,
            "seed": args.seed, "amp": args.amp, "cpu_memory_limit_bytes": cpu_limit}
    runs: list[dict[str, Any]] = []
    progress = tqdm(impls, desc="train", unit="head", file=sys.stderr, disable=args.no_progress)
    for impl in progress:
        progress.set_postfix_str(f"{impl}: {args.steps} steps")
        raw = run_child(module, {**base, "kind": "train", "impl": impl, "steps": args.steps,
                                 "verify_identities": args.verify_identities, "verify_images": args.verify_images},
                        args.worker_timeout)
        run = {"impl": impl, "label": facerec_impl_label(impl), **summarize(raw, args)}
        if run["status"] == "ok" and budget > 0 and args.capacity_probes > 0:
            progress.set_postfix_str(f"{impl}: capacity search")
            # a probe far past the budget fails fast (reported as not fitting) instead of swapping
            guard = min(cpu_limit or budget * 4, max(2 * budget, budget + 2**30))
            run["capacity"] = find_capacity(module, {**base, "cpu_memory_limit_bytes": guard}, impl, budget,
                                            args.capacity_probes, args.worker_timeout)
        runs.append(run)
    progress.close()

    dev_info = device_info(torch.device(device))
    result = {
        "schema": SCHEMA,
        "kind": "train_facerec",
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1),
        **provenance(dev_info, versions(), load_start),
        "note": args.note,
        "config": {"head": args.head, "impls": impls, "classes": args.classes, "batch": args.batch, "dim": args.dim,
                   "image_size": args.image_size, "width": args.width, "steps": args.steps,
                   "warmup_steps": args.warmup_steps,
                   "acc_window": args.acc_window, "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4,
                   "noise": args.noise, "seed": args.seed, "amp": args.amp, "memory_budget_bytes": budget,
                   "capacity_probes": args.capacity_probes, "verify_identities": args.verify_identities,
                   "verify_images": args.verify_images,
                   "throughput": "training step (forward, backward, SGD) only; synthetic data generation excluded",
                   "capacity_method": "search with fresh child processes (see each run's capacity.points)"},
        "runs": runs,
    }
    result["agreement"] = agreement(runs, args)
    print(facerec_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"train_facerec_{device_slug(dev_info)}_{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path} ({result['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
