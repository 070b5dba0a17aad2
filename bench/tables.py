"""How every benchmark result is drawn: markdown tables, the header that says where and
how a number was measured, plots, and the statistics a table states (mean ± standard
deviation over seeds, differences and their standard errors).

The scripts (``bench_loss.py``, ``train_facerec.py``, ``train_digits.py``,
``train_glyphs.py``, ``optim_memory.py``) print their results with it and ``report.py``
builds the documentation's results with it: both import this module, and it imports
neither (only ``cases.py`` and ``harness.py``, below every script).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .cases import impl_label

#: the schema of each script's result files (the ``schema`` field), by their ``kind``
SCHEMAS = {
    "bench_loss": "fused_margin.bench_loss/1",
    "train_facerec": "fused_margin.train_facerec/1",
    "train_digits": "fused_margin.train_digits/1",
    "train_glyphs": "fused_margin.train_glyphs/1",
}

# ---------------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------------


def markdown_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]], *,
                   caption: str | None = None, notes: Sequence[str] = ()) -> str:
    """A markdown table: ``columns`` as (title, alignment: 'left' or 'right'), one list of
    cells per row (a row with fewer cells than columns leaves the rest blank); the
    caption above it and the notes (lines) below it, each after a blank line."""
    align = {"left": "---", "right": "---:"}
    lines = [caption, ""] if caption is not None else []
    lines.append("| " + " | ".join(title for title, _ in columns) + " |")
    lines.append("|" + "|".join(align[how] for _, how in columns) + "|")
    for cells in rows:
        if len(cells) > len(columns):
            raise ValueError(f"a row has {len(cells)} cells for {len(columns)} columns: {list(cells)}")
        lines.append("|" + "".join(f" {cell} |" for cell in cells) + " |" * (len(columns) - len(cells)))
    lines.append("")
    lines.extend(notes)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# bench_loss.py: one table per head, the header, the plot; all drawn from the result dict.
# ---------------------------------------------------------------------------------


def _fmt_ms(stats: dict[str, Any] | None) -> str:
    if not stats:
        return ""
    med = stats["median"]
    half = (stats["max"] - stats["min"]) / 2
    digits = 1 if med >= 10 else 2
    return f"{med:.{digits}f} ±{half:.{digits}f}"


def _fmt_bytes(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f}"


def _fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def _fmt_err(value: float | None, ok: bool) -> str:
    return "" if value is None else f"{value:.1e}" + ("" if ok else " ✗")


#: bench_loss.py's columns; the gradient check's column follows where the run made one
LOSS_COLUMNS = (
    ("C", "right"), ("implementation", "left"), ("fwd ms", "right"), ("bwd ms", "right"), ("total ms", "right"),
    ("speed-up vs eager", "right"), ("× floor", "right"), ("useful TFLOP/s", "right"), ("peak MiB", "right"),
    ("memory vs eager", "right"), ("loss rel. err", "right"),
)


def _loss_cells(row: dict[str, Any], with_grads: bool) -> list[str]:
    if row["status"] != "ok":  # the status, then blank cells
        reason = f" ({row['reason']})" if row.get("reason") else ""
        return [str(row["classes"]), row["label"], f"{row['status']}{reason}"]
    err = row.get("loss_max_rel_err")
    err_text = "" if err is None else f"{err:.1e}" + ("" if row.get("loss_ok", True) else " ✗")
    mem = _fmt_bytes(row.get("peak_extra_bytes"))
    if row["impl"] == "floor":
        mem += " (analytic)"
    cells = [
        str(row["classes"]), row["label"], _fmt_ms(row.get("fwd_ms")), _fmt_ms(row.get("bwd_ms")),
        _fmt_ms(row.get("total_ms")), _fmt_ratio(row.get("speedup_vs_eager")), _fmt_ratio(row.get("time_vs_floor")),
        f"{row.get('useful_tflops', 0):.3g}", mem, _fmt_ratio(row.get("memory_vs_eager")), err_text,
    ]
    if with_grads:
        cells.append(_fmt_err(row.get("grad_max_rel_err"), row.get("grad_ok", True)))
    return cells


def markdown_tables(result: dict[str, Any]) -> str:
    """One markdown table per head, from a ``bench_loss.py`` result dict."""
    cfg = result["config"]
    tables: list[str] = []
    for head in cfg["heads"]:
        caption = (f"**{head}** — B={cfg['batch']}, D={cfg['dim']}, {cfg['dtype']}; time: median ±half-range of "
                   f"at least {cfg['repeat']} timed runs (more up to {cfg.get('min_time_s')} s); "
                   "memory: peak above the inputs")
        rows = [r for r in result["rows"] if r["head"] == head]
        # An implementation skipped for one reason at every C gets one line under the table.
        not_run: dict[str, str] = {}
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = [r for r in rows if r["impl"] == impl]
            if all(r["status"] == "skipped" for r in mine) and len({r.get("reason") for r in mine}) == 1:
                not_run[impl] = f"{mine[0]['label']}: {mine[0].get('reason')}"
        # the gradient check's column where the run made one (older results have none)
        with_grads = any("grad_max_rel_err" in r for r in rows)
        columns = LOSS_COLUMNS + ((("grad rel. err", "right"),) if with_grads else ())
        notes = ["Not run: " + "; ".join(not_run.values()) + ".", ""] if not_run else []
        tables.append(markdown_table(columns, [_loss_cells(r, with_grads) for r in rows if r["impl"] not in not_run],
                                     caption=caption, notes=notes))
    return "".join(tables).removesuffix("\n")


def device_text(device: dict[str, Any]) -> str:
    """The machine a result was measured on, in one phrase."""
    if device["type"] == "cpu":
        return f"CPU: {device['name']} ({device.get('threads')} threads, {device.get('cores')} cores)"
    return f"GPU: {device['name']} ({device.get('memory_bytes', 0) / 2**30:.0f} GiB)"


def header_text(result: dict[str, Any]) -> str:
    v, g = result["versions"], result["git"]
    where = device_text(result["device"])
    commit = (g.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if g.get("dirty") else "")
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val and k in ("python", "torch", "triton", "cuda"))
    load = result.get("load_average") or {}
    text = (f"{where}; {result['date']}; {vers}; commit {commit}; "
            f"load average {load.get('start')} → {load.get('end')}; command `{result['command']}`")
    if result.get("environment"):
        text += "; environment " + " ".join(f"`{k}={val}`" for k, val in result["environment"].items())
    if result.get("note"):
        text += f"\n\nNote: {result['note']}"
    return text


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def head_grid(count: int, cols: int, panel: tuple[float, float], xlabel: str) -> tuple[Any, list[Any]]:
    """A figure with one panel per head (``count``, ``cols`` to a row, each ``panel``
    inches, a shared x axis labelled ``xlabel`` under the last row): the figure and the
    panels in order; the grid's spare panels are hidden."""
    plt = pyplot()
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False, sharex=True)
    for ax in axes.flat[count:]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    return fig, list(axes.flat[:count])


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    heads = result["config"]["heads"]
    fig, axes = plt.subplots(len(heads), 2, figsize=(11, 4 * len(heads)), squeeze=False)
    for (ax_t, ax_m), head in zip(axes, heads, strict=True):
        rows = [r for r in result["rows"] if r["head"] == head and r["status"] == "ok"]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["classes"])
            cs = [r["classes"] for r in mine]
            style = {"linestyle": "--", "color": "black"} if impl == "floor" else {"marker": "o"}
            (line,) = ax_t.plot(cs, [r["total_ms"]["median"] for r in mine], label=mine[0].get("label", impl_label(impl)), **style)
            ax_t.fill_between(cs, [r["total_ms"]["min"] for r in mine], [r["total_ms"]["max"] for r in mine],
                              color=line.get_color(), alpha=0.15, linewidth=0)
            mem = [(r["classes"], r["peak_extra_bytes"] / 2**20) for r in mine if r.get("peak_extra_bytes")]
            if mem:
                ax_m.plot(*zip(*mem, strict=True), label=mine[0].get("label", impl_label(impl)), **style)
        for ax, ylabel in ((ax_t, "forward + backward (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("classes C")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_title(f"{head}: time")
        ax_m.set_title(f"{head}: memory")
        ax_t.legend(fontsize=8)
    cfg, d = result["config"], result["device"]
    fig.suptitle(f"fused_margin bench, {d['type']} {d.get('name', '')}, B={cfg['batch']} D={cfg['dim']} "
                 f"{cfg['dtype']}, {result['date'][:10]}, commit {(result['git'].get('commit') or '?')[:8]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)




# ---------------------------------------------------------------------------------
# Statistics over seeds, as the tables state them.
# ---------------------------------------------------------------------------------


def summary_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def pm(stats: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ±std`` of :func:`summary_stats`, times ``scale``."""
    return f"{stats['mean'] * scale:.{digits}f} ±{stats['std'] * scale:.{digits}f}"


def comparisons(heads: Sequence[dict[str, Any]], key: str, baseline: str = "softmax") -> list[dict[str, Any]]:
    """Each head's mean of ``key`` (a :func:`summary_stats` dict) against the baseline
    head's: the difference and its standard error (each side's standard deviation over
    the square root of its number of seeds). Heads without the value are left out."""
    by_name = {h["head"]: h for h in heads}
    if baseline not in by_name or by_name[baseline].get(key) is None:
        return []
    base, n_base = by_name[baseline][key], len(by_name[baseline]["seeds"])
    out = []
    for h in heads:
        if h["head"] == baseline or h.get(key) is None:
            continue
        value, n = h[key], len(h["seeds"])
        se = math.sqrt(value["std"] ** 2 / n + base["std"] ** 2 / n_base)
        out.append({"head": h["head"], "label": h["label"], "versus": baseline, "metric": key,
                    "difference": value["mean"] - base["mean"], "standard_error": se})
    return out


def two_standard_errors(rows: Sequence[dict[str, Any]], scale: float = 100.0, digits: int = 1) -> str:
    """The comparisons grouped as above / within / below two standard errors, as one
    sentence fragment: 'above by more than two standard errors: A (+1.0 ±0.3); ...'."""
    groups: dict[str, list[str]] = {"above": [], "within": [], "below": []}
    for c in rows:
        se = c["standard_error"]
        z = c["difference"] / se if se > 0 else (math.copysign(math.inf, c["difference"]) if c["difference"] else 0.0)
        group = "above" if z > 2 else "below" if z < -2 else "within"
        groups[group].append(f"{c['label']} ({c['difference'] * scale:+.{digits}f} ±{se * scale:.{digits}f})")
    return "; ".join(f"{what} by more than two standard errors: {', '.join(names)}" if what != "within" else
                     f"within two standard errors: {', '.join(names)}" for what, names in groups.items() if names)


# ---------------------------------------------------------------------------------
# train_facerec.py: one table of the implementations of one head.
# ---------------------------------------------------------------------------------

#: the suffix of an implementation whose head weight is updated inside the backward
FUSED_OPTIM = "+optim"
FACEREC_LABELS = {"eager": "eager (backend='eager')", "insightface": "InsightFace-style eager"}


def facerec_impl_label(impl: str) -> str:
    if impl.endswith(FUSED_OPTIM):
        return f"fused [{impl.removesuffix(FUSED_OPTIM)}], SGD in the backward"
    return FACEREC_LABELS.get(impl, f"fused [{impl}]")


def facerec_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    budget = cfg["memory_budget_bytes"]
    caption = (f"**{cfg['head']}** — {cfg['classes']} identities, B={cfg['batch']}, D={cfg['dim']}, "
               f"{cfg['image_size']}x{cfg['image_size']} images, {cfg['steps']} SGD steps; accuracy and loss: mean "
               f"of the last {cfg['acc_window']} steps")
    columns = [("head", "left"), ("samples/s", "right"), ("step ms", "right"), ("peak MiB", "right"),
               ("largest C within " + (f"{budget / 2**30:g} GiB" if budget else "budget"), "right"),
               ("train accuracy", "right"), ("train loss", "right")]
    # the verification metrics on held-out identities, where the run measured them
    verified = [run["verification"] for run in result["runs"] if run.get("verification")]
    if verified:
        columns += [("TAR@1e-3", "right"), ("TAR@1e-4", "right"), ("10-fold accuracy", "right"),
                    ("rank-1", "right")]
    rows = []
    for run in result["runs"]:
        if run["status"] != "ok":  # the status, then blank cells
            rows.append([run["label"], f"{run['status']} ({run.get('reason', '')})"])
            continue
        cap = run.get("capacity") or {}
        cap_text = f"{cap['max_classes']:,}" if cap.get("max_classes") else ("—" if not cap else "none fits")
        step = run["step_ms"]
        spread = (step["max"] - step["min"]) / 2
        rows.append([run["label"], f"{run['samples_per_s']:.0f}", f"{step['median']:.1f} ±{spread:.1f}",
                     f"{run['peak_bytes'] / 2**20:,.0f}", cap_text, f"{run['train_accuracy']:.3f}",
                     f"{run['train_loss']:.3f}"])
        if run.get("verification"):
            v = run["verification"]
            tar = {point["far"]: point["tar"] for point in v["tar_at_far"]}
            rows[-1] += [_rate(tar.get(1e-3)), _rate(tar.get(1e-4)), f"{v['kfold']['mean']:.3f}",
                         f"{v['identification']['rank_1']:.3f}"]
    if verified:
        v = verified[0]
        caption += (f"; verification on {v['identities']} identities never trained on, {v['images_per_identity']} "
                    f"renderings each ({v['num_genuine']:,} genuine, {v['num_impostor']:,} impostor pairs; "
                    "10-fold accuracy: LFW's protocol; rank-1: the first rendering of each as the gallery)")
    notes = [f"- {facerec_impl_label(a['impl'])} {'agrees with' if a['agrees'] else 'DIFFERS from'} eager: accuracy "
             f"{a['accuracy']:.3f} vs {a['accuracy_versus']:.3f} (difference {a['difference']:+.3f}, binomial s.e. "
             f"{a['standard_error']:.3f}); first-step loss relative difference {a['first_loss_rel_diff']:.1e}"
             for a in result["agreement"]]
    return markdown_table(columns, rows, caption=caption, notes=notes)


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------
# train_digits.py: every head, mean ± std over seeds.
# ---------------------------------------------------------------------------------


def digits_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    test_n = cfg["test_samples"]
    caption = (
        f"{cfg['train_samples']} training and {test_n} test images (stratified split, seed {cfg['split_seed']}); "
        f"embedder {cfg['embedder']}; SGD lr {cfg['lr']} (momentum {cfg['momentum']}, weight decay "
        f"{cfg['weight_decay']}), cosine decay, {cfg['epochs']} epochs of "
        f"batch {cfg['batch']} ({cfg['steps']} steps); backend `{cfg['backend']}`; seeds {cfg['seeds']}; "
        "every head with its defaults")
    columns = [("head", "left"), ("test accuracy %", "right"), ("vs Softmax (pp)", "right"),
               ("cosine accuracy %", "right"), ("median θ_y °", "right"), ("median θ_n °", "right"),
               ("median θ_n − θ_y °", "right"), ("non-finite steps", "right"), ("train s", "right")]
    versus_softmax = comparisons(result["heads"], "test_accuracy")
    versus = {c["head"]: c for c in versus_softmax}
    rows = []
    for h in result["heads"]:
        c = versus.get(h["head"])
        vs = f"{c['difference'] * 100:+.1f} ±{c['standard_error'] * 100:.1f}" if c else ""
        rows.append([h["label"], pm(h["test_accuracy"], 100), vs, pm(h["cosine_accuracy"], 100),
                     pm(h["target_angle_median"]), pm(h["nearest_negative_angle_median"]),
                     pm(h["angle_gap_median"]), str(h["nonfinite_loss_steps"] + h["nonfinite_grad_steps"]),
                     f"{h['train_seconds']:.1f}"])
    notes = [
        f"Mean ±standard deviation over the seeds; one test image is {100 / test_n:.2f} pp. 'vs Softmax': the "
        "difference of the mean test accuracies, ± its standard error. Test accuracy: top-1 of the head's own "
        "margin-free logits (the nearest class weight by cosine, except Softmax and L-Softmax, whose logits are "
        "linear); cosine accuracy: the nearest class weight by cosine, for every head. θ_y: angle to the own "
        "class weight, θ_n: to the nearest other one (test images, per seed). Non-finite steps: training steps "
        "whose loss or gradient was not finite."]
    if versus_softmax:
        notes += ["", f"Against Softmax's test accuracy, in pp: {two_standard_errors(versus_softmax)}."]
    annealed = [h for h in result["heads"] if h.get("final_lambda") is not None]
    if annealed:
        notes += ["", "Annealed λ after the last step (λ ≫ 1 makes the target logit nearly the margin-free one): "
                  + ", ".join(f"{h['label']} {h['final_lambda']:.3g}" for h in annealed) + "."]
    return markdown_table(columns, rows, caption=caption, notes=notes)


# ---------------------------------------------------------------------------------
# train_glyphs.py: every head on printed characters, open-set protocols.
# ---------------------------------------------------------------------------------

def far_label(far: float) -> str:
    """1e-3 for 0.001."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


#: the flat metrics of a glyphs run: key -> column title
GLYPH_METRICS = {
    "closed_accuracy": "closed-set accuracy %",
    **{f"tar_{p}_{far:.0e}": f"TAR@{far_label(far)}" for p in ("all", "cross") for far in (1e-3, 1e-4, 1e-5, 1e-6)},
    "kfold_all": "10-fold accuracy %", "kfold_cross": "10-fold accuracy %",
    "rank_1": "rank-1 %", "rank_5": "rank-5 %",
}
#: the metrics the comparisons between heads state
GLYPH_HEADLINE = ("closed_accuracy", "tar_all_1e-04", "tar_cross_1e-04", "kfold_cross", "rank_1")
_GLYPH_NAMES = {"closed_accuracy": "closed-set accuracy", "tar_all_1e-04": "TAR@1e-4",
                "tar_cross_1e-04": "cross-style TAR@1e-4", "kfold_cross": "cross-style 10-fold accuracy",
                "rank_1": "rank-1"}


def _pct(stats: dict[str, float] | None, seeds: int) -> str:
    if stats is None:
        return "—"
    return pm(stats, 100, 2) if seeds > 1 else f"{stats['mean'] * 100:.2f}"


def _first_steps(same: dict[str, Any]) -> str:
    diffs = same.get("first_steps_loss_rel_diff") or []
    if len(diffs) < 2:
        return ""
    return (f", at steps 1 to {len(diffs) - 1}: " + ", ".join(f"{d:.0e}" for d in diffs[1:])
            + " (the same inputs and weights at step 0; rounding differences grow as training amplifies them)")


def glyphs_tables(result: dict[str, Any]) -> str:
    """The glyphs run's tables: every pair; the cross-style protocol; the equivalence of
    the fused and eager backends; the speed and memory at the full class count."""
    cfg, split = result["config"], result["split"]
    heads = result["heads"]
    seeds = len(cfg["seeds"])
    caption = (
        f"{split['classes']:,} training classes (characters) in {split['train_faces']} faces: "
        f"{split['train_images']:,} images, {cfg['epochs']} epochs of batch {cfg['batch']} ({cfg['steps']:,} steps), "
        f"{cfg['image_size']}x{cfg['image_size']}, D={cfg['dim']}, backend `{cfg['backend']}`, seeds {cfg['seeds']}; "
        f"closed set: {split['closed_set_images']:,} images of training characters in the held-out faces "
        f"({', '.join(split['heldout_faces'])}); verification: {split['verify_images']:,} images of "
        f"{split['verify_characters']:,} characters never trained on, in every face; identification: "
        f"{split['probes']:,} probes against a gallery of {split['gallery_size']:,} characters")
    fars = cfg["fars"]
    columns = [("head", "left"), ("closed-set accuracy %", "right"),
               *((f"TAR@{far_label(far)} %", "right") for far in fars), ("10-fold accuracy %", "right"),
               ("rank-1 %", "right"), ("rank-5 %", "right"), ("train s", "right"), ("non-finite steps", "right")]
    rows = [[h["label"], _pct(h["closed_accuracy"], seeds), *(_pct(h[f"tar_all_{far:.0e}"], seeds) for far in fars),
             _pct(h["kfold_all"], seeds), _pct(h["rank_1"], seeds), _pct(h["rank_5"], seeds),
             f"{h['train_seconds']['mean']:.0f}", str(h["nonfinite_steps"])] for h in heads]
    spread = "mean ±standard deviation over the seeds" if seeds > 1 else "one seed"
    first = next(r for r in result["runs"] if r["backend"] == cfg["backend"])
    every = first["verification"]["all"]
    notes = [f"Every pair: {every['num_genuine']:,} genuine and {every['num_impostor']:,} impostor pairs; {spread}. "
             "TAR@FAR: the true accept rate at the threshold that accepts at most that fraction of impostor pairs. "
             f"10-fold accuracy: LFW's protocol on {cfg['folds'] * cfg['pairs_per_fold']:,} sampled pairs, the "
             "threshold chosen on the other nine folds. Closed set: nearest class weight by cosine. Train s: "
             "wall time of one run's training (see the timing below)."]
    out = [markdown_table(columns, rows, caption=caption, notes=notes)]

    cross = first["verification"]["cross"]
    columns = [("head", "left"), *((f"TAR@{far_label(far)} %", "right") for far in fars),
               ("10-fold accuracy %", "right")]
    rows = [[h["label"], *(_pct(h[f"tar_cross_{far:.0e}"], seeds) for far in fars), _pct(h["kfold_cross"], seeds)]
            for h in heads]
    styles = ", ".join(f"{k} {v:,}" for k, v in split["verify_images_per_style"].items())
    out.append(markdown_table(columns, rows, caption=(
        f"Cross-style protocol: both images of every pair in different style families (images: {styles}): "
        f"{cross['num_genuine']:,} genuine and {cross['num_impostor']:,} impostor pairs")))

    if result.get("comparisons"):
        lines = []
        for baseline, name in (("softmax", "Softmax"), ("cosface", "CosFace")):
            for key in GLYPH_HEADLINE:
                rows_ = [c for c in result["comparisons"] if c["versus"] == baseline and c["metric"] == key]
                if rows_:
                    lines.append(f"- against {name}'s {_GLYPH_NAMES[key]}, in pp: {two_standard_errors(rows_, 100, 2)}.")
        out.append("Differences of the means, ± their standard error (the seeds' standard deviations over the square "
                   "root of their number, as if the heads' runs were independent; the runs of one seed share the "
                   "initial embedder, the batch order and the augmentation):\n\n" + "\n".join(lines) + "\n")

    same = result.get("equivalence")
    if same:
        columns = [("metric", "left"), (f"backend '{same['fused_backend']}'", "right"), ("backend 'eager'", "right"),
                   ("difference (pp)", "right"), ("seed-to-seed std (pp)", "right")]
        rows = [[GLYPH_METRICS[m["metric"]].replace(" %", "") + (" (cross-style)" if "cross" in m["metric"] else ""),
                 f"{m['fused'] * 100:.2f}", f"{m['eager'] * 100:.2f}", f"{m['difference'] * 100:+.2f}",
                 "" if m["seed_std"] is None else f"{m['seed_std'] * 100:.2f}"] for m in same["metrics"]]
        verdict = ""
        judged = [m for m in same["metrics"] if m["within_noise"] is not None]
        if judged:
            outside = [GLYPH_METRICS[m["metric"]] for m in judged if not m["within_noise"]]
            verdict = (" Every difference lies within 2·√2 seed-to-seed standard deviations (two runs differing by "
                       "noise alone)." if not outside else f" Outside 2·√2 seed-to-seed standard deviations: "
                       f"{', '.join(outside)}.")
        out.append(markdown_table(columns, rows, caption=(
            f"Fused against eager: {same['label']} trained from seed {same['seed']} with both backends"), notes=[
            f"First-step loss relative difference {same['first_loss_rel_diff']:.1e}{_first_steps(same)}; the loss "
            f"curves (mean of every 20 steps) differ by at most {same['loss_curve_max_rel_diff']:.1e} relative."
            f"{verdict} Training "
            f"wall time {same['train_seconds']['fused']:.0f} s "
            f"fused, {same['train_seconds']['eager']:.0f} s eager (CPU time {same['train_cpu_seconds']['fused']:.0f} s "
            f"and {same['train_cpu_seconds']['eager']:.0f} s)."]))

    speed = result.get("speed")
    if speed:
        columns = [("run", "right"), ("backend", "left"), ("samples/s", "right"), ("step ms", "right"),
                   ("step CPU ms", "right"), ("peak MiB", "right"), ("step's own MiB", "right")]
        rows = []
        for order, run in enumerate(speed["runs"], 1):
            if run.get("status") != "ok":
                rows.append([str(order), f"'{run['backend']}'", f"{run.get('status')} ({run.get('reason', '')})"])
                continue
            step, cpu = run["step_ms"], run.get("step_cpu_ms")
            rows.append([str(order), f"'{run['backend']}'", f"{run['samples_per_s']:.0f}",
                         f"{step['median']:.1f} ±{(step['max'] - step['min']) / 2:.1f}",
                         "" if cpu is None else f"{cpu['median']:.1f}", f"{run['peak_bytes'] / 2**20:,.0f}",
                         f"{run['step_peak_bytes'] / 2**20:,.0f}"])
        notes = ["Step ms: median ±half-range of the timed steps; step CPU ms: the median CPU time of a step (one "
                 "thread: what a quiet core takes); peak: the process's peak resident memory; the step's own: the "
                 "peak above the memory held once the model, head and optimizer exist. Data: "
                 f"{speed['data']}."]
        ok = [r for r in speed["runs"] if r.get("status") == "ok" and r.get("step_cpu_ms")]
        fused = [r for r in ok if r["backend"] != "eager"]
        eager = [r for r in ok if r["backend"] == "eager"]
        if fused and eager:
            cpu_ratio = statistics.median(r["step_cpu_ms"]["median"] for r in eager) / statistics.median(
                r["step_cpu_ms"]["median"] for r in fused)
            own_ratio = statistics.median(r["step_peak_bytes"] for r in eager) / statistics.median(
                r["step_peak_bytes"] for r in fused)
            notes.append("")
            notes.append(f"Eager against fused: {cpu_ratio:.2f}x the CPU time per step and {own_ratio:.2f}x the "
                         "step's own memory (medians over the runs).")
        out.append(markdown_table(columns, rows, caption=(
            f"Training step at the full class count, {speed['classes']:,} classes ({speed['head']}, "
            f"B={speed['batch']}, {speed['threads']} thread(s)), each run a fresh process, in the order shown"),
            notes=notes))

    timing = result["timing"]
    per_step = ", ".join(f"{h['label']} {h['step_cpu_ms']['mean']:.0f}" for h in heads)
    workers, threads = timing["workers"], timing["threads_per_worker"]
    text = (f"Timing: {result['duration_s']:,.0f} s in all: {timing['data_s']:.0f} s finding, rendering or reading "
            f"the glyphs and building the split, {timing['training_s']:,.0f} s training and evaluating "
            f"{len(result['runs'])} runs in {workers} worker process(es) of {threads} thread(s) each "
            f"({timing['cpu_count']} cores)")
    if "runs_cpu_s" in timing:
        quiet = timing["data_cpu_s"] + timing["runs_cpu_s"] / workers + timing["speed_s"]
        text += (f", {timing['speed_s']:.0f} s the speed comparison. The runs took {timing['runs_cpu_s']:,.0f} s of "
                 f"CPU time: where each worker has a core of its own, the command takes about {quiet:,.0f} s "
                 f"({quiet / 60:.0f} min: the glyphs' CPU time, the runs' CPU time over {workers} workers, the speed "
                 "comparison as measured)")
    out.append(text + f". CPU time per training step, ms (one thread per run: the wall time per step of a quiet "
               f"core): {per_step}.\n")
    return "\n".join(out)
