"""What a user installing the library gets: every module of the package, declared as a
package (not picked up by setuptools as stray data, which it warns about and will stop
doing), and a wheel that installs outside the source tree and computes the loss with
its compiled extension."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


def _source_copy(dest: Path) -> Path:
    """The files git tracks or would track (what a clone or an sdist holds), without build
    outputs, so the wheel is built from sources alone and the checkout is left as it is."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_symlink() or not src.is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    return dest


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_wheel_installs_outside_the_tree(tmp_path):
    # The README's install into an existing PyTorch environment: `pip wheel` / `pip install`
    # without build isolation (isolation would fetch a second torch to build against).
    src = _source_copy(tmp_path / "src")
    dist, site = tmp_path / "dist", tmp_path / "site"
    env = {**os.environ, "MAX_JOBS": "2"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=1200, env=env,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-4000:]
    wheels = list(dist.glob("fused_margin-*.whl"))
    assert len(wheels) == 1, wheels
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheels[0])],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-4000:]

    # Run from outside the source tree with the installed copy first on the path: the
    # package, its kernels' package and the compiled extension must all come from there.
    probe = textwrap.dedent(
        """
        import sys, torch
        import fused_margin, fused_margin._C, fused_margin.triton_kernels
        site = sys.argv[1]
        for module in (fused_margin, fused_margin._C, fused_margin.triton_kernels):
            assert module.__file__.startswith(site), module.__file__
        torch.manual_seed(0)
        x = torch.randn(7, 5, dtype=torch.float64)
        y = torch.randint(0, 11, (7,))
        y[2] = -100
        head = fused_margin.CosFaceLoss(11, 5, dtype=torch.float64, backend="cpu")
        ref = fused_margin.CosFaceLoss(11, 5, dtype=torch.float64, backend="reference")
        ref.load_state_dict(head.state_dict())
        a, b = head(x, y), ref(x, y)
        assert torch.isfinite(a) and abs(a - b) <= 1e-12 * abs(b), (a, b)
        print("ok", fused_margin.__file__)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(site)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.startswith("ok")
