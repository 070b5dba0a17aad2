"""Smoke test of the benchmark scripts: both run end to end at tiny sizes (in child
processes, as `make bench` runs them), write JSON of the documented schema, and every
measured loss agrees with the float64 reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
# Tiny shapes: a second thread only adds synchronization, and on a shared machine an
# OpenMP barrier waiting for a busy core costs more than the whole computation.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


BENCH_LOSS_ARGS = (
    "--heads", "cosface", "--classes", "256", "--batch", "8", "--dim", "16", "--backends", "all,-compile,triton:recompute,triton:atomic",
    "--repeat", "2", "--warmup", "1", "--min-time", "0",
)
TRAIN_ARGS = (
    "--head-impls", "eager,insightface,cpu,cpu+optim", "--classes", "256", "--batch", "16", "--dim", "16", "--image-size", "8",
    "--steps", "6", "--warmup-steps", "2", "--acc-window", "4", "--memory-budget-gb", "0", "--verify-identities", "20",
    "--verify-images", "3",
)


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Both scripts, started at once (each is mostly interpreter start-up: on two cores
    running them side by side halves the wall time)."""
    procs = {}
    for script, args in (("bench_loss.py", BENCH_LOSS_ARGS), ("train_facerec.py", TRAIN_ARGS)):
        out = tmp_path_factory.mktemp(script.removesuffix(".py"))
        cmd = [sys.executable, str(ROOT / "bench" / script), "--device", "cpu", "--out", str(out), "--no-progress",
               *args]
        procs[script] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                          cwd=ROOT), out)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _finish(started, script: str) -> tuple[str, Path]:
    proc, out = started[script]
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout, out


def test_bench_loss(started):
    stdout, tmp_path = _finish(started, "bench_loss.py")
    [path] = tmp_path.glob("bench_loss_cpu_*.json")
    assert (tmp_path / path.name.replace(".json", ".png")).stat().st_size > 0
    data = json.loads(path.read_text())
    for key in ("schema", "date", "device", "versions", "command", "git", "config", "flop_model", "rows"):
        assert key in data, key
    assert data["schema"] == "fused_margin.bench_loss/1"
    assert data["versions"]["torch"] and data["versions"]["python"]
    assert data["device"]["type"] == "cpu"
    rows = {row["impl"]: row for row in data["rows"]}
    must_run = ["eager", "pml", "floor", "cpu"]
    if ENV.get("TRITON_INTERPRET") == "1":  # set by conftest.py without a GPU
        must_run += ["triton", "triton:recompute", "triton:atomic"]
    for impl in must_run:
        assert rows[impl]["status"] == "ok", rows[impl]
    for row in data["rows"]:
        # tiny shapes: nothing may fail or run out of memory, only be skipped with a reason
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "skipped":
            assert row["reason"]
        if row["status"] != "ok":
            continue
        for key in ("fwd_ms", "bwd_ms", "total_ms"):
            assert row[key]["median"] > 0 and len(row[key]["samples"]) >= 2
        assert row["peak_extra_bytes"] >= 0
        if row["impl"] != "floor":
            assert row["loss_ok"], row
            assert row["loss_max_rel_err"] <= row["loss_tolerance"]
            # gradients too: dX rows and dW rows (targets and spread) against float64
            assert row["grad_ok"], row
            assert 0 <= row["grad_max_rel_err"] <= row["grad_tolerance"]
    assert rows["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert "| eager PyTorch |" in stdout


def test_bench_loss_time_budget(tmp_path):
    """With its time budget spent the sweep starts no more measurements (the float64
    reference and the floor included), reports them as skipped with the reason, and
    still writes its results."""
    cmd = [sys.executable, str(ROOT / "bench" / "bench_loss.py"), "--device", "cpu", "--out", str(tmp_path),
           "--no-progress", "--heads", "cosface", "--classes", "256", "--batch", "8", "--dim", "16",
           "--backends", "eager,floor", "--time-budget", "0.001", "--repeat", "2", "--warmup", "1", "--min-time", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("bench_loss_cpu_*.json")
    data = json.loads(path.read_text())
    assert data["complete"] and data["interrupted"] is None
    rows = {row["impl"]: row for row in data["rows"]}
    for impl in ("eager", "floor"):
        assert rows[impl]["status"] == "skipped" and "time budget" in rows[impl]["reason"], rows[impl]


def test_train_facerec(started):
    stdout, tmp_path = _finish(started, "train_facerec.py")
    [path] = tmp_path.glob("train_facerec_cpu_*.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "fused_margin.train_facerec/1"
    for key in ("date", "device", "versions", "command", "git", "config", "runs", "agreement"):
        assert key in data, key
    runs = {run["impl"]: run for run in data["runs"]}
    for impl in ("eager", "insightface"):
        run = runs[impl]
        assert run["status"] == "ok", run
        assert run["samples_per_s"] > 0 and run["peak_bytes"] > 0
        assert len(run["losses"]) == 6 and 0.0 <= run["train_accuracy"] <= 1.0
    for run in runs.values():
        # face recognition's metrics on identities never trained on (6 steps: any value, but finite)
        v = run["verification"]
        assert v["identities"] == 20 and v["num_genuine"] == 20 * 3 and v["num_impostor"] == 60 * 59 // 2 - 60
        tar = {p["far"]: p["tar"] for p in v["tar_at_far"]}
        assert tar[1e-4] is None  # 1e-4 of 1,710 impostor pairs is less than one pair
        values = [tar[1e-3], v["kfold"]["mean"], v["identification"]["rank_1"], v["identification"]["rank_5"]]
        assert all(0.0 <= x <= 1.0 for x in values), v
    assert "| TAR@1e-3 |" in stdout
    # Same seed, same initial weights, same first batch: the first losses are one number.
    versus = {row["impl"]: row for row in data["agreement"]}
    assert versus["insightface"]["first_loss_rel_diff"] < 1e-5
    # The head's SGD step inside the backward is the same step: the same losses all along.
    fused, plain = runs["cpu+optim"], runs["cpu"]
    assert fused["status"] == "ok" and plain["status"] == "ok", (fused, plain)
    assert fused["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    assert "SGD in the backward" in stdout
    assert "InsightFace-style eager" in stdout


@pytest.mark.parametrize("oom_above", [None, 600_000])
def test_capacity_search(monkeypatch, oom_above):
    """The capacity search, on a simulated process whose peak memory is linear in C
    (plus noise) and which fails past ``oom_above``: it must return a C that fits and
    lies within 3% of the true capacity (proposals aim 2% low), in a handful of child runs."""
    from bench import train_facerec

    budget, base_bytes, per_class = 2 * 2**30, 700 * 2**20, 3000.0
    truth = int((budget - base_bytes) / per_class)
    if oom_above is not None:
        truth = min(truth, oom_above)
    gen = torch.Generator().manual_seed(0)
    calls = []

    def fake_run_child(script, job, timeout):
        classes = job["classes"]
        calls.append(classes)
        if oom_above is not None and classes > oom_above:
            return {"status": "OOM"}
        noise = float(torch.randn((), generator=gen)) * 2**20
        return {"status": "ok", "peak_bytes": int(base_bytes + per_class * classes + noise)}

    monkeypatch.setattr(train_facerec, "run_child", fake_run_child)
    result = train_facerec.find_capacity(Path("x"), {"classes": 8192}, "eager", budget, 8, 1.0)
    assert result["max_classes"] <= truth
    assert result["max_classes"] >= 0.97 * truth, (result, truth)
    assert len(calls) <= 8 and all(p["peak_bytes"] is None or p["fits"] == (p["peak_bytes"] <= budget)
                                   for p in result["points"])


@pytest.mark.parametrize("page, name", [("docs/benchmarks.md", "results"), ("README.md", "headline")])
def test_generated_results_match_the_committed_json(page, name):
    """docs/benchmarks.md's results and README.md's headline are exactly what
    ``bench/report.py`` renders from the committed ``bench/results/*.json``: no figure in
    them is typed by hand or stale."""
    from bench import report

    results = report.load_results(ROOT / "bench" / "results")
    path, _, make = next(b for b in report.BLOCKS if b[0] == ROOT / page and b[1] == name)
    actual = report.block(path.read_text(), name)
    assert actual == make(results), f"{page} is stale: run `python bench/report.py --write`"


def test_headline_figures_come_from_the_loss_benchmark(tmp_path):
    """The headline quotes the newest loss run's fused and eager medians and their ratio at
    the largest class count both ran; links resolve from the README's folder."""
    from bench import report

    results = report.load_results(ROOT / "bench" / "results")
    runs = report.newest_per_device(results, "bench_loss")
    assert runs, "no committed bench/results/bench_loss_*.json"
    text = report.headline(results)
    for path, data in runs:
        eager = [r for r in data["rows"] if r["impl"] == "eager" and r["status"] == "ok"]
        top = max(r["classes"] for r in eager)
        assert f"C={top:,} classes" in text
        assert f"{next(r for r in eager if r['classes'] == top)['total_ms']['median']:,.0f} ms for eager" in text
        assert f"]({(path.parent / data['plot']).relative_to(ROOT).as_posix()})" in text
    # from another folder the same figure is linked relative to it
    assert "](../bench/results/" in report.headline(results, page_dir=ROOT / "docs")


def test_report_and_tables_import_no_script():
    """``tables.py`` is below every script and ``report.py`` (no import circle): importing
    the report loads no benchmark script."""
    code = ("import sys, bench.report, bench.tables; "
            "print(sorted(m for m in sys.modules if m.startswith('bench.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["['bench.cases',", "'bench.harness',", "'bench.report',", "'bench.tables']"]
