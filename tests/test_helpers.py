"""The shared checks of tests/utils.py fail where they must: the three-way rule per
element as well as norm-wise, and the tolerance table's look-up; the suite does without
its optional packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import TOLERANCES, assert_no_less_accurate_than_eager, rel_err, tolerance

ROOT = Path(__file__).resolve().parents[1]


def _three(dtype: torch.dtype):
    """(ref float64, eager: ref rounded to ``dtype``, out: the same rounding)."""
    ref = torch.randn(64, 33, dtype=torch.float64)
    eager = ref.to(dtype)
    return ref, eager, eager.clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_three_way_passes_as_accurate_and_fails_one_bad_element(dtype):
    ref, eager, out = _three(dtype)
    assert_no_less_accurate_than_eager(out, eager, ref, 1e-3, "same rounding")
    # one element off by 5% of the largest entry: norm-wise within the margin of 0.2,
    # per element far outside it
    i, j = torch.randint(0, 64, ()).item(), torch.randint(0, 33, ()).item()
    out[i, j] += 0.05 * float(ref.abs().max())
    assert rel_err(out, ref) <= rel_err(eager, ref) + 0.2
    with pytest.raises(AssertionError, match=rf"1 of {ref.numel()} elements .* worst at \({i}, {j}\)"):
        assert_no_less_accurate_than_eager(out, eager, ref, 0.2, "one bad element", atol=0.0)
    # and the norm-wise half on its own
    with pytest.raises(AssertionError, match="error .* > eager's"):
        assert_no_less_accurate_than_eager(out, eager, ref, 1e-6, "norm-wise")


def test_three_way_fails_non_finite():
    ref, eager, out = _three(torch.float16)
    out[3, 4] = float("nan")
    with pytest.raises(AssertionError):
        assert_no_less_accurate_than_eager(out, eager, ref, 1.0, "nan")


def test_three_way_margin_allows_one_rounding():
    """An element that eager happens to get exactly while the fused result is one
    rounding away passes (rtol: the output dtype's epsilon)."""
    ref = torch.randn(50, dtype=torch.float64).to(torch.float16).double()
    eager = ref.to(torch.float16)  # exact
    out = (ref * (1 + torch.finfo(torch.float16).eps / 2)).to(torch.float16)
    assert_no_less_accurate_than_eager(out, eager, ref, 1e-3, "one rounding", atol=0.0)
    worse = (ref * (1 + 4 * torch.finfo(torch.float16).eps)).to(torch.float16)  # four roundings away
    with pytest.raises(AssertionError, match="elements less accurate"):
        assert_no_less_accurate_than_eager(worse, eager, ref, 1e-2, "four roundings", atol=0.0)


def test_tolerance_table():
    assert tolerance("cpu", torch.float32) == TOLERANCES[("cpu", torch.float32)]
    with pytest.raises(KeyError, match=r"no tolerance for \('nowhere', torch.float32\)"):
        tolerance("nowhere", torch.float32)


def test_suite_collects_without_hypothesis():
    """A machine without hypothesis loses only the property-based tests: tests/utils.py
    imports it guarded, and those tests skip."""
    code = ("import sys; sys.modules['hypothesis'] = None; import pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
            "'tests/test_reliability.py', '-k', 'injected or one_class_with']))")
    # no plugin autoload: hypothesis's own pytest plugin is what a machine without it lacks
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 skipped" in result.stdout and "passed" in result.stdout, result.stdout[-2000:]
