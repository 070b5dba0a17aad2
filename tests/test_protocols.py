"""The verification and identification protocols of ``bench/protocols.py``, on scores and
embeddings whose answer is known: TAR at FAR on constructed distributions and against
scikit-learn's ``roc_curve``, every pair of a small set against a brute-force loop,
LFW-style k-fold accuracy on separable and on overlapping pairs, rank-k identification."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.metrics import roc_curve  # noqa: E402 - after the skip

from bench import protocols  # noqa: E402


def _sorted_desc(values: torch.Tensor) -> torch.Tensor:
    return torch.sort(values, descending=True).values


def test_tar_at_far_on_a_constructed_distribution():
    """Impostor scores 0, 1/N, ..., (N-1)/N; at FAR 1% the threshold is the 101st largest
    impostor score, (N-101)/N, so exactly the genuine scores above it are accepted (a
    genuine score equal to it is not)."""
    n = 10_000
    impostor = torch.arange(n, dtype=torch.float64) / n
    genuine = torch.tensor([0.5, 0.9, 0.9899, 0.98995, 0.9995, 1.2], dtype=torch.float64)
    [at_1pc, at_1e3, at_1e5] = protocols.tar_at_far(genuine, _sorted_desc(impostor), n, [1e-2, 1e-3, 1e-5])
    assert at_1pc["threshold"] == (n - 101) / n and at_1pc["tar"] == pytest.approx(3 / 6)
    assert at_1e3["threshold"] == (n - 11) / n and at_1e3["tar"] == pytest.approx(2 / 6)
    # 1e-5 of 10,000 impostor pairs is less than one pair: not measurable
    assert at_1e5["tar"] is None and at_1e5["threshold"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_is_the_roc_curve_point_of_scikit_learn(seed):
    """With ties (scores rounded to a coarse grid) and overlapping distributions: the TAR
    is the largest TPR whose FPR is at most the FAR on scikit-learn's ROC curve, computed
    from only the k+1 largest impostor scores."""
    gen = torch.Generator().manual_seed(seed)
    impostor = torch.round(torch.randn(20_000, generator=gen, dtype=torch.float64) * 20) / 20
    genuine = torch.round((torch.randn(3_000, generator=gen, dtype=torch.float64) + 2.5) * 20) / 20
    fars = [0.3, 1e-2, 1e-3, 2e-4]
    keep = int(max(fars) * impostor.numel()) + 1
    ours = protocols.tar_at_far(genuine, _sorted_desc(impostor)[:keep], impostor.numel(), fars)
    scores = torch.cat([genuine, impostor]).numpy()
    truth = np.r_[np.ones(genuine.numel()), np.zeros(impostor.numel())]
    fpr, tpr, _ = roc_curve(truth, scores)
    for point in ours:
        assert point["tar"] == pytest.approx(tpr[fpr <= point["far"]].max(), abs=1e-12), point


def test_tar_at_far_refuses_too_few_top_scores():
    with pytest.raises(ValueError, match="needs the 11 largest impostor scores, got 5"):
        protocols.tar_at_far(torch.ones(3), torch.ones(5), 1000, [1e-2])
    with pytest.raises(ValueError, match="a FAR must lie in"):
        protocols.tar_at_far(torch.ones(3), torch.ones(5), 1000, [0.0])


@pytest.mark.parametrize("block", [3, 1024])
def test_pair_scores_match_a_loop_over_every_pair(block):
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5])
    groups = torch.tensor([0, 1, 1, 0, 2, 1, 0, 0, 1, 2, 2, 0, 0])
    x = torch.randn(labels.numel(), 4, generator=gen, dtype=torch.float64)
    got = protocols.pair_scores(x, labels, groups, max_far=1.0, block=block)
    unit = x / x.norm(dim=1, keepdim=True)
    for name, cross in (("all", False), ("cross", True)):
        genuine, impostor = [], []
        for i, j in itertools.combinations(range(labels.numel()), 2):
            if cross and groups[i] == groups[j]:
                continue
            (genuine if labels[i] == labels[j] else impostor).append(float(unit[i] @ unit[j]))
        scores = got[name]
        assert scores.num_genuine == len(genuine) and scores.num_impostor == len(impostor)
        assert sorted(scores.genuine.tolist()) == pytest.approx(sorted(genuine), abs=1e-6)
        # max_far=1 keeps every impostor score, descending
        assert scores.impostor_top.tolist() == pytest.approx(sorted(impostor, reverse=True), abs=1e-6)
        assert int(scores.genuine_angle_hist.sum()) == len(genuine)
        assert int(scores.impostor_angle_hist.sum()) == len(impostor)
    assert got["cross"].num_genuine < got["all"].num_genuine


def test_pair_scores_keep_enough_impostors_for_the_smallest_far():
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(300).repeat_interleave(4)
    x = torch.randn(labels.numel(), 8, generator=gen)
    scores = protocols.pair_scores(x, labels, max_far=1e-2, block=97)["all"]
    assert scores.num_impostor == 1200 * 1199 // 2 - 300 * 6
    assert scores.impostor_top.numel() == int(1e-2 * scores.num_impostor) + 1
    unit = torch.nn.functional.normalize(x, dim=1)
    every = unit @ unit.T
    mask = torch.triu(torch.ones_like(every, dtype=torch.bool), 1) & (labels[:, None] != labels[None, :])
    truth = _sorted_desc(every[mask])[:scores.impostor_top.numel()]
    assert torch.allclose(scores.impostor_top, truth, atol=1e-6)
    roc = protocols.roc_points(scores)
    assert roc["far"] == sorted(roc["far"]) and roc["far"][0] == pytest.approx(1 / scores.num_impostor)
    assert all(0.0 <= t <= 1.0 for t in roc["tar"]) and roc["tar"][-1] == 1.0


def test_kfold_accuracy_of_separable_pairs_is_one():
    rng = np.random.default_rng(0)
    genuine = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    scores = np.where(genuine, rng.uniform(0.6, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    folds = rng.permutation(np.arange(600) % 10)
    result = protocols.kfold_accuracy(scores, genuine, folds)
    assert result["folds"] == [1.0] * 10 and result["mean"] == 1.0 and result["std"] == 0.0
    assert all(0.4 < t <= 0.6 for t in result["thresholds"])


def test_kfold_accuracy_of_overlapping_gaussians():
    """Genuine N(+1, 1) against impostor N(-1, 1): the best threshold is 0 and its accuracy
    Phi(1) = 0.8413; 10 folds of 4,000 pairs estimate it within a few standard errors."""
    rng = np.random.default_rng(1)
    genuine = np.r_[np.ones(20_000, bool), np.zeros(20_000, bool)]
    scores = np.where(genuine, 1.0, -1.0) + rng.standard_normal(genuine.size)
    folds = rng.permutation(np.arange(genuine.size) % 10)
    result = protocols.kfold_accuracy(scores, genuine, folds)
    phi_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert result["mean"] == pytest.approx(phi_1, abs=4 * math.sqrt(phi_1 * (1 - phi_1) / genuine.size))
    assert all(abs(t) < 0.1 for t in result["thresholds"])


def test_sample_pairs_follow_the_protocol():
    labels = torch.arange(60).repeat_interleave(5)
    groups = torch.arange(5).repeat(60)
    pairs = protocols.sample_pairs(labels, groups, folds=10, pairs_per_fold=40, seed=3)
    first, second, fold, genuine = pairs["first"], pairs["second"], pairs["fold"], pairs["genuine"]
    lab, grp = labels.numpy(), groups.numpy()
    assert first.size == 400 and genuine.sum() == 200
    assert (lab[first] == lab[second]).tolist() == genuine.tolist()
    assert (grp[first] != grp[second]).all()  # cross-group protocol
    # the folds share no identity
    owner = {}
    for f, a, b in zip(fold, lab[first], lab[second], strict=True):
        for c in (a, b):
            assert owner.setdefault(c, f) == f
    scores = protocols.pair_cosines(torch.nn.functional.one_hot(labels).float(), first, second)
    assert protocols.kfold_accuracy(scores, genuine, fold)["mean"] == 1.0


def test_identification_ranks():
    """Gallery: identities 10..14 at the unit vectors e0..e4. Probe k (identity 10 + k)
    lies nearest e_{k+1} (mod 5), second nearest its own entry: rank 2 for every probe;
    the probes at exactly their own entry have rank 1."""
    gallery = torch.eye(5)
    gallery_labels = torch.arange(10, 15)
    own = torch.eye(5)
    wrong = torch.roll(torch.eye(5), 1, dims=1)
    probes = torch.cat([own, 0.6 * own + 0.8 * wrong])
    probe_labels = torch.cat([gallery_labels, gallery_labels])
    result = protocols.identification(gallery, gallery_labels, probes, probe_labels, ranks=(1, 2), block=3)
    assert result == {"rank_1": 0.5, "rank_2": 1.0}
    with pytest.raises(ValueError, match="distinct"):
        protocols.identification(gallery, torch.tensor([1, 1, 2, 3, 4]), probes, probe_labels)
    with pytest.raises(ValueError, match="gallery entry"):
        protocols.identification(gallery, gallery_labels, probes, probe_labels + 1)
