"""Smoke test of ``bench/train_digits.py`` (every head on scikit-learn's digits): a short
run of every head trains well above chance with no non-finite step, writes the
documented JSON and both figures; another backend trains the same; bad arguments are
refused by name; docs/benchmarks.md's digits table is the committed JSON's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from bench import train_digits  # noqa: E402 - after the skips

ROOT = Path(__file__).resolve().parents[1]

CHANCE = 1.0 / train_digits.NUM_CLASSES
# Tiny matrices: a second thread only adds synchronization (see test_bench_smoke.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EPOCHS = 3


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_digits")
    cmd = [sys.executable, str(ROOT / "bench" / "train_digits.py"), "--seeds", "1", "--epochs", str(EPOCHS),
           "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = out.glob("train_digits_cpu_*.json")
    return path, json.loads(path.read_text()), proc.stdout


def test_every_head_trains(smoke_run):
    path, data, stdout = smoke_run
    assert data["schema"] == train_digits.SCHEMA and data["kind"] == "train_digits"
    for key in ("date", "device", "versions", "command", "git", "config", "heads", "runs", "load_average"):
        assert key in data, key
    assert data["versions"]["torch"] and data["versions"]["scikit_learn"]
    assert data["config"]["backend"] == "cpu" and data["config"]["seeds"] == [0]
    assert [h["head"] for h in data["heads"]] == list(train_digits.HEADS)
    test_n = data["config"]["test_samples"]
    for head in data["heads"]:
        # after a few epochs every head is far above chance (10%), and no step was NaN or inf
        assert head["test_accuracy"]["mean"] > 5 * CHANCE, head["label"]
        assert head["nonfinite_loss_steps"] == 0 and head["nonfinite_grad_steps"] == 0, head["label"]
        assert sum(head["target_angle_hist"]) == test_n
        assert sum(head["nearest_negative_angle_hist"]) == test_n
        assert 0.0 <= head["angle_gap_median"]["mean"] + head["target_angle_median"]["mean"] <= 180.0
    for entry in data["runs"]:
        [run] = entry["runs"]
        losses = run["epoch_losses"]
        assert len(losses) == EPOCHS and all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0], entry["head"]  # training lowers the loss
    panels = data["embedding_figure"]["heads"]
    assert [p["head"] for p in panels] == list(train_digits.EMBEDDING_HEADS)
    for panel in panels:
        assert len(panel["directions"]) == test_n and len(panel["directions"][0]) == train_digits.FIGURE_DIM
        assert panel["test_accuracy"] > 2 * CHANCE and panel["nonfinite_steps"] == 0, panel["label"]
    for key in ("plot_embeddings", "plot_angles"):
        assert (path.parent / data[key]).stat().st_size > 0
    assert "| CS-Softmax |" in stdout and "| SO-Softmax |" in stdout


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_another_backend_trains_the_same(one_thread):
    """``backend="reference"`` (the eager ground-truth math, here in fp32) and the fused CPU
    backend follow the same training trajectory from the same seed."""
    data = train_digits.load_data(0.25, 0)
    cfg = {"dim": 8, "hidden": 16, "batch": 64, "epochs": 1, "lr": 0.1}
    for head in train_digits.HEADS:
        fused = train_digits.train_one(head, 3, data, cfg, "cpu", torch.device("cpu"))
        reference = train_digits.train_one(head, 3, data, cfg, "reference", torch.device("cpu"))
        # 21 SGD steps apart only by fp32 rounding: measured at most 3e-7 relative. Longer runs
        # drift apart as any training does from rounding alone (NormFace: 2e-4 after 42 steps
        # on two threads, while every step's loss and gradients agree with float64 to 3e-7).
        assert fused["epoch_losses"] == pytest.approx(reference["epoch_losses"], rel=1e-5), head
        assert abs(fused["test_accuracy"] - reference["test_accuracy"]) <= 1.5 / len(data["y_test"]), head


@pytest.mark.parametrize(("argv", "message"), [
    (["--heads", "softmax,bogus"], "--heads: unknown ['bogus']"),
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["--test-size", "1.5"], "--test-size must lie in (0, 1), got 1.5"),
    (["--batch", "5000"], "--batch 5000 exceeds"),
    (["--backend", "nonsense"], "--backend 'nonsense'"),
    (["--device", "nowhere"], "--device 'nowhere'"),
    pytest.param(["--backend", "cuda"], "--backend 'cuda' on cuda: no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
])
def test_bad_arguments_are_refused_by_name(argv, message, tmp_path):
    with pytest.raises(SystemExit) as error:
        train_digits.main([*argv, "--out", str(tmp_path), "--no-progress"])
    assert message in str(error.value)
    assert not list(tmp_path.iterdir())


def test_benchmarks_page_shows_the_committed_digits_results():
    """A digits result is committed, and docs/benchmarks.md shows its table and figure as
    ``bench/report.py`` renders them (the whole block is checked in test_bench_smoke.py)."""
    from bench import report, tables

    runs = report.newest_digits_runs(report.load_results(ROOT / "bench" / "results"))
    assert runs, "no committed bench/results/train_digits_*.json"
    readme = report.block((ROOT / "docs" / "benchmarks.md").read_text(), "results")
    for path, data in runs:
        assert tables.digits_table(data) in readme
        assert data["plot_embeddings"] in readme and data["plot_angles"] in readme
        assert (path.parent / data["plot_embeddings"]).is_file() and (path.parent / data["plot_angles"]).is_file()
