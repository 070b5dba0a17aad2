"""Every head on real data: scikit-learn's handwritten digits, trained the same way.

    .venv/bin/python bench/train_digits.py                     # every head, 5 seeds, fused CPU backend
    .venv/bin/python bench/train_digits.py --backend reference # the same with another backend
    .venv/bin/python bench/train_digits.py --heads softmax,cs_softmax --seeds 10

The data are the 1,797 8x8 images of ``sklearn.datasets.load_digits`` (they ship with
scikit-learn: nothing is downloaded), split once into stratified train and test sets
(``--test-size``, ``--split-seed``) and standardized with the training set's per-pixel
mean and standard deviation.

One recipe for every head (nothing is tuned per head; every head keeps its defaults,
the papers'): a small MLP embedder (64 -> ``--hidden`` -> ``--dim``: Linear, BatchNorm,
ReLU, Linear, BatchNorm, the last as InsightFace's embedding layer; ``--no-final-bn``
drops it), trained jointly with the head's class weights by SGD (momentum 0.9, weight
decay 5e-4: InsightFace's; ``--lr`` with cosine decay to 0 over ``--epochs``), on
mini-batches of ``--batch`` drawn without replacement each epoch (the remainder dropped). The seed sets the initial weights and the batch order; the split is
the same for every seed and head.

Measured per head and seed, on the test set, after training (embedder in eval mode):

* **test accuracy**: top-1 of the head's own margin-free logits (``head.get_logits``):
  the nearest class weight by cosine for the normalized heads (the maximum over
  sub-centers for Sub-center ArcFace), ``<x, w_j> + b_j`` for the linear Softmax and
  ``<x, w_j>`` for L-Softmax; and the **cosine accuracy** of every head (nearest class
  weight by cosine, for Softmax and L-Softmax too);
* the **angles** between each test embedding and its class weight (``θ_y``) and its
  nearest other class weight (``θ_n``), pooled over seeds as 1° histograms: the margin
  a loss actually opens is the gap ``θ_n − θ_y``;
* every training step's loss and gradients are checked: a non-finite one is counted.

Outputs, under ``--out`` (default ``bench/results/``): a JSON file (device, versions,
date, command, seeds, recipe, every run) and two PNG figures drawn from it: (a) the
test embeddings of a few heads trained at D=3 (the papers draw 2-D or 3-D features; at
D=2 ten classes leave 36° between neighbours, less than the default margins need), first
seed, the same recipe otherwise, as directions on the unit sphere with the class weights;
(b) the angle histograms of every head, from the main runs.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/train_digits.py): run it as the module bench.train_digits
    from cli import run_as_module  # bench/ is sys.path[0] when a file in it runs

    run_as_module(__file__)

import argparse
import datetime as dt
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import tables
from .harness import (
    RESULTS_DIR,
    csv_list,
    device_info,
    device_slug,
    load_average,
    provenance,
    versions,
)

SCHEMA = tables.SCHEMAS["train_digits"]
NUM_CLASSES = 10
#: angle histograms: 1° bins over [0°, 180°]
ANGLE_BINS = 180


def head_factories() -> dict[str, tuple[str, Callable[..., nn.Module]]]:
    import fused_margin as fm

    # Every head with its defaults: only the sizes and the backend are passed.
    return {
        "softmax": ("Softmax", fm.SoftmaxLoss),
        "normface": ("NormFace", fm.NormFaceLoss),
        "cosface": ("CosFace", fm.CosFaceLoss),
        "arcface": ("ArcFace", fm.ArcFaceLoss),
        "combined": ("Combined", fm.CombinedMarginLoss),
        "sphereface": ("SphereFace", fm.SphereFaceLoss),
        "lsoftmax": ("L-Softmax", fm.LSoftmaxLoss),
        "cs_softmax": ("CS-Softmax", fm.CSSoftmaxLoss),
        "so_softmax": ("SO-Softmax", fm.SOSoftmaxLoss),
        "circle": ("Circle", fm.CircleLoss),
        "curricularface": ("CurricularFace", fm.CurricularFaceLoss),
        "subcenter_arcface": ("Sub-center ArcFace", fm.SubCenterArcFaceLoss),
        "adaface": ("AdaFace", fm.AdaFaceLoss),
        "magface": ("MagFace", fm.MagFaceLoss),
    }


HEADS = ("softmax", "normface", "cosface", "arcface", "combined", "sphereface", "lsoftmax", "cs_softmax",
         "so_softmax", "circle", "curricularface", "subcenter_arcface", "adaface", "magface")
#: the heads of figure (a)
EMBEDDING_HEADS = ("softmax", "cosface", "arcface", "cs_softmax", "so_softmax")
#: SGD settings of every run (InsightFace's)
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
#: embedding size of figure (a)'s runs (as the papers draw it)
FIGURE_DIM = 3


def head_label(name: str) -> str:
    return head_factories()[name][0]


class CosineSGD:
    """The recipe's optimizer: SGD (momentum 0.9, weight decay 5e-4: InsightFace's) with
    the learning rate decayed to 0 by a cosine over ``total_steps``; every step checks
    the loss and the gradients and counts the non-finite ones."""

    def __init__(self, params: list[nn.Parameter], lr: float, total_steps: int) -> None:
        self.params = list(params)
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1))))
        self.nonfinite_loss = self.nonfinite_grad = 0

    def step(self, loss: Tensor) -> float:
        """Backward, the checks, the update; the loss as a float."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in self.params if p.grad is not None])
        self.nonfinite_loss += int(not torch.isfinite(loss).item())
        self.nonfinite_grad += int(not torch.isfinite(grads).all().item())
        self.optimizer.step()
        self.schedule.step()
        return loss.item()


# ---------------------------------------------------------------------------------
# Data, embedder, one training run.
# ---------------------------------------------------------------------------------


def load_data(test_size: float, split_seed: int) -> dict[str, Tensor]:
    """The digits, split (stratified) and standardized with the training statistics:
    float32 ``x_train`` (N, 64), ``x_test``, int64 ``y_train``, ``y_test``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=split_seed)
    scaler = StandardScaler().fit(x_train)  # constant pixels keep scale 1
    return {
        "x_train": torch.tensor(scaler.transform(x_train), dtype=torch.float32),
        "x_test": torch.tensor(scaler.transform(x_test), dtype=torch.float32),
        "y_train": torch.tensor(y_train, dtype=torch.int64),
        "y_test": torch.tensor(y_test, dtype=torch.int64),
    }


def make_embedder(dim: int, hidden: int, final_bn: bool = True) -> nn.Sequential:
    # no bias before a BatchNorm, which cancels it
    layers = [nn.Linear(64, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim, bias=not final_bn)]
    return nn.Sequential(*layers, *([nn.BatchNorm1d(dim)] if final_bn else []))


def class_cosines(embeddings: Tensor, head: nn.Module) -> Tensor:
    """(B, C) cosines to the class weights; the maximum over sub-centers."""
    k = getattr(head, "num_subcenters", 1)
    cos = F.normalize(embeddings.double(), dim=1) @ F.normalize(head.weight.double(), dim=1).T
    return cos.view(cos.shape[0], -1, k).amax(dim=2).clamp(-1.0, 1.0)


def _histogram(degrees: Tensor) -> list[int]:
    return torch.histc(degrees, bins=ANGLE_BINS, min=0.0, max=180.0).long().tolist()


def train_one(head_name: str, seed: int, data: dict[str, Tensor], cfg: dict[str, Any], backend: str,
              device: torch.device, keep_embeddings: bool = False) -> dict[str, Any]:
    """Train the embedder and one head; the test measurements of the result (see the
    module docstring). ``keep_embeddings`` adds the (B, D) test embeddings and the
    class weights as tensors (for figure (a); not JSON)."""
    _, factory = head_factories()[head_name]
    torch.manual_seed(seed)
    embedder = make_embedder(cfg["dim"], cfg["hidden"], cfg.get("final_bn", True)).to(device)
    head = factory(NUM_CLASSES, cfg["dim"], backend=backend, device=device)
    x_train, y_train = data["x_train"].to(device), data["y_train"].to(device)
    num_train, batch = x_train.shape[0], cfg["batch"]
    steps_per_epoch = num_train // batch
    total_steps = steps_per_epoch * cfg["epochs"]
    optimizer = CosineSGD([*embedder.parameters(), *head.parameters()], cfg["lr"], total_steps)
    gen = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    started = time.perf_counter()
    embedder.train()
    head.train()
    for _ in range(cfg["epochs"]):
        order = torch.randperm(num_train, generator=gen).to(device)
        losses = []
        for i in range(steps_per_epoch):
            rows = order[i * batch:(i + 1) * batch]
            losses.append(optimizer.step(head(embedder(x_train[rows]), y_train[rows])))
        epoch_losses.append(statistics.fmean(losses))
    train_seconds = time.perf_counter() - started

    embedder.eval()
    head.eval()
    with torch.no_grad():
        x_test, y_test = data["x_test"].to(device), data["y_test"].to(device)
        emb = embedder(x_test)
        logits = head.get_logits(emb)
        cos = class_cosines(emb, head)
        rows = torch.arange(y_test.shape[0], device=device)
        target = torch.rad2deg(torch.acos(cos[rows, y_test]))
        negatives = cos.clone()
        negatives[rows, y_test] = -math.inf
        nearest = torch.rad2deg(torch.acos(negatives.amax(dim=1)))
        result = {
            "seed": seed,
            "test_accuracy": (logits.argmax(dim=1) == y_test).double().mean().item(),
            "cosine_accuracy": (cos.argmax(dim=1) == y_test).double().mean().item(),
            "epoch_losses": [round(v, 6) for v in epoch_losses],
            "nonfinite_loss_steps": optimizer.nonfinite_loss,
            "nonfinite_grad_steps": optimizer.nonfinite_grad,
            "steps": total_steps,
            "train_seconds": round(train_seconds, 3),
            "target_angle_hist": _histogram(target.float().cpu()),
            "nearest_negative_angle_hist": _histogram(nearest.float().cpu()),
            "target_angle_median": target.median().item(),
            "nearest_negative_angle_median": nearest.median().item(),
            "angle_gap_median": (nearest - target).median().item(),
            "embedding_norm_median": emb.norm(dim=1).median().item(),
        }
        if hasattr(head, "lam"):  # SphereFace, L-Softmax: the annealed lambda at the end
            result["final_lambda"] = head.lam
        # the step counter and the running statistics (CurricularFace's t, AdaFace's norms)
        result["head_state"] = {k: v.tolist() for k, v in head.state_dict().items() if k not in ("weight", "bias")}
        if keep_embeddings:
            result["_embeddings"] = emb.detach().cpu().double()
            result["_weights"] = head.weight.detach().cpu().double()
            result["_num_subcenters"] = getattr(head, "num_subcenters", 1)
    return result


def summarize(head_name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float]:
        return tables.summary_stats([r[key] for r in runs])

    # the per-run histograms are pooled here and dropped from the runs (they are most of the file)
    target = [sum(h) for h in zip(*(r.pop("target_angle_hist") for r in runs))]
    nearest = [sum(h) for h in zip(*(r.pop("nearest_negative_angle_hist") for r in runs))]
    lambdas = [r["final_lambda"] for r in runs if "final_lambda" in r]
    return {"head": head_name, "label": head_label(head_name), "seeds": [r["seed"] for r in runs],
            "test_accuracy": stats("test_accuracy"), "cosine_accuracy": stats("cosine_accuracy"),
            "target_angle_median": stats("target_angle_median"),
            "nearest_negative_angle_median": stats("nearest_negative_angle_median"),
            "angle_gap_median": stats("angle_gap_median"),
            "final_train_loss": stats("final_train_loss") if "final_train_loss" in runs[0] else None,
            "nonfinite_loss_steps": sum(r["nonfinite_loss_steps"] for r in runs),
            "nonfinite_grad_steps": sum(r["nonfinite_grad_steps"] for r in runs),
            "train_seconds": sum(r["train_seconds"] for r in runs),
            "final_lambda": statistics.fmean(lambdas) if lambdas else None,
            "target_angle_hist": target, "nearest_negative_angle_hist": nearest}


def embedding_panel(embeddings: Tensor, weights: Tensor, num_subcenters: int) -> dict[str, list]:
    """Unit directions of the (B, 3) test embeddings and of the class weights (the first
    sub-center's), rounded for the JSON."""
    x = F.normalize(embeddings, dim=1)
    w = F.normalize(weights, dim=1)[::num_subcenters]
    return {"directions": [[round(v, 4) for v in p] for p in x.tolist()],
            "class_directions": [[round(v, 4) for v in p] for p in w.tolist()]}


# ---------------------------------------------------------------------------------
# Tables and figures, drawn from the result.
# ---------------------------------------------------------------------------------


def _longitude_latitude(directions: list[list[float]]) -> tuple[list[float], list[float]]:
    """Radians, for a Mollweide map of the unit sphere."""
    lon = [math.atan2(p[1], p[0]) for p in directions]
    lat = [math.asin(max(-1.0, min(1.0, p[2] / math.sqrt(sum(v * v for v in p))))) for p in directions]
    return lon, lat


def plot_embeddings(result: dict[str, Any], path: Path) -> None:
    plt = tables.pyplot()

    figure = result["embedding_figure"]
    y = figure["test_labels"]
    panels = figure["heads"]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = plt.figure(figsize=(4.6 * cols, 3.0 * rows + 0.6))
    cmap = plt.get_cmap("tab10")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1, projection="mollweide")
        lon, lat = _longitude_latitude(panel["directions"])
        ax.scatter(lon, lat, c=[cmap(k) for k in y], s=4, alpha=0.6, linewidths=0)
        w_lon, w_lat = _longitude_latitude(panel["class_directions"])
        ax.scatter(w_lon, w_lat, c=[cmap(k) for k in range(len(w_lon))], marker="X", s=70, edgecolors="black",
                   linewidths=0.8)
        ax.set_title(f"{panel['label']}: test accuracy {panel['test_accuracy'] * 100:.1f}%", fontsize=9)
        ax.set_xticklabels([])
        ax.set_yticklabels([])
        ax.grid(True, linewidth=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=cmap(k), label=str(k)) for k in range(10)]
    fig.legend(handles=handles, loc="lower center", ncol=10, fontsize=8, frameon=False)
    fig.suptitle(f"Test embeddings trained at D={figure['dim']} (seed {figure['seed']}, the same recipe), "
                 "on the unit sphere (Mollweide map); X: class weights", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_angles(result: dict[str, Any], path: Path) -> None:
    heads = result["heads"]
    fig, axes = tables.head_grid(len(heads), min(5, len(heads)), (2.7, 2.1), "angle (°)")
    edges = [180.0 * i / ANGLE_BINS for i in range(ANGLE_BINS)]
    for ax, h in zip(axes, heads, strict=True):
        ax.bar(edges, h["target_angle_hist"], width=1.0, align="edge", color="tab:blue", alpha=0.6, label="θ_y")
        ax.bar(edges, h["nearest_negative_angle_hist"], width=1.0, align="edge", color="tab:red", alpha=0.6,
               label="θ_n")
        ax.set_title(f"{h['label']} (gap {h['angle_gap_median']['mean']:.0f}°)", fontsize=9)
        ax.set_yticks([])
        ax.set_xlim(0, 150)
    axes[0].legend(fontsize=7)
    fig.suptitle("Test images: angle to the own class weight (θ_y) and to the nearest other one (θ_n), "
                 "all seeds; gap: median θ_n − θ_y", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=80)
    tables.pyplot().close(fig)


# ---------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=csv_list, default=["all"], help=f"comma-separated, or 'all': {', '.join(HEADS)}")
    p.add_argument("--backend", default="cpu",
                   help="the heads' backend: cpu (the fused C++ one, default), triton, cuda, reference, eager, auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for the triton and cuda backends)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=32, help="embedding size")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--no-final-bn", dest="final_bn", action="store_false",
                   help="no BatchNorm on the embedding (the embedder ends with its Linear)")
    p.add_argument("--test-size", type=float, default=0.25)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (tiny matrices: a second thread only adds synchronization)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON and PNG files")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--note", default=None, help="a note stored in the result")
    return p


def checked_device(backend: str, device: str | None, dim: int) -> torch.device:
    """The device of ``--device`` (default: cuda for the triton and cuda backends, else
    cpu), once a head of ``backend`` has run a forward there; SystemExit saying why not."""
    import fused_margin as fm

    try:
        where = torch.device(device or ("cuda" if backend in ("cuda", "triton") else "cpu"))
    except RuntimeError as error:
        raise SystemExit(f"--device {device!r}: {error}") from error
    if where.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--backend {backend!r} on {where}: no CUDA device here (torch.cuda.is_available() "
                         "is False); pass --device cpu (for 'triton' with TRITON_INTERPRET=1), or another --backend")
    try:  # a backend that cannot run says why, before any work
        probe = fm.CosFaceLoss(8, dim, backend=backend, device=where)
        probe(torch.randn(4, dim, device=where), torch.arange(4, device=where))
    except (fm.BackendUnavailableError, ValueError, RuntimeError) as error:
        raise SystemExit(f"--backend {backend!r} on {where}: {error}") from error
    return where


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    heads = list(HEADS) if args.heads == ["all"] else args.heads
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise SystemExit(f"--heads: unknown {unknown}; choose from {', '.join(HEADS)}")
    for name, value, low in (("--seeds", args.seeds, 1), ("--epochs", args.epochs, 1), ("--batch", args.batch, 2),
                             ("--dim", args.dim, 2), ("--hidden", args.hidden, 1), ("--threads", args.threads, 1)):
        if value < low:
            raise SystemExit(f"{name} must be at least {low}, got {value}")
    if not 0.0 < args.test_size < 1.0:
        raise SystemExit(f"--test-size must lie in (0, 1), got {args.test_size}")
    device = checked_device(args.backend, args.device, args.dim)
    torch.set_num_threads(args.threads)

    data = load_data(args.test_size, args.split_seed)
    if data["x_train"].shape[0] < args.batch:
        raise SystemExit(f"--batch {args.batch} exceeds the {data['x_train'].shape[0]} training images")
    seeds = list(range(args.seeds))
    cfg = {"dim": args.dim, "hidden": args.hidden, "batch": args.batch, "epochs": args.epochs, "lr": args.lr,
           "final_bn": args.final_bn}

    started = dt.datetime.now(dt.timezone.utc)
    load_start = load_average()
    clock = time.perf_counter()
    summaries, figure_panels, all_runs = [], [], []
    figure_heads = [h for h in EMBEDDING_HEADS if h in heads]
    progress = tqdm(total=len(heads) * len(seeds) + len(figure_heads), desc="train", unit="run", file=sys.stderr,
                    disable=args.no_progress)
    for name in heads:
        runs = []
        for seed in seeds:
            progress.set_postfix_str(f"{name} seed {seed}")
            run = train_one(name, seed, data, cfg, args.backend, device)
            run["final_train_loss"] = run["epoch_losses"][-1]
            runs.append(run)
            progress.update()
        summaries.append(summarize(name, runs))
        all_runs.append({"head": name, "runs": runs})
    # figure (a): the papers' picture, the same recipe at a 3-D embedding
    for name in figure_heads:
        progress.set_postfix_str(f"{name} at D={FIGURE_DIM}")
        run = train_one(name, seeds[0], data, {**cfg, "dim": FIGURE_DIM}, args.backend, device,
                        keep_embeddings=True)
        panel = embedding_panel(run.pop("_embeddings"), run.pop("_weights"), run.pop("_num_subcenters"))
        figure_panels.append({"head": name, "label": head_label(name), "test_accuracy": run["test_accuracy"],
                              "cosine_accuracy": run["cosine_accuracy"],
                              "nonfinite_steps": run["nonfinite_loss_steps"] + run["nonfinite_grad_steps"],
                              **panel})
        progress.update()
    progress.close()
    wall = time.perf_counter() - clock

    dev_info = device_info(device)
    steps = (data["x_train"].shape[0] // args.batch) * args.epochs
    result = {
        "schema": SCHEMA,
        "kind": "train_digits",
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round(wall, 1),
        **provenance(dev_info, {**versions(), "scikit_learn": _sklearn_version()}, load_start),
        "note": args.note,
        "config": {**cfg, "backend": args.backend, "seeds": seeds, "split_seed": args.split_seed,
                   "test_size": args.test_size, "train_samples": int(data["x_train"].shape[0]),
                   "test_samples": int(data["x_test"].shape[0]), "steps": steps, "optimizer": "SGD",
                   "momentum": MOMENTUM, "schedule": "cosine decay to 0 per step", "weight_decay": WEIGHT_DECAY, "threads": args.threads,
                   "embedder": f"Linear(64,{args.hidden})-BN-ReLU-Linear({args.hidden},{args.dim})" + ("-BN" * args.final_bn),
                   "heads": heads, "head_defaults": "every head with its constructor's defaults"},
        "heads": summaries,
        "runs": all_runs,
        "embedding_figure": {"seed": seeds[0], "dim": FIGURE_DIM, "test_labels": data["y_test"].tolist(), "heads": figure_panels},
    }
    result["comparisons"] = tables.comparisons(summaries, "test_accuracy")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_digits_{device_slug(dev_info)}_{started.strftime('%Y%m%d-%H%M%S')}"
    if figure_panels:
        result["plot_embeddings"] = f"{stem}_embeddings.png"
        plot_embeddings(result, args.out / result["plot_embeddings"])
    result["plot_angles"] = f"{stem}_angles.png"
    plot_angles(result, args.out / result["plot_angles"])
    path = args.out / f"{stem}.json"
    path.write_text(compact_json(result))
    print(tables.digits_table(result))
    print(f"wrote {path} ({result['duration_s']} s)")
    return 0


def compact_json(data: Any) -> str:
    """Indented JSON with each list of numbers on one line (the figure's points)."""
    text = json.dumps(data, indent=1)
    number_list = re.compile(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]")
    return number_list.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def _sklearn_version() -> str | None:
    try:
        import sklearn
    except ImportError:
        return None
    return sklearn.__version__


if __name__ == "__main__":
    sys.exit(main())
