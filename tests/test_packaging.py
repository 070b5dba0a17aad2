"""What a built wheel holds: every module of the package, declared as a package (not picked
up by setuptools as stray data, which it warns about and will stop doing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_build_py_installs_every_module(tmp_path):
    run = subprocess.run(
        [sys.executable, "setup.py", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "is absent from the `packages` configuration" not in run.stderr, run.stderr[-4000:]
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fused_margin").rglob("*.py")}
    sources |= {"fused_margin/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "triton_kernels").glob("*.py")}
    built = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.py")}
    assert sources - built == set()
