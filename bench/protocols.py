"""The open-set evaluation protocols of face recognition, on embeddings of images never
trained on: verification (genuine and impostor pairs, TAR at a fixed FAR, LFW-style
k-fold pair accuracy) and 1:N identification (rank-k). ``train_glyphs.py`` and
``train_facerec.py`` measure with them.

Scores are cosine similarities of L2-normalized embeddings. A pair is **genuine** when
its two images show the same identity, an **impostor** pair otherwise. A protocol may
restrict the pairs to images of different groups (``groups``: e.g. font styles, as
CFP-FP pairs only frontal with profile faces): both its genuine and its impostor pairs
then join two groups.

**TAR at FAR** (true accept rate at a false accept rate): the threshold ``t`` accepts a
pair whose score exceeds it; the largest TAR whose FAR (the fraction of impostor pairs
accepted) is at most ``far`` is reached with ``t`` the ``(k+1)``-th largest impostor score,
``k = floor(far * impostors)``. This is the point scikit-learn's ``roc_curve`` gives (the
largest TPR with FPR <= far; tested against it), computed from the ``k+1`` largest
impostor scores only, so that every pair of tens of thousands of images can be scored
in blocks without holding all of them. Below ``1 / impostors`` a FAR is not measurable
and is reported as None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: the FARs every verification table reports
FARS = (1e-3, 1e-4, 1e-5, 1e-6)
#: LFW's protocol: 10 folds of 300 genuine and 300 impostor pairs
KFOLD_FOLDS, KFOLD_PAIRS = 10, 600
#: pair-angle histograms: bins of 0.1° over [0°, 180°] (the ROC curve's thresholds at high
#: FAR, and the angle figures, rebinned)
ANGLE_BINS = 1800


@dataclass
class PairScores:
    """The scores of one protocol's pairs (every pair ``i < j`` of the protocol).

    ``genuine``: every genuine score (float32); ``impostor_top``: the largest impostor
    scores, descending (enough for TAR at FAR down to ``max_far``); ``num_genuine`` /
    ``num_impostor``: the pair counts; ``genuine_angle_hist`` / ``impostor_angle_hist``:
    int64 counts of the pairs' angles in :data:`ANGLE_BINS` bins over [0°, 180°].
    """

    genuine: Tensor
    impostor_top: Tensor
    num_genuine: int
    num_impostor: int
    genuine_angle_hist: Tensor
    impostor_angle_hist: Tensor


def _pair_counts(labels: Tensor, groups: Tensor | None) -> tuple[int, int]:
    """(genuine, impostor) pair counts of the protocol, from the class (and group) sizes."""
    n = labels.numel()
    per_class = torch.bincount(labels).double()
    if groups is None:
        total, genuine = n * (n - 1) / 2, float((per_class * (per_class - 1) / 2).sum())
    else:
        per_group = torch.bincount(groups).double()
        total = (n * n - float((per_group**2).sum())) / 2
        # pairs of one class in one group: (class, group) cells
        cell = labels.long() * (int(groups.max()) + 1) + groups.long()
        per_cell = torch.bincount(cell).double()
        genuine = (float((per_class**2).sum()) - float((per_cell**2).sum())) / 2
    return round(genuine), round(total - genuine)


def _angle_hist(cos: Tensor) -> Tensor:
    degrees = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
    return torch.histc(degrees, bins=ANGLE_BINS, min=0.0, max=180.0).to(torch.int64)


def pair_scores(embeddings: Tensor, labels: Tensor, groups: Tensor | None = None, *, max_far: float = FARS[0],
                block: int = 1024) -> dict[str, PairScores]:
    """Every pair of ``embeddings`` (N, D), scored by cosine, in row blocks of ``block``.

    ``labels`` (N,) int: identities. Returns ``{'all': ...}``, and with ``groups`` (N,)
    int also ``{'cross': ...}``: the pairs whose images lie in different groups. Each
    keeps the ``floor(max_far * impostors) + 1`` largest impostor scores.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"embeddings must be (N, D) and labels (N,), got {tuple(embeddings.shape)} and "
                         f"{tuple(labels.shape)}")
    if groups is not None and groups.shape != labels.shape:
        raise ValueError(f"groups must have the shape of labels {tuple(labels.shape)}, got {tuple(groups.shape)}")
    x = F.normalize(embeddings.float(), dim=1)
    labels = labels.to(x.device)
    protocols: dict[str, Tensor | None] = {"all": None}
    if groups is not None:
        protocols["cross"] = groups.to(x.device)
    counts = {name: _pair_counts(labels, g) for name, g in protocols.items()}
    keep = {name: int(max_far * imp) + 1 for name, (_, imp) in counts.items()}
    genuine: dict[str, list[Tensor]] = {name: [] for name in protocols}
    top = {name: x.new_empty(0) for name in protocols}
    gen_hist = {name: torch.zeros(ANGLE_BINS, dtype=torch.int64) for name in protocols}
    imp_hist = {name: torch.zeros(ANGLE_BINS, dtype=torch.int64) for name in protocols}
    n = x.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        scores = x[start:stop] @ x[start:].T  # rows start..stop against columns start..n
        rows = torch.arange(start, stop, device=x.device)[:, None]
        upper = torch.arange(start, n, device=x.device)[None, :] > rows
        same = labels[start:stop, None] == labels[None, start:]
        for name, g in protocols.items():
            pairs = upper if g is None else upper & (g[start:stop, None] != g[None, start:])
            gen = scores[pairs & same]
            genuine[name].append(gen)
            gen_hist[name] += _angle_hist(gen)
            imp = scores[pairs & ~same]
            imp_hist[name] += _angle_hist(imp)
            # only scores above the current k-th largest can enter the top k
            if top[name].numel() >= keep[name]:
                imp = imp[imp > top[name][-1]]
            merged = torch.cat([top[name], imp])
            top[name] = torch.topk(merged, min(keep[name], merged.numel()), sorted=True).values
    out = {}
    for name in protocols:
        num_gen, num_imp = counts[name]
        out[name] = PairScores(genuine=torch.cat(genuine[name]).cpu(), impostor_top=top[name].cpu(),
                               num_genuine=num_gen, num_impostor=num_imp,
                               genuine_angle_hist=gen_hist[name], impostor_angle_hist=imp_hist[name])
    return out


def tar_at_far(genuine: Tensor, impostor_top: Tensor, num_impostor: int,
               fars: Sequence[float] = FARS) -> list[dict[str, float | None]]:
    """TAR at each FAR (see the module's docstring): ``{'far', 'tar', 'threshold'}``, the
    TAR and threshold None where ``far * num_impostor < 1``. ``impostor_top``: the largest
    impostor scores, descending, at least ``floor(far * num_impostor) + 1`` of them (or
    all of them)."""
    out: list[dict[str, float | None]] = []
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise ValueError(f"a FAR must lie in (0, 1], got {far}")
        accepted = math.floor(far * num_impostor * (1 + 1e-12))  # impostors the threshold may accept
        if accepted < 1:
            out.append({"far": far, "tar": None, "threshold": None})
            continue
        if accepted < impostor_top.numel():
            threshold = float(impostor_top[accepted])
        elif impostor_top.numel() == num_impostor:  # every impostor may be accepted
            threshold = -math.inf
        else:
            raise ValueError(f"FAR {far} needs the {accepted + 1} largest impostor scores, got {impostor_top.numel()}")
        tar = float((genuine > threshold).double().mean()) if genuine.numel() else math.nan
        out.append({"far": far, "tar": tar, "threshold": threshold})
    return out


def roc_points(scores: PairScores, points_per_decade: int = 10) -> dict[str, list[float]]:
    """(FAR, TAR) operating points for a ROC plot, about ``points_per_decade`` per decade
    of FAR: exact at the thresholds of a log grid of FARs from ``1 / impostors`` up to what
    ``impostor_top`` covers; above it, at the edges of the angle histograms (a pair is
    accepted when its angle is below the edge), the first edge reaching each grid FAR;
    and (1, 1), where every pair is accepted."""
    num_imp = scores.num_impostor
    if num_imp < 1 or scores.num_genuine < 1:
        return {"far": [], "tar": []}
    covered = max(len(scores.impostor_top) - 1, 0) / num_imp  # the largest FAR of the exact points
    grid = [10 ** (k / points_per_decade) / num_imp
            for k in range(math.ceil(math.log10(num_imp) * points_per_decade) + 1)]
    exact = [(p["far"], p["tar"]) for p in tar_at_far(scores.genuine, scores.impostor_top, num_imp,
                                                      [f for f in grid if f <= covered])]
    imp_cum = (torch.cumsum(scores.impostor_angle_hist, 0).double() / num_imp).numpy()
    gen_cum = (torch.cumsum(scores.genuine_angle_hist, 0).double() / scores.num_genuine).numpy()
    edges = sorted({int(np.searchsorted(imp_cum, f)) for f in grid if covered < f <= 1.0})
    coarse = [(float(imp_cum[e]), float(gen_cum[e])) for e in edges if e < len(imp_cum)]
    merged = sorted({(f, t) for f, t in exact + coarse if t is not None} | {(1.0, 1.0)})  # accepting every pair
    return {"far": [f for f, _ in merged], "tar": [t for _, t in merged]}


def sample_pairs(labels: Tensor, groups: Tensor | None = None, *, folds: int = KFOLD_FOLDS,
                 pairs_per_fold: int = KFOLD_PAIRS,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """LFW-style pairs: the identities split at random into ``folds`` disjoint sets; in
    each, ``pairs_per_fold / 2`` genuine pairs (an identity with two images, then two of
    its images, at random) and as many impostor pairs (two identities, one image of each).
    With ``groups``, both images of every pair lie in different groups. Returns int64
    arrays ``first``, ``second`` (image indices), ``fold``, and bool ``genuine``."""
    if folds < 2 or pairs_per_fold < 2:
        raise ValueError(f"need folds >= 2 and pairs_per_fold >= 2, got {folds} and {pairs_per_fold}")
    rng = np.random.default_rng(seed)
    lab = labels.cpu().numpy()
    grp = groups.cpu().numpy() if groups is not None else np.arange(lab.size)  # every image its own group
    classes = rng.permutation(np.unique(lab))
    members = {c: np.flatnonzero(lab == c) for c in classes}
    pairs: list[tuple[int, int, int, bool]] = []
    for fold, fold_classes in enumerate(np.array_split(classes, folds)):
        # identities with two images in different groups can give genuine pairs
        pairable = [c for c in fold_classes if np.unique(grp[members[c]]).size >= 2]
        if not pairable or len(fold_classes) < 2:
            raise ValueError(f"fold {fold} has {len(pairable)} identities with a genuine pair and "
                             f"{len(fold_classes)} identities: too few for {folds} folds")
        half = pairs_per_fold // 2
        for _ in range(half):
            images = members[pairable[rng.integers(len(pairable))]]
            a = rng.choice(images)
            pairs.append((a, rng.choice(images[grp[images] != grp[a]]), fold, True))
        for _ in range(half):
            for _attempt in range(1000):  # two images of different identities (and groups)
                ca, cb = rng.choice(fold_classes, 2, replace=False)
                a, b = rng.choice(members[ca]), rng.choice(members[cb])
                if grp[a] != grp[b]:
                    break
            else:
                raise ValueError(f"fold {fold}: no impostor pair in different groups found in 1000 draws")
            pairs.append((a, b, fold, False))
    first, second, fold_of, genuine = zip(*pairs, strict=True)
    return {"first": np.asarray(first, dtype=np.int64), "second": np.asarray(second, dtype=np.int64),
            "fold": np.asarray(fold_of, dtype=np.int64), "genuine": np.asarray(genuine, dtype=bool)}


def kfold_accuracy(scores: np.ndarray, genuine: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """LFW-style accuracy: for each fold, the threshold with the best accuracy on the other
    folds, applied to the fold. The candidates are scikit-learn's ``roc_curve``
    thresholds (a pair is accepted when its score is at least the threshold); the best
    one is moved halfway down to the next lower score, the middle of the scores it
    separates, so that a fold's scores just below the other folds' do not fall on the
    wrong side by chance. Returns the mean and the sample standard deviation of the fold
    accuracies, and each fold's accuracy and threshold."""
    from sklearn.metrics import roc_curve

    scores, genuine, folds = np.asarray(scores, dtype=np.float64), np.asarray(genuine, bool), np.asarray(folds)
    accuracies, thresholds = [], []
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        positives, negatives = int(genuine[train].sum()), int((~genuine[train]).sum())
        if positives == 0 or negatives == 0:
            raise ValueError(f"the folds other than {fold} need genuine and impostor pairs, got {positives} and "
                             f"{negatives}")
        fpr, tpr, thr = roc_curve(genuine[train], scores[train], drop_intermediate=False)
        best = int(np.argmax(tpr * positives + (1.0 - fpr) * negatives))
        threshold = float(thr[best] + thr[best + 1]) / 2 if best + 1 < len(thr) else float(thr[best])
        thresholds.append(threshold)
        accuracies.append(float(np.mean((scores[test] >= threshold) == genuine[test])))
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
            "folds": accuracies, "thresholds": thresholds}


def pair_cosines(embeddings: Tensor, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair (first[i], second[i]) of rows of ``embeddings``."""
    x = F.normalize(embeddings.float(), dim=1)
    a, b = torch.as_tensor(first, device=x.device), torch.as_tensor(second, device=x.device)
    return (x[a] * x[b]).sum(dim=1).cpu().double().numpy()


def identification(gallery: Tensor, gallery_labels: Tensor, probes: Tensor, probe_labels: Tensor,
                   ranks: Sequence[int] = (1, 5), block: int = 2048) -> dict[str, float]:
    """1:N identification: each probe's rank is 1 + the number of gallery entries scoring
    strictly higher (cosine) than its own identity's entry. ``gallery_labels`` must be
    distinct and contain every probe label. Returns ``{'rank_1': fraction of probes with
    rank <= 1, ...}``."""
    g_labels = gallery_labels.cpu()
    if torch.unique(g_labels).numel() != g_labels.numel():
        raise ValueError("gallery_labels must be distinct: one gallery entry per identity")
    order = torch.argsort(g_labels)
    where = torch.searchsorted(g_labels[order], probe_labels.cpu())
    where = where.clamp(max=g_labels.numel() - 1)
    if not bool((g_labels[order][where] == probe_labels.cpu()).all()):
        raise ValueError("every probe label must have a gallery entry")
    own = order[where].to(probes.device)
    g = F.normalize(gallery.float(), dim=1)
    p = F.normalize(probes.float(), dim=1)
    found = []
    for start in range(0, p.shape[0], block):
        scores = p[start:start + block] @ g.T
        mine = scores.gather(1, own[start:start + block, None])
        found.append((scores > mine).sum(dim=1) + 1)
    rank = torch.cat(found).cpu()
    return {f"rank_{k}": float((rank <= k).double().mean()) for k in ranks}
