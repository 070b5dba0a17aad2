"""Rendering of every benchmark's results (markdown tables, the header that says where
and how a number was measured, plots), and the README's benchmark section built from
the committed result files.

    .venv/bin/python -m bench.report              # print it (or: python bench/report.py)
    .venv/bin/python -m bench.report --readme     # rewrite README.md's results block in place

Nothing here is typed by hand: every number comes from ``bench/results/*.json``
(written by ``bench_loss.py``, ``train_facerec.py`` and ``train_digits.py``). For each device it takes the
newest file of each kind, unless ``--all`` asks for every file.
"""

from __future__ import annotations

if not __package__:  # run as a file (python bench/report.py): run it as the module bench.report
    from cli import run_as_module  # bench/ is sys.path[0] when a file in it runs

    run_as_module(__file__)

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .cases import impl_label
from .harness import REPO_ROOT, RESULTS_DIR, device_slug

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


def header_text(result: dict[str, Any]) -> str:
    d, v, g = result["device"], result["versions"], result["git"]
    if d["type"] == "cpu":
        where = f"CPU: {d['name']} ({d.get('threads')} threads, {d.get('cores')} cores)"
    else:
        where = f"GPU: {d['name']} ({d.get('memory_bytes', 0) / 2**30:.0f} GiB)"
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


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
# The README's benchmark section.
# ---------------------------------------------------------------------------------


def _scripts():
    """The scripts whose results the README shows (imported when needed: they import
    this module's renderers)."""
    from . import bench_loss, train_digits, train_facerec

    return bench_loss, train_facerec, train_digits


def load_results(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    schemas = {script.SCHEMA for script in _scripts()}
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("schema") in schemas:
            found.append((path, data))
    return found


def newest_per_device(results: list[tuple[Path, dict[str, Any]]], kind: str) -> list[tuple[Path, dict[str, Any]]]:
    newest: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path, data in results:
        if data.get("kind") != kind:
            continue
        slug = device_slug(data["device"])
        if slug not in newest or data["date"] > newest[slug][1]["date"]:
            newest[slug] = (path, data)
    return [newest[k] for k in sorted(newest)]


def newest_digits_runs(results: list[tuple[Path, dict[str, Any]]]) -> list[tuple[Path, dict[str, Any]]]:
    """The newest digits run per device and embedder recipe (with or without BatchNorm
    on the embedding: ``--no-final-bn``), the default recipe first."""
    newest: dict[tuple[str, bool], tuple[Path, dict[str, Any]]] = {}
    for path, data in results:
        if data.get("kind") != "train_digits":
            continue
        key = (device_slug(data["device"]), not data["config"].get("final_bn", True))
        if key not in newest or data["date"] > newest[key][1]["date"]:
            newest[key] = (path, data)
    return [newest[k] for k in sorted(newest)]


def _link(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def render(results: list[tuple[Path, dict[str, Any]]], every: bool) -> str:
    _, train_facerec, _ = _scripts()
    out = ["<!-- generated by `python bench/report.py` from bench/results/*.json; do not edit by hand -->", ""]
    def pick(kind: str) -> list[tuple[Path, dict[str, Any]]]:
        return [r for r in results if r[1].get("kind") == kind] if every else newest_per_device(results, kind)

    loss_runs, train_runs = pick("bench_loss"), pick("train_facerec")
    digits_runs = pick("train_digits") if every else newest_digits_runs(results)
    if not loss_runs and not train_runs and not digits_runs:
        return "\n".join(out + ["No benchmark results committed yet: run `make bench`."]) + "\n"
    for path, data in loss_runs:
        kind = "GPU" if data["device"]["type"] == "cuda" else "CPU"
        out += [f"### Loss: forward + backward, {kind}", "", header_text(data), "",
                f"Data: [`{_link(path)}`]({_link(path)})", ""]
        if data.get("plot"):
            png = path.parent / data["plot"]
            out += [f"![time and memory versus classes]({_link(png)})", ""]
        out.append(markdown_tables(data))
        flop = data.get("flop_model", {})
        if flop:
            out += [f"FLOP model: floor {flop.get('floor_flops')}; fused {flop.get('fused_flops')}; "
                    f"'useful TFLOP/s' = {flop.get('useful_tflops')}. Memory floor: {flop.get('memory_floor')}.", ""]
    for path, data in train_runs:
        kind = "GPU" if data["device"]["type"] == "cuda" else "CPU"
        out += [f"### Face-recognition training, {kind}", "", header_text(data), "",
                f"Data: [`{_link(path)}`]({_link(path)})", "", train_facerec.markdown_table(data)]
        cfg = data["config"]
        out += [f"Throughput: {cfg.get('throughput')}. Largest C: {cfg.get('capacity_method')}.", ""]
    for path, data in digits_runs:
        out += digits_section(path, data)
    return "\n".join(out).rstrip() + "\n"


def digits_section(path: Path, data: dict[str, Any]) -> list[str]:
    """Every head on scikit-learn's digits: the table, figure (a), a link to figure (b)."""
    _, _, train_digits = _scripts()
    kind = "GPU" if data["device"]["type"] == "cuda" else "CPU"
    default_recipe = data["config"].get("final_bn", True)
    variant = "" if default_recipe else ", without BatchNorm on the embedding"
    out = [f"### Every head on real data: handwritten digits, {kind}{variant}", "", header_text(data), "",
           f"Data: [`{_link(path)}`]({_link(path)}); training and evaluation took {data['duration_s']} s "
           "(after the start-up: imports, data).", "",
           train_digits.markdown_table(data)]
    figure = data.get("embedding_figure") or {}
    if data.get("plot_embeddings") and not default_recipe:
        out += [f"Test embeddings at D={figure.get('dim')}: [`{data['plot_embeddings']}`]"
                f"({_link(path.parent / data['plot_embeddings'])})", ""]
    elif data.get("plot_embeddings"):
        accs = ", ".join(f"{p['label']} {p['test_accuracy'] * 100:.1f}%" for p in figure.get("heads", []))
        out += [f"![test embeddings at D={figure.get('dim')}]({_link(path.parent / data['plot_embeddings'])})", "",
                f"Figure: the same recipe at D={figure.get('dim')} (seed {figure.get('seed')}), test embeddings as "
                f"directions on the unit sphere; test accuracy at D={figure.get('dim')}: {accs}.", ""]
    if data.get("plot_angles"):
        out += [f"Angle histograms of every head (θ_y and θ_n, all seeds): "
                f"[`{data['plot_angles']}`]({_link(path.parent / data['plot_angles'])})", ""]
    return out


#: README.md's results block lies between these two lines (kept by ``--readme``).
BEGIN_MARK = "<!-- results:begin -->"
END_MARK = "<!-- results:end -->"


def readme_block(readme: str) -> str:
    """The text between the README's results markers (ValueError if they are missing)."""
    begin, end = readme.find(BEGIN_MARK), readme.find(END_MARK)
    if begin < 0 or end < begin:
        raise ValueError(f"README has no results block: {BEGIN_MARK} ... {END_MARK}")
    return readme[begin + len(BEGIN_MARK):end].strip("\n") + "\n"


def replace_readme_block(readme: str, section: str) -> str:
    readme_block(readme)  # raises without markers
    begin, end = readme.find(BEGIN_MARK) + len(BEGIN_MARK), readme.find(END_MARK)
    return readme[:begin] + "\n" + section + readme[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="directory of result JSON files")
    p.add_argument("--all", action="store_true", help="every result file, not only the newest per device")
    p.add_argument("--readme", nargs="?", type=Path, const=REPO_ROOT / "README.md", default=None,
                   help="rewrite the results block of this README (default README.md) instead of printing")
    args = p.parse_args(argv)
    section = render(load_results(args.results), args.all)
    if args.readme is None:
        sys.stdout.write(section)
    else:
        args.readme.write_text(replace_readme_block(args.readme.read_text(), section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
