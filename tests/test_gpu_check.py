"""Rehearsal of ``bench/gpu_check.sh`` on the CPU with its stub stages
(``GPU_CHECK_STUB=1``: stand-in test stages, the real ``bench_loss.py`` at tiny sizes)
and a short deadline: a run killed at any point (SIGKILL, as the GPU machine's time
limit does) leaves its logs and the benchmark rows measured so far in ``$OUT``; stages
run under min(their cap, the time left), and those past the deadline are recorded as
skipped; at most 8 files come back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _start(out: Path, deadline: int, stages: str, extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "GPU_CHECK_STUB": "1", "GPU_CHECK_DEADLINE": str(deadline), "GPU_CHECK_STAGES": stages,
           "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    # its own session: the kill below reaches the script and every stage it started
    return subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _stages(out: Path) -> dict[str, dict]:
    return {s["stage"]: s for s in map(json.loads, (out / "stages.jsonl").read_text().splitlines())}


def _measured_rows(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [r for r in data["rows"] if r["status"] == "ok" and r["impl"] != "floor"]


def test_killed_run_leaves_logs_and_rows(tmp_path):
    out = tmp_path / "out"
    proc = _start(out, 120, "install,smoke,gpu-triton,bench-triton")
    live = out / "bench_live.json"
    try:
        start = time.monotonic()
        while not _measured_rows(live):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - start < 150, "no benchmark row measured"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no exit trap runs
        proc.wait()
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert len(files) <= 8, files
    assert "cores:" in (out / "env.txt").read_text()
    stages = _stages(out)
    for name in ("install", "smoke", "gpu-triton"):
        assert stages[name]["status"] == "ok", stages[name]
    assert len((out / "smoke.jsonl").read_text().splitlines()) == 3
    assert "stub test 2 PASSED" in (out / "tests.log").read_text()
    data = json.loads(live.read_text())
    assert data["complete"] is False
    rows = _measured_rows(live)
    assert rows[0]["impl"] == "eager" and rows[0]["total_ms"]["median"] > 0
    assert f"row cosface C={rows[0]['classes']} eager" in (out / "bench.log").read_text()


def test_deadline_bounds_every_stage(tmp_path):
    out = tmp_path / "out"
    deadline = 18
    start = time.monotonic()
    proc = _start(out, deadline, "install,smoke,gpu-cuda,values")
    stdout, _ = proc.communicate(timeout=60)
    wall = time.monotonic() - start
    assert proc.returncode == 0, stdout
    assert wall < deadline + 4, (wall, stdout)
    stages = _stages(out)
    # the never-ending stand-in stage is stopped (SIGINT) within the deadline, and logs
    # what it printed; the stage after it does not start
    cuda = stages["gpu-cuda"]
    assert cuda["status"] == "timeout" and cuda["limit_s"] <= deadline - 5, cuda
    assert "stub test 0 PASSED" in (out / "tests.log").read_text()
    assert stages["values"]["status"] == "skipped" and stages["values"]["reason"] == "deadline"
    assert (out / "bench.tar.gz").exists()
    assert len([p for p in out.iterdir() if not p.name.startswith(".")]) <= 8


#: a sitecustomize that makes the modules named in $BLOCKED_MODULES fail to import, as on
#: a machine without them
_BLOCKER = """
import os, sys

for _name in filter(None, os.environ.get("BLOCKED_MODULES", "").split(",")):
    sys.modules[_name] = None  # import fails, importlib.util.find_spec finds nothing
"""


def test_missing_optional_packages_cost_only_what_uses_them(tmp_path):
    """Without hypothesis and tqdm: the first stage names them, and the benchmark stage
    (--no-progress) still measures."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_BLOCKER)
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path / "site"), str(ROOT), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "out"
    proc = _start(out, 150, "versions,bench-triton",
                  {"BLOCKED_MODULES": "hypothesis,tqdm", "PYTHONPATH": pythonpath})
    stdout, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, stdout
    stages = _stages(out)
    assert stages["versions"]["status"] == "ok", stages  # both are optional
    env = (out / "env.txt").read_text()
    for name in ("hypothesis", "tqdm"):
        assert f"{name}: MISSING" in env, env
    assert "torch: " in env and "torch: MISSING" not in env
    assert stages["bench-triton"]["status"] == "ok", (stages, (out / "bench.log").read_text()[-3000:])
    assert _measured_rows(out / "bench_live.json"), (out / "bench.log").read_text()[-3000:]
