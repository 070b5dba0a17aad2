"""What every benchmark script here shares: memory meters, timers, the description of
the machine and the code (device, versions, git commit, load average), and the runner of
child processes (each measurement in a fresh interpreter, its result on one marked line
of stdout).

Nothing here knows a loss or an implementation under test: ``cases.py`` builds those,
``tables.py`` draws results, ``report.py`` builds the documentation's results from them, and the
scripts (``bench_loss.py``, ``train_facerec.py``, ``train_digits.py``, ``train_glyphs.py``,
``bench_dropin.py``) measure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
#: prefix of the line on a child's stdout that carries its JSON result
RESULT_MARKER = "@@fused_margin_bench_result@@"

# ---------------------------------------------------------------------------------
# Memory: the process RSS on the CPU, the allocator's statistics on a GPU.
# ---------------------------------------------------------------------------------

def _proc_status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def current_rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise), so that RSS
    reflects live tensors, not what the allocator happens to cache."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def limit_cpu_memory(limit_bytes: int | None) -> None:
    """Make allocations past ``limit_bytes`` fail (PyTorch then raises, which the worker
    reports as OOM) instead of waking the kernel's OOM killer on a shared machine."""
    if limit_bytes:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))


def default_cpu_memory_limit() -> int | None:
    """The memory limit of a measuring child on the CPU unless one is asked for: 70% of
    the memory available now (None where /proc/meminfo does not say)."""
    available = meminfo_bytes("MemAvailable")
    return int(0.7 * available) if available else None


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return "out of memory" in text.lower() or "can't allocate memory" in text or "Cannot allocate memory" in text


class MemoryMeter:
    """Peak memory above a baseline: CUDA allocator statistics, or the process RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.method = (
            "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM of a fresh process"
        )

    def set_baseline(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self.baseline = current_rss_bytes()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()
            if not reset_peak_rss():
                self.method = "ru_maxrss of a fresh process (includes warm-up)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


class Timer:
    """Forward/backward split of one iteration: CUDA events on a GPU (no host sync
    inside the iteration), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def __enter__(self) -> Timer:
        if self.cuda:
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            self._events[0].record()
        else:
            self._marks = [time.perf_counter()]
        return self

    def mark(self) -> None:
        if self.cuda:
            self._events[1].record()
        else:
            self._marks.append(time.perf_counter())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._events[2].record()
            torch.cuda.synchronize(self.device)
        else:
            self._marks.append(time.perf_counter())

    def split_ms(self) -> tuple[float, float]:
        if self.cuda:
            e = self._events
            return e[0].elapsed_time(e[1]), e[1].elapsed_time(e[2])
        m = self._marks
        return (m[1] - m[0]) * 1e3, (m[2] - m[1]) * 1e3


# ---------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------


def sample_stats(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": [round(s, 4) for s in samples],
    }


def time_iterations(
    step: Callable[[Timer], None], device: torch.device, warmup: int, repeat: int, min_time: float,
    max_repeat: int, on_warmup_done: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """At least ``repeat`` timed iterations, more (up to ``max_repeat``) until they add up
    to ``min_time`` seconds: cheap shapes get more samples for the same wall time."""
    for _ in range(warmup):
        with Timer(device) as t:
            step(t)
    if on_warmup_done is not None:
        on_warmup_done()
    fwd: list[float] = []
    bwd: list[float] = []
    while len(fwd) < max(repeat, 1) or (len(fwd) < max_repeat and (sum(fwd) + sum(bwd)) * 1e-3 < min_time):
        with Timer(device) as t:
            step(t)
        f, b = t.split_ms()
        fwd.append(f)
        bwd.append(b)
    total = [f + b for f, b in zip(fwd, bwd, strict=True)]
    return {"fwd_ms": sample_stats(fwd), "bwd_ms": sample_stats(bwd), "total_ms": sample_stats(total)}


# ---------------------------------------------------------------------------------
# The machine and the code: what a reader needs to trust a number.
# ---------------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "fused_margin": _dist_version("fused_margin"),
        "numpy": _dist_version("numpy"),
        "pytorch_metric_learning": _dist_version("pytorch-metric-learning"),
        "liger_kernel": _dist_version("liger-kernel"),
        "cut_cross_entropy": _dist_version("cut-cross-entropy"),
        "cuda": torch.version.cuda,
    }


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "os": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
            name = match.group(1).strip() if match else name
        mem = meminfo_bytes("MemTotal")
        info.update(name=name, cores=os.cpu_count(), threads=torch.get_num_threads(), memory_bytes=mem)
    return info


def meminfo_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    return None


def git_info() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def device_slug(info: dict[str, Any]) -> str:
    if info["type"] == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def command_line() -> str:
    """This run's command line, the script's path relative to the repository's root."""
    return shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]])


def provenance(device: dict[str, Any], versions: dict[str, Any], load_start: list[float] | None,
               git: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields of a result that say where and how it was measured: the device and the
    versions (as the caller found them), the command line, the git commit (``git``, as
    :func:`git_info` found it when the run started; now where not given), and the load
    average when the run started (``load_start``) and now, as it ends."""
    return {"device": device, "versions": versions, "command": command_line(), "git": git or git_info(),
            "load_average": {"start": load_start, "end": load_average()}}


# ---------------------------------------------------------------------------------
# Child processes: a fresh interpreter per measurement.
# ---------------------------------------------------------------------------------


def run_child(module: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs ``python -m module --worker`` (e.g. ``bench.bench_loss``) in a fresh
    interpreter, in the repository's root, with ``job`` on stdin; its result is the line
    that :func:`worker_main` printed."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, "--worker"], input=json.dumps(job), capture_output=True, text=True,
            timeout=timeout, cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"no result within {timeout:.0f} s", "wall_s": timeout}
    wall = time.perf_counter() - start
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["wall_s"] = round(wall, 2)
            return result
    if done.returncode < 0 and -done.returncode == 9:
        return {"status": "OOM", "reason": "child killed by SIGKILL (kernel OOM killer?)", "wall_s": wall}
    tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {done.returncode}"]
    return {"status": "error", "reason": f"worker failed: {tail[0][:300]}", "wall_s": round(wall, 2)}


def worker_main(dispatch: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    job = json.loads(sys.stdin.read())
    try:
        result = dispatch[job["kind"]](job)
    except Exception as error:  # noqa: BLE001 - the parent records it
        result = {"status": "OOM" if is_oom(error) else "error",
                  "reason": f"{type(error).__name__}: {first_line(error)}"}
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------
# Command-line values, errors, files.
# ---------------------------------------------------------------------------------


def parse_classes(text: str) -> list[int]:
    """'4096,8192', '2^12..2^18' (every power of two between), '2**20', '1000000'."""

    def one(token: str) -> int:
        token = token.strip()
        m = re.fullmatch(r"2(?:\^|\*\*)(\d+)", token)
        value = 2 ** int(m.group(1)) if m else int(token)
        if value < 2:
            raise argparse.ArgumentTypeError(f"class counts must be >= 2, got {token!r}")
        return value

    out: list[int] = []
    for part in text.split(","):
        if ".." in part:
            lo, hi = (one(p) for p in part.split(".."))
            if lo & (lo - 1) or hi & (hi - 1):
                raise argparse.ArgumentTypeError(f"range ends must be powers of two, got {part!r}")
            out += [2**k for k in range(lo.bit_length() - 1, hi.bit_length())]
        else:
            out.append(one(part))
    return sorted(set(out))


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def write_json(path: Path, result: dict[str, Any]) -> None:
    # write-then-rename: a reader (or a kill) never sees half a file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)

