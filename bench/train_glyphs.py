"""Large-class training on real data: printed Chinese characters as identities, font
faces as their photos, measured the way face recognition measures embeddings, on
characters and fonts never trained on.

    .venv/bin/python -m bench.train_glyphs                 # the reference run: 7 heads, 5,000 classes
    .venv/bin/python -m bench.train_glyphs --classes all   # every training character
    .venv/bin/python -m bench.train_glyphs --seeds 3 --heads softmax,cosface,cs_softmax
    make glyphs                                            # the reference run (INSTALL_FONTS=1: fonts first, as root)

**Data** (``glyph_data.py``): the CJK Unified Ideographs (U+4E00-U+9FFF) drawn by every
CJK font face installed (Debian's packages: ``python -m bench.glyph_data
--debian-packages``), duplicate faces and duplicate images removed, rendered once into
the user's cache. The characters with at least ``--min-images`` distinct images are
split at random (``--split-seed``): ``--heldout-chars`` of them are never trained on;
``--classes`` of the rest are the training classes. Whole design families
(``--holdout-families``, by default LXGW WenKai and HanaMin) are never trained on either.

**Training.** One recipe and one seed for every head (every head with its constructor's
defaults): the embedder of ``train_facerec.py`` on one channel (four conv-BN-PReLU
blocks, ``--width`` channels doubling, three strides of 2; BN, linear to ``--dim``, BN),
SGD (momentum 0.9, weight decay 5e-4, ``--lr`` with cosine decay to 0 per step) on
mini-batches of ``--batch`` training images drawn without replacement each epoch, each
image augmented on the fly from a seeded generator: a small random affine map
(rotation, scale, shear, shift), a Gaussian blur of random width and Gaussian pixel
noise of random strength.

**Protocols** (``protocols.py``), after training, the embedder in eval mode:

* closed set: the training characters drawn in the held-out design families,
  classified by cosine to the class weights (at most ``--closed-samples`` images);
* open-set verification on ``--verify-chars`` held-out characters, every image of them
  (every face, held-out families included): every pair scored by cosine; TAR at FAR
  1e-3 .. 1e-6 over all pairs, and on the cross-style protocol (both images of every
  pair in different style families: sans, serif, kai, handwriting); LFW-style 10-fold
  accuracy on 6,000 sampled pairs of each protocol (the same pairs for every head);
* 1:N identification: a gallery of one image (a random face) of every held-out
  character, the verification characters' other images as probes; rank-1 and rank-5.

**Equivalence** (``--compare-head``, ArcFace by default): that head also trains with
``backend='eager'`` from the first seed; its metrics and loss curve against the fused
backend's. **Speed and memory**: samples/s and peak memory of the training step at the
full class count (every training character), fused against eager, each in a fresh
process, on random images (the step's cost does not depend on the pixels).

Runs go to ``--jobs`` worker processes (``--threads`` torch threads each): on a CPU two
single-threaded processes use two cores better than one process with two threads.
Outputs, under ``--out``: a JSON file (device, versions, date, command, load, the data
set, the split, every run) and four PNG figures drawn from it and the cache: ROC curves,
a grid of characters in every face, the pair-angle histograms, the loss curves of the
equivalence.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/train_glyphs.py): run it as the module bench.train_glyphs
    from cli import run_as_module  # bench/ is sys.path[0] when a file in it runs

    run_as_module(__file__)

import argparse
import concurrent.futures
import datetime as dt
import math
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import glyph_data, protocols, tables
from .harness import (
    RESULTS_DIR,
    csv_list,
    current_rss_bytes,
    device_info,
    device_slug,
    git_info,
    load_average,
    peak_rss_bytes,
    provenance,
    run_child,
    sample_stats,
    versions,
    worker_main,
)
from .train_digits import CosineSGD, checked_device, compact_json, head_factories, head_label
from .train_facerec import make_backbone

SCHEMA = tables.SCHEMAS["train_glyphs"]
HEADS = ("softmax", "normface", "cosface", "arcface", "cs_softmax", "so_softmax", "sphereface")
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
#: augmentation: the largest rotation (degrees), relative scale change, shear, shift (pixels),
#: blur sigma (pixels) and pixel-noise standard deviation (of the [0, 1] range)
MAX_ROTATION, MAX_SCALE, MAX_SHEAR, MAX_SHIFT, MAX_BLUR, MAX_NOISE = 8.0, 0.1, 0.15, 2.0, 1.0, 0.1
#: the stored loss curve: the mean loss of every CURVE_EVERY steps, and the first steps' own losses
CURVE_EVERY, FIRST_LOSSES = 20, 10
EVAL_BATCH = 1024
#: the style families, as group ids of the cross-style protocol
LOOKS = ("sans", "serif", "kai", "handwriting", "other")


# ---------------------------------------------------------------------------------
# The split: which images train, which measure.
# ---------------------------------------------------------------------------------


def make_split(glyphs: glyph_data.GlyphSet, *, classes: int | None, heldout_fraction: float,
               holdout_families: list[str], verify_chars: int, closed_samples: int, seed: int) -> dict[str, Any]:
    """Sample indices (into the glyph set) and labels of every part; ``classes`` None:
    every training character. Raises ValueError naming the option that asks too much."""
    rng = np.random.default_rng(seed)
    wanted = [name.lower() for name in holdout_families]
    held_faces = np.array([any(w in face.design.lower() for w in wanted) for face in glyphs.faces])
    if wanted and not held_faces.any():
        designs = sorted({face.design for face in glyphs.faces})
        raise ValueError(f"--holdout-families {','.join(holdout_families)}: no face of these design families; "
                         f"found {designs}")
    if held_faces.all():
        raise ValueError("--holdout-families: every face is held out, none is left to train on")
    num_chars = len(glyphs.codepoints)
    order = rng.permutation(num_chars)
    num_held = round(heldout_fraction * num_chars)
    held_chars, train_chars = order[:num_held], order[num_held:]
    if classes is None:
        classes = len(train_chars)
    if not 2 <= classes <= len(train_chars):
        raise ValueError(f"--classes must lie in [2, {len(train_chars)}] (the training characters), got {classes}")
    if not 2 <= verify_chars <= len(held_chars):
        raise ValueError(f"--verify-chars must lie in [2, {len(held_chars)}] (the held-out characters), got "
                         f"{verify_chars}")
    class_of = np.full(num_chars, -1, dtype=np.int64)
    class_of[train_chars[:classes]] = np.arange(classes)
    char, face = glyphs.sample_char, glyphs.sample_face
    in_classes = class_of[char] >= 0
    train = np.flatnonzero(in_classes & ~held_faces[face])
    closed = np.flatnonzero(in_classes & held_faces[face])
    if closed.size > closed_samples:
        closed = np.sort(rng.choice(closed, closed_samples, replace=False))
    verify_of = np.full(num_chars, -1, dtype=np.int64)
    verify_of[held_chars[:verify_chars]] = np.arange(verify_chars)
    verify = np.flatnonzero(verify_of[char] >= 0)
    # the gallery: one random image of every held-out character
    heldout_samples = np.flatnonzero(np.isin(char, held_chars))
    shuffled = rng.permutation(heldout_samples)
    _, first = np.unique(char[shuffled], return_index=True)
    gallery = np.sort(shuffled[first])
    looks = np.array([LOOKS.index(f.look) for f in glyphs.faces])
    verify_labels = verify_of[char[verify]]
    verify_groups = looks[face[verify]]
    pairs = {"all": protocols.sample_pairs(torch.from_numpy(verify_labels), None, folds=protocols.KFOLD_FOLDS,
                                           pairs_per_fold=protocols.KFOLD_PAIRS, seed=seed),
             "cross": protocols.sample_pairs(torch.from_numpy(verify_labels), torch.from_numpy(verify_groups),
                                             folds=protocols.KFOLD_FOLDS, pairs_per_fold=protocols.KFOLD_PAIRS, seed=seed)}
    return {
        "train": train, "train_labels": class_of[char[train]],
        "closed": closed, "closed_labels": class_of[char[closed]],
        "verify": verify, "verify_labels": verify_labels, "verify_groups": verify_groups,
        "probe": ~np.isin(verify, gallery),
        "gallery": gallery, "gallery_labels": char[gallery],
        "verify_char_ids": char[verify],
        "pairs": pairs,
        "classes": classes, "held_faces": held_faces, "num_heldout_chars": int(num_held),
        "num_train_chars": int(len(train_chars)),
    }


def split_summary(glyphs: glyph_data.GlyphSet, split: dict[str, Any]) -> dict[str, Any]:
    faces = glyphs.faces
    held = [f.name for f, h in zip(faces, split["held_faces"], strict=True) if h]
    groups = split["verify_groups"]
    return {
        "classes": split["classes"], "training_characters_available": split["num_train_chars"],
        "heldout_characters": split["num_heldout_chars"], "train_images": int(split["train"].size),
        "train_faces": int((~split["held_faces"]).sum()), "heldout_faces": held,
        "closed_set_images": int(split["closed"].size),
        "verify_characters": int(split["verify_labels"].max() + 1), "verify_images": int(split["verify"].size),
        "verify_images_per_style": {LOOKS[g]: int((groups == g).sum()) for g in np.unique(groups)},
        "gallery_size": int(split["gallery"].size), "probes": int(split["probe"].sum()),
    }


def split_arrays(glyphs: glyph_data.GlyphSet, split: dict[str, Any]) -> dict[str, np.ndarray]:
    """What a training run needs, as numpy arrays: the images of every part and their labels."""
    arrays = {
        "train_images": glyphs.images(split["train"]), "train_labels": split["train_labels"],
        "closed_images": glyphs.images(split["closed"]), "closed_labels": split["closed_labels"],
        "verify_images": glyphs.images(split["verify"]), "verify_labels": split["verify_labels"],
        "verify_groups": split["verify_groups"], "probe": split["probe"],
        "verify_char_ids": split["verify_char_ids"],
        "gallery_images": glyphs.images(split["gallery"]), "gallery_labels": split["gallery_labels"],
    }
    for name, pairs in split["pairs"].items():
        for key, value in pairs.items():
            arrays[f"pairs_{name}_{key}"] = value
    return arrays


# ---------------------------------------------------------------------------------
# One training run.
# ---------------------------------------------------------------------------------


def _uniform(n: int, gen: torch.Generator, bound: float) -> Tensor:
    return (torch.rand(n, generator=gen) * 2 - 1) * bound


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """(B, S, S) uint8 -> (B, 1, S, S) float32 in about [-1, 1]: a random affine map, a
    Gaussian blur and pixel noise per image (see the module's docstring), from ``gen``."""
    b, size = images.shape[0], images.shape[-1]
    x = images.float().div(255.0).unsqueeze(1)
    angle = torch.deg2rad(_uniform(b, gen, MAX_ROTATION))
    scale = 1.0 + _uniform(b, gen, MAX_SCALE)
    shear = _uniform(b, gen, MAX_SHEAR)
    shift = torch.stack([_uniform(b, gen, 2 * MAX_SHIFT / size), _uniform(b, gen, 2 * MAX_SHIFT / size)], dim=1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotation times shear, over the scale: where each output pixel samples the input
    linear = torch.stack([torch.stack([cos, cos * shear - sin], 1), torch.stack([sin, sin * shear + cos], 1)], 1)
    theta = torch.cat([linear / scale[:, None, None], shift[:, :, None]], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sigma = (torch.rand(b, generator=gen) * MAX_BLUR).clamp_min(1e-3)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    # one separable blur per image: the batch as channels of one grouped convolution
    x = F.conv2d(x.transpose(0, 1), kernel[:, None, None, :], padding=(0, 2), groups=b)
    x = F.conv2d(x, kernel[:, None, :, None], padding=(2, 0), groups=b).transpose(0, 1)
    x = x + torch.randn(x.shape, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) * MAX_NOISE)
    return (x - 0.5) / 0.5


def _to_input(images: np.ndarray | Tensor) -> Tensor:
    """Evaluation images: (B, S, S) uint8 -> (B, 1, S, S) float32, no augmentation."""
    x = torch.as_tensor(images).float().div(255.0).unsqueeze(1)
    return (x - 0.5) / 0.5


@torch.no_grad()
def embed(model: nn.Module, images: np.ndarray, device: torch.device) -> Tensor:
    out = []
    for start in range(0, len(images), EVAL_BATCH):
        x = _to_input(images[start:start + EVAL_BATCH]).to(device).contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def closed_set_accuracy(embeddings: Tensor, labels: Tensor, head: nn.Module) -> float:
    """Top-1 of the cosine to the class weights (the maximum over sub-centers)."""
    k = getattr(head, "num_subcenters", 1)
    weight = F.normalize(head.weight.detach().float().cpu(), dim=1)
    x = F.normalize(embeddings, dim=1)
    hits = 0
    for start in range(0, len(x), EVAL_BATCH):
        cos = x[start:start + EVAL_BATCH] @ weight.T
        predicted = cos.view(cos.shape[0], -1, k).amax(dim=2).argmax(dim=1)
        hits += int((predicted == labels[start:start + EVAL_BATCH]).sum())
    return hits / max(len(x), 1)


def _rebin(hist: Tensor, factor: int) -> list[int]:
    return hist.view(-1, factor).sum(dim=1).tolist()


def evaluate(model: nn.Module, head: nn.Module, data: dict[str, np.ndarray], device: torch.device) -> dict[str, Any]:
    """Every protocol of the module's docstring on the held-out data."""
    model.eval()
    head.eval()
    closed = embed(model, data["closed_images"], device)
    verify = embed(model, data["verify_images"], device)
    gallery = embed(model, data["gallery_images"], device)
    labels = torch.from_numpy(data["verify_labels"])
    scores = protocols.pair_scores(verify, labels, torch.from_numpy(data["verify_groups"]),
                                   max_far=max(protocols.FARS))
    verification, kfold = {}, {}
    for name, pairs in scores.items():
        verification[name] = {
            "num_genuine": pairs.num_genuine, "num_impostor": pairs.num_impostor,
            "tar_at_far": protocols.tar_at_far(pairs.genuine, pairs.impostor_top, pairs.num_impostor),
            "roc": {k: [float(f"{v:.5g}") for v in vals] for k, vals in protocols.roc_points(pairs).items()},
        }
        sampled = {key: data[f"pairs_{name}_{key}"] for key in ("first", "second", "fold", "genuine")}
        cosines = protocols.pair_cosines(verify, sampled["first"], sampled["second"])
        kfold[name] = protocols.kfold_accuracy(cosines, sampled["genuine"], sampled["fold"])
    probe = torch.from_numpy(data["probe"])
    ident = protocols.identification(gallery, torch.from_numpy(data["gallery_labels"]), verify[probe],
                                     torch.from_numpy(data["verify_char_ids"])[probe])
    factor = protocols.ANGLE_BINS // 180  # 1° bins in the result
    return {
        "closed_accuracy": closed_set_accuracy(closed, torch.from_numpy(data["closed_labels"]), head),
        "verification": verification, "kfold": kfold, "identification": ident,
        "angle_hist": {"genuine": _rebin(scores["all"].genuine_angle_hist, factor),
                       "impostor": _rebin(scores["all"].impostor_angle_hist, factor)},
    }


def train_one(job: dict[str, Any], data: dict[str, np.ndarray], on_steps: Callable[[int], None] | None = None
              ) -> dict[str, Any]:
    """Trains the embedder and one head (``job``: head, seed, backend, device and the
    recipe), then :func:`evaluate`. ``on_steps(n)`` after every few steps."""
    _, factory = head_factories()[job["head"]]
    device = torch.device(job["device"])
    torch.manual_seed(job["seed"])
    model = make_backbone(job["dim"], job["image_size"], job["width"], in_channels=1)
    model = model.to(device, memory_format=torch.channels_last)
    head = factory(job["classes"], job["dim"], backend=job["backend"], device=device)
    images = torch.from_numpy(np.ascontiguousarray(data["train_images"]))
    labels = torch.from_numpy(data["train_labels"]).to(device)
    num, batch = images.shape[0], job["batch"]
    steps_per_epoch = num // batch
    total = steps_per_epoch * job["epochs"]
    if steps_per_epoch < 1:
        raise ValueError(f"--batch {batch} exceeds the {num} training images")
    optimizer = CosineSGD([*model.parameters(), *head.parameters()], job["lr"], total)
    order_gen = torch.Generator().manual_seed(job["seed"])
    augment_gen = torch.Generator().manual_seed(job["seed"] + 1_000_003)
    losses: list[float] = []
    model.train()
    head.train()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(job["epochs"]):
        order = torch.randperm(num, generator=order_gen)
        for i in range(steps_per_epoch):
            rows = order[i * batch:(i + 1) * batch]
            x = augment(images[rows], augment_gen).to(device).contiguous(memory_format=torch.channels_last)
            losses.append(optimizer.step(head(model(x), labels[rows.to(device)])))
            if on_steps is not None and len(losses) % 10 == 0:
                on_steps(10)
    if on_steps is not None and len(losses) % 10:
        on_steps(len(losses) % 10)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    started, started_cpu = time.perf_counter(), time.process_time()
    metrics = evaluate(model, head, data, device)
    curve = [float(np.mean(losses[i:i + CURVE_EVERY])) for i in range(0, len(losses), CURVE_EVERY)]
    result = {
        "head": job["head"], "label": head_label(job["head"]), "seed": job["seed"], "backend": job["backend"],
        **metrics,
        "first_loss": losses[0], "first_losses": losses[:FIRST_LOSSES], "final_loss": curve[-1],
        "loss_curve": [round(v, 5) for v in curve],
        "nonfinite_loss_steps": optimizer.nonfinite_loss, "nonfinite_grad_steps": optimizer.nonfinite_grad,
        "steps": total, "train_seconds": round(train_wall, 2), "train_cpu_seconds": round(train_cpu, 2),
        "step_ms": round(1e3 * train_wall / total, 2), "step_cpu_ms": round(1e3 * train_cpu / total, 2),
        "samples_per_s": round(total * batch / train_wall, 1), "eval_seconds": round(time.perf_counter() - started, 2),
        "eval_cpu_seconds": round(time.process_time() - started_cpu, 2),
        "threads": torch.get_num_threads(),
    }
    if hasattr(head, "lam"):  # SphereFace: the annealed lambda at the end
        result["final_lambda"] = head.lam
    return result


# ---------------------------------------------------------------------------------
# Running the jobs: in this process, or in worker processes.
# ---------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_init(data_dir: str, threads: int, progress: Any) -> None:
    torch.set_num_threads(threads)
    _WORKER["data"] = {path.stem: np.load(path) for path in Path(data_dir).glob("*.npy")}
    _WORKER["progress"] = progress


def _worker_run(job: dict[str, Any]) -> dict[str, Any]:
    progress = _WORKER["progress"]
    return train_one(job, _WORKER["data"], lambda n: progress.put(n))


def execute(jobs: list[dict[str, Any]], data: dict[str, np.ndarray], workers: int, threads: int,
            progress: bool) -> list[dict[str, Any]]:
    """Every job's :func:`train_one` result, in the jobs' order; a bar counts the steps."""
    from tqdm import tqdm

    bar = tqdm(total=sum(job["steps"] for job in jobs), desc="train", unit="step", file=sys.stderr,
               disable=not progress)
    try:
        if workers <= 1:
            torch.set_num_threads(threads)
            results = []
            for job in jobs:
                bar.set_postfix_str(f"{job['head']} seed {job['seed']} [{job['backend']}]")
                results.append(train_one(job, data, bar.update))
            return results
        context = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads
        with tempfile.TemporaryDirectory(prefix="glyphs-") as folder:
            for name, array in data.items():
                np.save(Path(folder) / f"{name}.npy", array)
            steps = context.Queue()  # handed to each worker as it starts
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                        initargs=(folder, threads, steps)) as pool:
                futures = [pool.submit(_worker_run, job) for job in jobs]
                pending = set(futures)
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=0.5)
                    while True:
                        try:
                            bar.update(steps.get_nowait())
                        except queue.Empty:
                            break
                    for future in done:
                        future.result()  # a worker's error stops the run here
                return [future.result() for future in futures]
    finally:
        bar.close()


# ---------------------------------------------------------------------------------
# Speed and memory of the training step, fused against eager, in fresh processes.
# ---------------------------------------------------------------------------------


def worker_speed(job: dict[str, Any]) -> dict[str, Any]:
    """``job['steps']`` training steps (after ``job['warmup']``) on random images: step
    times, and the process's resident memory before the first step and at its peak."""
    device = torch.device(job["device"])
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    _, factory = head_factories()[job["head"]]
    model = make_backbone(job["dim"], job["image_size"], job["width"], in_channels=1)
    model = model.to(device, memory_format=torch.channels_last)
    head = factory(job["classes"], job["dim"], backend=job["backend"], device=device)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(0)
    size = job["image_size"]
    images = torch.randint(0, 256, (job["batch"], size, size), generator=gen, dtype=torch.uint8)
    x = _to_input(images).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, job["classes"], (job["batch"],), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = current_rss_bytes()
    step_ms, step_cpu_ms = [], []
    for i in range(job["warmup"] + job["steps"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = head(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= job["warmup"]:
            step_ms.append((time.perf_counter() - start) * 1e3)
            step_cpu_ms.append((time.process_time() - start_cpu) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return {"status": "ok", "step_ms": sample_stats(step_ms), "step_cpu_ms": sample_stats(step_cpu_ms),
            "samples_per_s": job["batch"] * len(step_ms) / (sum(step_ms) * 1e-3),
            "peak_bytes": peak, "before_bytes": before, "step_peak_bytes": peak - before,
            "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
            "VmHWM of a fresh process (before: VmRSS once the model, head and optimizer exist)"}


def speed_comparison(base: dict[str, Any], backends: list[str], timeout: float,
                     rounds: int = 1) -> list[dict[str, Any]]:
    """Each backend's :func:`worker_speed` in a fresh process, in the order A B, then
    B A, ... for ``rounds`` rounds (so that a change of the machine's load between the
    runs weighs on both sides alike)."""
    out = []
    for round_ in range(rounds):
        for backend in backends if round_ % 2 == 0 else backends[::-1]:
            result = run_child("bench.train_glyphs", {**base, "kind": "speed", "backend": backend}, timeout)
            out.append({"backend": backend, **result})
    return out


# ---------------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------------


def run_metrics(run: dict[str, Any]) -> dict[str, float | None]:
    """The flat metrics of one run (the keys of :data:`tables.GLYPH_METRICS`)."""
    out: dict[str, float | None] = {"closed_accuracy": run["closed_accuracy"]}
    for name in ("all", "cross"):
        for point in run["verification"][name]["tar_at_far"]:
            out[f"tar_{name}_{point['far']:.0e}"] = point["tar"]
        out[f"kfold_{name}"] = run["kfold"][name]["mean"]
    out.update(run["identification"])
    return out


def summarize(head: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    metrics = [run_metrics(r) for r in runs]
    summary: dict[str, Any] = {"head": head, "label": head_label(head), "seeds": [r["seed"] for r in runs]}
    for key in metrics[0]:
        values = [m[key] for m in metrics]
        summary[key] = None if any(v is None for v in values) else tables.summary_stats(values)
    summary["nonfinite_steps"] = sum(r["nonfinite_loss_steps"] + r["nonfinite_grad_steps"] for r in runs)
    summary["train_seconds"] = tables.summary_stats([r["train_seconds"] for r in runs])
    summary["train_cpu_seconds"] = tables.summary_stats([r["train_cpu_seconds"] for r in runs])
    summary["step_cpu_ms"] = tables.summary_stats([r["step_cpu_ms"] for r in runs])
    summary["angle_hist"] = {kind: [sum(col) for col in zip(*(r["angle_hist"][kind] for r in runs), strict=True)]
                             for kind in ("genuine", "impostor")}
    return summary


def equivalence(runs: list[dict[str, Any]], summaries: list[dict[str, Any]], head: str) -> dict[str, Any] | None:
    """The head trained with the fused backend and with 'eager' from one seed: each
    metric's difference, against the seed-to-seed standard deviation of the fused runs
    where there are several seeds (two runs differing by noise alone differ by about
    sqrt(2) of it); and the loss curves' largest relative difference."""
    eager = next((r for r in runs if r["head"] == head and r["backend"] == "eager"), None)
    fused = next((r for r in runs if r["head"] == head and r["backend"] != "eager" and eager is not None
                  and r["seed"] == eager["seed"]), None)
    if eager is None or fused is None:
        return None
    summary = next(s for s in summaries if s["head"] == head)
    metrics, reference = run_metrics(fused), run_metrics(eager)
    rows = []
    for key, value in metrics.items():
        other = reference[key]
        if value is None or other is None:
            continue
        std = summary[key]["std"] if len(summary["seeds"]) > 1 else None
        rows.append({"metric": key, "fused": value, "eager": other, "difference": value - other,
                     "seed_std": std, "within_noise": None if std is None else abs(value - other) <= 2 * math.sqrt(2) * std})
    a, b = np.asarray(fused["loss_curve"]), np.asarray(eager["loss_curve"])
    steps = min(len(fused.get("first_losses", [])), len(eager.get("first_losses", [])))
    first_steps = [abs(x - y) / abs(y) for x, y in zip(fused["first_losses"][:steps], eager["first_losses"][:steps],
                                                          strict=True)] if steps else []
    return {"head": head, "label": head_label(head), "seed": eager["seed"], "fused_backend": fused["backend"],
            "metrics": rows, "first_loss_rel_diff": abs(fused["first_loss"] - eager["first_loss"]) / abs(eager["first_loss"]),
            "loss_curve_max_rel_diff": float(np.max(np.abs(a - b) / np.abs(b))),
            "first_steps_loss_rel_diff": first_steps,
            "train_seconds": {"fused": fused["train_seconds"], "eager": eager["train_seconds"]},
            "train_cpu_seconds": {"fused": fused["train_cpu_seconds"], "eager": eager["train_cpu_seconds"]}}


# ---------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------


def save_png(fig: Any, path: Path, colors: int = 128, **savefig: Any) -> None:
    """The figure as a PNG of at most ``colors`` colours (a palette: a third to a sixth of
    the RGBA file's size, for result files kept in the repository); closes it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72, **savefig)
    tables.pyplot().close(fig)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors).save(path, optimize=True)


def plot_roc(result: dict[str, Any], path: Path) -> None:
    plt = tables.pyplot()
    first = result["config"]["seeds"][0]
    runs = [r for r in result["runs"] if r["seed"] == first and r["backend"] == result["config"]["backend"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    titles = {"all": "every pair", "cross": "cross-style pairs"}
    for ax, name in zip(axes, ("all", "cross"), strict=True):
        for run in runs:
            roc = run["verification"][name]["roc"]
            tar = {p["far"]: p["tar"] for p in run["verification"][name]["tar_at_far"]}
            ax.plot(roc["far"], roc["tar"], label=f"{run['label']} ({tar[1e-4]:.3f} at 1e-4)" if tar.get(1e-4)
                    is not None else run["label"], linewidth=1.2)
        for far in protocols.FARS:
            ax.axvline(far, color="grey", linewidth=0.5, linestyle=":")
        v = runs[0]["verification"][name] if runs else {"num_genuine": 0, "num_impostor": 0}
        ax.set_xscale("log")
        ax.set_xlim(left=0.5 / max(v["num_impostor"], 1), right=1.0)
        ax.set_xlabel("FAR (false accept rate)")
        ax.set_title(f"{titles[name]}: {v['num_genuine']:,} genuine, {v['num_impostor']:,} impostor", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("TAR (true accept rate)")
    split = result["split"]
    fig.suptitle(f"Verification on {split['verify_characters']:,} characters never trained on "
                 f"({split['classes']:,} training classes; seed {first})", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def plot_angles(result: dict[str, Any], path: Path) -> None:
    heads = result["heads"]
    fig, axes = tables.head_grid(len(heads), min(4, len(heads)), (2.9, 2.2), "angle between the pair (°)")
    centres = np.arange(180) + 0.5
    for ax, h in zip(axes, heads, strict=True):
        for kind, color in (("genuine", "tab:blue"), ("impostor", "tab:red")):
            counts = np.asarray(h["angle_hist"][kind], dtype=np.float64)
            ax.plot(centres, counts / max(counts.sum(), 1), color=color, label=kind)
        ax.set_title(h["label"], fontsize=9)
        ax.set_yticks([])
        ax.set_xlim(0, 120)
    axes[0].legend(fontsize=7)
    fig.suptitle("Angles of every genuine and impostor pair of the verification characters (each curve sums "
                 "to 1; all seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    save_png(fig, path)


def plot_losses(result: dict[str, Any], path: Path) -> None:
    plt = tables.pyplot()
    same = result["equivalence"]
    runs = [r for r in result["runs"] if r["head"] == same["head"] and r["seed"] == same["seed"]]
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(10, 3.4))
    curves = {}
    for run, style in zip(runs, ("-", "--"), strict=False):
        steps = np.arange(len(run["loss_curve"])) * CURVE_EVERY + CURVE_EVERY / 2
        curves[run["backend"]] = np.asarray(run["loss_curve"])
        ax.plot(steps, run["loss_curve"], style, label=f"backend='{run['backend']}'", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {CURVE_EVERY} steps)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    if len(curves) == 2:
        fused, eager = (curves[b] for b in (same["fused_backend"], "eager"))
        ax_diff.semilogy(steps, np.abs(fused - eager) / np.abs(eager) + 1e-12)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel("|fused - eager| / eager")
    ax_diff.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{same['label']}, seed {same['seed']}: the same training with the fused backend and with eager "
                 "PyTorch", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def plot_fonts(glyphs: glyph_data.GlyphSet, held_faces: np.ndarray, path: Path, columns: int = 12) -> list[int]:
    """A few characters (drawn by the most faces) in every face kept: the data as the
    embedder sees it before augmentation. Returns the code points shown."""
    plt = tables.pyplot()
    drawn = np.stack([row >= 0 for row in glyphs._rows])  # (faces, characters)
    count = drawn.sum(axis=0)
    chosen = np.random.default_rng(0).permutation(np.flatnonzero(count == count.max()))[:columns]
    size = glyphs.size
    mosaic = np.full((len(glyphs.faces) * (size + 2), len(chosen) * (size + 2)), 40, dtype=np.uint8)
    for f in range(len(glyphs.faces)):
        for c, char in enumerate(chosen):
            row = glyphs._rows[f][char]
            if row >= 0:
                mosaic[f * (size + 2):f * (size + 2) + size, c * (size + 2):c * (size + 2) + size] = \
                    glyphs._arrays[f][row]
    height = len(glyphs.faces) * (size + 2) / 72 + 0.6
    fig, ax = plt.subplots(figsize=(len(chosen) * (size + 2) / 72 + 3.4, height))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([f * (size + 2) + size / 2 for f in range(len(glyphs.faces))])
    ax.set_yticklabels([f"{face.name} [{face.look}]" + (" (held out)" if held else "")
                        for face, held in zip(glyphs.faces, held_faces, strict=True)], fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"{len(chosen)} characters in each of the {len(glyphs.faces)} faces ({size}x{size})", fontsize=9)
    save_png(fig, path, bbox_inches="tight")
    return [int(cp) for cp in glyphs.codepoints[chosen]]


# ---------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------


def _classes(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--classes takes a number or 'all', got {text!r}") from error


def build_parser() -> argparse.ArgumentParser:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--heads", type=csv_list, default=list(HEADS),
                   help=f"comma-separated, from {', '.join(head_factories())}")
    p.add_argument("--classes", type=_classes, default=5000, help="training characters, or 'all'")
    p.add_argument("--seeds", type=int, default=1, help="training seeds 0, 1, ... per head")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=128, help="embedding size")
    p.add_argument("--width", type=int, default=16, help="channels of the first conv block")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=32, help="square images, a multiple of 8")
    p.add_argument("--backend", default="cpu", help="the heads' backend: cpu, triton, cuda, reference, eager, auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda for the triton and cuda backends)")
    p.add_argument("--compare-head", default="arcface",
                   help="also train it with backend='eager' (first seed), and time both at the full class count; "
                        "'none' skips both")
    p.add_argument("--speed-steps", type=int, default=20, help="timed steps of the speed comparison (0 skips it)")
    p.add_argument("--charset", choices=sorted(glyph_data.CHARSETS), default="cjk")
    p.add_argument("--font-dir", action="append", default=None,
                   help="scan this directory for fonts instead of asking fontconfig (repeatable)")
    p.add_argument("--holdout-families", type=csv_list, default=["LXGW WenKai", "HanaMin"],
                   help="design families never trained on (substrings of the family name)")
    p.add_argument("--heldout-chars", type=float, default=0.2, help="fraction of the characters never trained on")
    p.add_argument("--verify-chars", type=int, default=500, help="held-out characters of the verification")
    p.add_argument("--closed-samples", type=int, default=5000, help="closed-set images, at most")
    p.add_argument("--min-images", type=int, default=10, help="distinct images a character needs")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(2, cpus), help="worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / jobs)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"rendered glyphs (default {glyph_data.default_cache_dir()})")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the JSON and PNG files")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--note", default=None, help="a note stored in the result")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _check_args(args: argparse.Namespace) -> None:
    known = head_factories()
    unknown = [h for h in args.heads if h not in known]
    if unknown:
        raise SystemExit(f"--heads: unknown {unknown}; choose from {', '.join(known)}")
    if args.compare_head != "none" and args.compare_head not in args.heads:
        raise SystemExit(f"--compare-head {args.compare_head!r} is not among --heads {args.heads} (or pass 'none')")
    for name, value, low in (("--seeds", args.seeds, 1), ("--epochs", args.epochs, 1), ("--batch", args.batch, 2),
                             ("--dim", args.dim, 2), ("--width", args.width, 1), ("--jobs", args.jobs, 1),
                             ("--min-images", args.min_images, 2), ("--closed-samples", args.closed_samples, 1),
                             ("--speed-steps", args.speed_steps, 0)):
        if value < low:
            raise SystemExit(f"{name} must be at least {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    if args.image_size < 8 or args.image_size % 8:
        raise SystemExit(f"--image-size must be a multiple of 8, at least 8, got {args.image_size}")
    if not 0.0 < args.heldout_chars < 1.0:
        raise SystemExit(f"--heldout-chars must lie in (0, 1), got {args.heldout_chars}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main({"speed": worker_speed})
        return 0
    _check_args(args)
    device = checked_device(args.backend, args.device, args.dim)  # before any rendering or training
    jobs = 1 if device.type == "cuda" else args.jobs
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)

    started = dt.datetime.now(dt.timezone.utc)
    load_start, git_start = load_average(), git_info()  # the code that runs: a long run may outlast a commit
    clock, clock_cpu = time.perf_counter(), time.process_time()
    try:
        glyphs = glyph_data.load(args.charset, args.image_size, font_dirs=args.font_dir, cache_dir=args.cache_dir,
                                 min_images=args.min_images, jobs=max(jobs, 1), progress=not args.no_progress)
    except glyph_data.NoFontsError as error:
        raise SystemExit(str(error)) from error
    except ValueError as error:
        raise SystemExit(f"--image-size {args.image_size}: {error}") from error
    try:
        split = make_split(glyphs, classes=args.classes, heldout_fraction=args.heldout_chars,
                           holdout_families=args.holdout_families, verify_chars=args.verify_chars,
                           closed_samples=args.closed_samples, seed=args.split_seed)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    data = split_arrays(glyphs, split)
    data_seconds, data_cpu = time.perf_counter() - clock, time.process_time() - clock_cpu
    steps = (split["train"].size // args.batch) * args.epochs
    if steps < 1:
        raise SystemExit(f"--batch {args.batch} exceeds the {split['train'].size} training images")
    recipe = {"classes": split["classes"], "dim": args.dim, "width": args.width, "image_size": args.image_size,
              "batch": args.batch, "epochs": args.epochs, "lr": args.lr, "device": str(device), "steps": steps}
    seeds = list(range(args.seeds))
    work = [{**recipe, "head": head, "seed": seed, "backend": args.backend} for seed in seeds for head in args.heads]
    if args.compare_head != "none":
        work.append({**recipe, "head": args.compare_head, "seed": seeds[0], "backend": "eager"})
    train_clock = time.perf_counter()
    runs = execute(work, data, jobs, threads, not args.no_progress)
    train_wall = time.perf_counter() - train_clock
    summaries = [summarize(head, [r for r in runs if r["head"] == head and r["backend"] == args.backend])
                 for head in args.heads]

    speed = None
    if args.compare_head != "none" and args.speed_steps > 0:
        full = split["num_train_chars"]
        base = {"device": str(device), "head": args.compare_head, "classes": full, "dim": args.dim,
                "width": args.width, "image_size": args.image_size, "batch": args.batch, "threads": threads,
                "warmup": 3, "steps": args.speed_steps}
        speed = {"classes": full, "head": args.compare_head, "threads": threads, "batch": args.batch,
                 "runs": speed_comparison(base, [args.backend, "eager"], timeout=3600.0, rounds=2),
                 "data": "random uint8 images and labels (the step's cost does not depend on them)"}
    wall = time.perf_counter() - clock

    dev_info = device_info(device)
    dev_info["threads"] = threads
    result = {
        "schema": SCHEMA,
        "kind": "train_glyphs",
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round(wall, 1),
        "timing": {"data_s": round(data_seconds, 1), "data_cpu_s": round(data_cpu, 1),
                   "training_s": round(train_wall, 1), "speed_s": round(wall - train_wall - data_seconds, 1),
                   "runs_cpu_s": round(sum(r["train_cpu_seconds"] + r["eval_cpu_seconds"] for r in runs), 1),
                   "workers": jobs, "threads_per_worker": threads, "cpu_count": os.cpu_count()},
        **provenance(dev_info, {**versions(), "pillow": _version("PIL"), "fonttools": _version("fontTools"),
                                "scikit_learn": _version("sklearn")}, load_start, git_start),
        "note": args.note,
        "config": {**{k: v for k, v in recipe.items() if k != "device"}, "backend": args.backend, "seeds": seeds,
                   "heads": args.heads, "optimizer": "SGD", "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                   "schedule": "cosine decay to 0 per step", "head_defaults": "every head with its constructor's defaults",
                   "embedder": f"train_facerec.make_backbone(dim={args.dim}, width={args.width}, in_channels=1)",
                   "augmentation": {"rotation_deg": MAX_ROTATION, "scale": MAX_SCALE, "shear": MAX_SHEAR,
                                    "shift_px": MAX_SHIFT, "blur_sigma_px": MAX_BLUR, "noise_std": MAX_NOISE},
                   "classes_requested": "all" if args.classes is None else args.classes,
                   "split_seed": args.split_seed, "heldout_chars": args.heldout_chars,
                   "holdout_families": args.holdout_families, "verify_chars": args.verify_chars,
                   "closed_samples": args.closed_samples, "min_images": args.min_images,
                   "folds": protocols.KFOLD_FOLDS, "pairs_per_fold": protocols.KFOLD_PAIRS, "fars": list(protocols.FARS),
                   "compare_head": args.compare_head},
        "data": glyphs.describe(),
        "split": split_summary(glyphs, split),
        "heads": summaries,
        "runs": runs,
        "speed": speed,
    }
    result["equivalence"] = equivalence(runs, summaries, args.compare_head)
    result["comparisons"] = glyph_comparisons(summaries)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_glyphs_{device_slug(dev_info)}_{started.strftime('%Y%m%d-%H%M%S')}"
    result["plot_roc"] = f"{stem}_roc.png"
    plot_roc(result, args.out / result["plot_roc"])
    result["plot_angles"] = f"{stem}_angles.png"
    plot_angles(result, args.out / result["plot_angles"])
    result["plot_fonts"] = f"{stem}_fonts.png"
    result["font_grid_codepoints"] = plot_fonts(glyphs, split["held_faces"], args.out / result["plot_fonts"])
    if result["equivalence"] is not None:
        result["plot_losses"] = f"{stem}_losses.png"
        plot_losses(result, args.out / result["plot_losses"])
    path = args.out / f"{stem}.json"
    path.write_text(compact_json(result))
    print(tables.glyphs_tables(result))
    print(f"wrote {path} ({result['duration_s']} s)")
    return 0


def glyph_comparisons(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every head against Softmax and against CosFace on the headline metrics, with the
    standard error of the difference (only with at least two seeds per head)."""
    if any(len(s["seeds"]) < 2 for s in summaries):
        return []
    return [row for baseline in ("softmax", "cosface") for key in tables.GLYPH_HEADLINE
            for row in tables.comparisons(summaries, key, baseline)]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
