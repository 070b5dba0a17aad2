"""The implementations under test of ``bench_loss.py``: the heads (the library's spec
and, where one exists, the peer library's equivalent loss), the registry of
implementations (fused backends and their variants, eager PyTorch, its compiled form,
the peers, the GEMM floor), the inputs, and :func:`build_case`, which turns one
implementation on one set of inputs into a forward and a backward to time.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: Implementations that are not fused backends of the registry, in table order.
NON_BACKEND_IMPLS = ("eager", "compile", "pml", "liger", "cce", "floor")
#: Backends with a variant per option value, named 'backend:value' (e.g. 'triton:atomic'):
#: the option set on the backend in the measuring process. The plain name runs the default.
BACKEND_VARIANTS = {"triton": ("backward_mode", ("gemm", "recompute", "atomic"))}


def split_impl(impl: str) -> tuple[str, dict[str, str]]:
    """``('triton', {'backward_mode': 'atomic'})`` for 'triton:atomic'; ``(impl, {})`` else."""
    name, _, value = impl.partition(":")
    if not value:
        return impl, {}
    option, _values = BACKEND_VARIANTS[name]
    return name, {option: value}


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---------------------------------------------------------------------------------
# Heads under test: the library's spec and, where one exists, the peer's equivalent.
# ---------------------------------------------------------------------------------


def _pml_module(name: str, num_classes: int, dim: int) -> Any:
    """pytorch-metric-learning's loss equal to our head ``name`` (its W is (D, C))."""
    from pytorch_metric_learning import losses, reducers

    per_sample = reducers.DoNothingReducer()
    if name == "cosface":
        return losses.CosFaceLoss(num_classes, dim, margin=0.35, scale=64, reducer=per_sample)
    if name == "arcface":  # PML takes the margin in degrees
        return losses.ArcFaceLoss(num_classes, dim, margin=math.degrees(0.5), scale=64, reducer=per_sample)
    if name == "normface":
        return losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=1.0 / 30.0, reducer=per_sample)
    if name == "subcenter_arcface":
        return losses.SubCenterArcFaceLoss(
            num_classes, dim, margin=math.degrees(0.5), scale=64, sub_centers=3, reducer=per_sample
        )
    raise KeyError(name)


def head_spec(name: str):
    """The head as a :class:`fused_margin.MarginSpec` with the library's defaults."""
    from fused_margin import MarginSpec

    factories: dict[str, Callable[[], Any]] = {
        "softmax": MarginSpec.softmax,
        "normface": MarginSpec.normface,
        "cosface": MarginSpec.cosface,
        "arcface": MarginSpec.arcface,
        "combined": MarginSpec.combined,
        "cs_softmax": MarginSpec.cs_softmax,
        "so_softmax": MarginSpec.so_softmax,
        "circle": MarginSpec.circle,
        "curricularface": MarginSpec.curricularface,
        "sphereface": MarginSpec.sphereface,
        "lsoftmax": MarginSpec.lsoftmax,
        "subcenter_arcface": lambda: MarginSpec.arcface(num_subcenters=3),
    }
    if name not in factories:
        raise ValueError(f"unknown head {name!r}; choose from {sorted(factories)}")
    return factories[name]()


HEAD_NAMES = (
    "softmax", "normface", "cosface", "arcface", "combined", "cs_softmax", "so_softmax", "circle",
    "curricularface", "sphereface", "lsoftmax", "subcenter_arcface",
)
PML_HEADS = ("cosface", "arcface", "normface", "subcenter_arcface")
#: Liger and cut-cross-entropy fuse the plain linear + cross-entropy only.
LINEAR_CE_HEADS = ("softmax",)

IMPL_LABELS = {
    "eager": "eager PyTorch",
    "compile": "torch.compile(eager)",
    "pml": "pytorch-metric-learning",
    "liger": "Liger fused linear CE",
    "cce": "cut-cross-entropy",
    "floor": "floor: 3 GEMMs",
    "reference": "reference backend (custom op)",
}


def impl_label(impl: str, dtype: str | None = None) -> str:
    """The table's name of ``impl``; the eager baselines say how they multiply (what a
    user writes: 16-bit GEMMs in the input dtype, the softmax in fp32)."""
    label = IMPL_LABELS.get(impl, f"fused [{impl}]")
    if impl in ("eager", "compile") and dtype in ("bfloat16", "float16"):
        short = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
        label += f" ({short} GEMMs, fp32 softmax)"
    return label


# ---------------------------------------------------------------------------------
# Inputs and the cases under test.
# ---------------------------------------------------------------------------------


def make_inputs(
    batch: int, num_rows: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (B, D), W (num_rows, D)): the same values in every process for the same
    arguments (generated on the device by a seeded generator)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, dim, device=device, generator=gen).to(dtype)
    # InsightFace initializes class weights N(0, 0.01); the scale matters for the
    # unnormalized (softmax) head only, where it keeps the logits O(1).
    w = (torch.randn(num_rows, dim, device=device, generator=gen) * 0.01).to(dtype)
    return x, w


def make_labels(batch: int, num_classes: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randint(0, num_classes, (batch,), device=device, generator=gen)


def check_weight_rows(labels: torch.Tensor, check_rows: list[int], num_rows: int, k: int, count: int) -> list[int]:
    """Rows of W whose gradient is checked: the target rows of the checked embeddings
    (where the target transform acts) and ``count`` rows spread over W."""
    targets = (labels[torch.tensor(check_rows, device=labels.device)] * k).tolist()
    spread = [round(i * (num_rows - 1) / max(count - 1, 1)) for i in range(min(count, num_rows))]
    return sorted(set(targets) | set(spread))


@dataclass
class Case:
    """One implementation on one set of inputs: ``forward()`` returns the loss (per
    sample (B,), or a scalar), ``backward(out)`` back-propagates the mean loss."""

    forward: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], Any]
    params: list[torch.Tensor]
    per_sample: bool = True


def _mean_backward(out: torch.Tensor) -> None:
    (out.mean() if out.dim() else out).backward()


def build_case(impl: str, head: str, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, spec: Any) -> Case:
    """The callable pair for ``impl``; raises ImportError where a peer is missing."""
    import fused_margin as fm

    x.requires_grad_(True)
    w.requires_grad_(True)
    if impl == "compile":
        def eager_loss(xx: torch.Tensor, ww: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return fm.margin_cross_entropy(xx, ww, yy, spec, reduction="none", backend="eager")

        compiled = torch.compile(eager_loss)
        return Case(lambda: compiled(x, w, y), _mean_backward, [x, w])
    if impl == "pml":
        module = _pml_module(head, w.shape[0] // spec.num_subcenters, w.shape[1]).to(device=x.device, dtype=x.dtype)
        with torch.no_grad():
            module.W.copy_(w.T)
        return Case(lambda: module(x, y)["loss"]["losses"], _mean_backward, [x, module.W])
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return Case(
            lambda: liger_fused_linear_cross_entropy(x, w, y, reduction="none"), _mean_backward, [x, w]
        )
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        # Its Triton kernel needs a GPU; elsewhere the package offers its torch.compile path.
        cce_impl = "cce" if x.device.type == "cuda" else "torch_compile"
        return Case(
            lambda: linear_cross_entropy(x, w, y, reduction="none", impl=cce_impl), _mean_backward, [x, w]
        )
    # 'eager', 'reference' and every fused backend (a variant: its options are set on the
    # backend by the caller): the library's public function.
    backend = split_impl(impl)[0]
    return Case(
        lambda: fm.margin_cross_entropy(x, w, y, spec, reduction="none", backend=backend), _mean_backward, [x, w]
    )


# ---------------------------------------------------------------------------------
# Which implementations run: the registry, asked through the probe's answers.
# ---------------------------------------------------------------------------------


def select_impls(requested: list[str], probe: dict[str, Any]) -> list[str]:
    """``all`` = every registered fused backend (not 'reference') + eager, compile, peers
    and the floor; ``-name`` removes one; names add themselves."""
    fused = sorted({name for head in probe["backends"].values() for name in head if name != "reference"})
    chosen: list[str] = []
    for token in requested:
        if token == "all":
            chosen += [*fused, *NON_BACKEND_IMPLS]
        elif token.startswith("-"):
            chosen = [c for c in chosen if c != token[1:]]
        else:
            chosen.append(token)
    known = {*fused, "reference", *NON_BACKEND_IMPLS}
    known |= {f"{name}:{value}" for name, (_, values) in BACKEND_VARIANTS.items() if name in fused for value in values}
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; known: {sorted(known)}")
    return list(dict.fromkeys(chosen))


def applicability(impl: str, head: str, classes: int, args: argparse.Namespace, probe: dict[str, Any]) -> str | None:
    """Why ``impl`` is skipped at this point of the sweep (None: run it)."""
    base, _ = split_impl(impl)
    if base in probe["backends"].get(head, {}):
        reasons = probe["backends"][head][base]
        if reasons:
            return "; ".join(reasons)
    if impl == "pml" and head not in PML_HEADS:
        return "no equivalent loss in pytorch-metric-learning"
    if impl in ("liger", "cce") and head not in LINEAR_CE_HEADS:
        return "fuses the plain linear softmax head only"
    if impl == "liger" and args.device_type != "cuda":
        return "Liger Kernel needs a GPU"
    caps = {"compile": args.compile_max_classes, "pml": args.peer_max_classes, "eager": args.eager_max_classes,
            "reference": args.eager_max_classes}
    cap = caps.get(impl)
    if cap and classes > cap:
        flag = {"compile": "--compile-max-classes", "pml": "--peer-max-classes"}.get(impl, "--eager-max-classes")
        return f"time budget: C > {cap} ({flag})"
    return None

