"""``bench/train_glyphs.py`` and ``bench/glyph_data.py`` on the fonts matplotlib ships
(DejaVu Sans/Serif/Mono and STIX General: Latin, Greek and Cyrillic letters; CI has no
CJK fonts), through the code path of the CJK benchmark: classes are characters, samples
are faces. A tiny end-to-end run trains, every metric is finite and verification on
held-out characters beats chance; the data set's duplicates and split; the clear error
when no CJK font is found; bad arguments refused by name."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("PIL")
pytest.importorskip("fontTools")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from bench import glyph_data, tables, train_glyphs  # noqa: E402 - after the skips

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MPL_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
#: the tiny run's options: the Latin/Greek/Cyrillic set, the DejaVu Serif faces held out
DATA_ARGS = ["--charset", "latin-greek-cyrillic", "--holdout-families", "DejaVu Serif", "--heldout-chars", "0.3",
             "--verify-chars", "40", "--min-images", "4"]


@pytest.fixture(scope="module")
def fonts(tmp_path_factory) -> Path:
    """A directory with matplotlib's DejaVu and STIX General faces (links)."""
    folder = tmp_path_factory.mktemp("fonts")
    for path in sorted(MPL_FONTS.glob("DejaVu*.ttf")) + sorted(MPL_FONTS.glob("STIXGeneral*.ttf")):
        (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("glyph_cache")


@pytest.fixture(scope="module")
def tiny_run(fonts, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_glyphs")
    cmd = [sys.executable, str(ROOT / "bench" / "train_glyphs.py"), *DATA_ARGS, "--font-dir", str(fonts),
           "--cache-dir", str(cache), "--out", str(out), "--classes", "all", "--heads", "softmax,cosface,arcface",
           "--epochs", "3", "--batch", "64", "--width", "8", "--dim", "32", "--speed-steps", "0", "--jobs", "2",
           "--threads", "1", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = out.glob("train_glyphs_cpu_*.json")
    return path, json.loads(path.read_text()), proc.stdout


def test_tiny_run_trains_and_measures(tiny_run):
    path, data, stdout = tiny_run
    assert data["schema"] == train_glyphs.SCHEMA and data["kind"] == "train_glyphs"
    for key in ("date", "device", "versions", "command", "git", "load_average", "config", "data", "split", "heads",
                "runs", "equivalence", "timing"):
        assert key in data, key
    assert data["config"]["heads"] == ["softmax", "cosface", "arcface"] and data["timing"]["workers"] == 2
    assert data["data"]["cache"]["bytes"] > 0 and len(data["data"]["faces"]) >= 8
    split = data["split"]
    gallery = split["gallery_size"]
    assert [(r["head"], r["backend"]) for r in data["runs"]] == [
        ("softmax", "cpu"), ("cosface", "cpu"), ("arcface", "cpu"), ("arcface", "eager")]
    for run in data["runs"]:
        label = f"{run['label']} [{run['backend']}]"
        # it trains: no non-finite step, the loss falls
        assert run["nonfinite_loss_steps"] == 0 and run["nonfinite_grad_steps"] == 0, label
        assert run["loss_curve"][-1] < run["loss_curve"][0], label
        metrics = train_glyphs.run_metrics(run)
        for name, protocol in run["verification"].items():
            for point in protocol["tar_at_far"]:
                # a FAR below one impostor pair is not measurable; every other TAR is a number
                measurable = point["far"] * protocol["num_impostor"] >= 1
                assert (point["tar"] is not None) == measurable, (label, name, point)
        values = [v for v in metrics.values() if v is not None]
        assert len(values) >= 10 and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), (label, metrics)
        # better than chance on characters never trained on: random embeddings accept
        # genuine and impostor pairs alike (TAR = FAR, 50% pair accuracy, rank-1 = 1/gallery)
        assert metrics["tar_all_1e-03"] > 10 * 1e-3, (label, metrics)
        assert metrics["kfold_all"] > 0.6 and metrics["kfold_cross"] > 0.6, (label, metrics)
        assert metrics["rank_1"] > 5 / gallery, (label, metrics)
        assert sum(run["angle_hist"]["genuine"]) == run["verification"]["all"]["num_genuine"]
        assert sum(run["angle_hist"]["impostor"]) == run["verification"]["all"]["num_impostor"]
    same = data["equivalence"]
    # the same seed: the same first batch, so the same first loss; then rounding only
    assert same["head"] == "arcface" and same["first_loss_rel_diff"] < 1e-5
    assert len(same["first_steps_loss_rel_diff"]) == 10 and same["first_steps_loss_rel_diff"][1] < 1e-5
    assert same["loss_curve_max_rel_diff"] < 1e-2
    assert data["speed"] is None  # --speed-steps 0: test_training_step_speed measures it
    for key in ("plot_roc", "plot_angles", "plot_fonts", "plot_losses"):
        assert (path.parent / data[key]).stat().st_size > 0, key
    assert tables.glyphs_tables(data) in stdout and "| CosFace |" in stdout


SPEED_JOB = {"device": "cpu", "head": "arcface", "classes": 300, "dim": 16, "width": 4, "image_size": 16, "batch": 32,
             "threads": 1, "warmup": 1, "steps": 2}


def _check_speed(result):
    assert result["status"] == "ok", result
    assert len(result["step_ms"]["samples"]) == 2 and result["samples_per_s"] > 0
    assert result["peak_bytes"] >= result["before_bytes"] > 0 and result["step_peak_bytes"] >= 0


def test_training_step_speed_in_a_fresh_process():
    """The speed comparison's measurement, as it runs: a fresh process per backend."""
    [run] = train_glyphs.speed_comparison(SPEED_JOB, ["cpu"], timeout=300)
    assert run["backend"] == "cpu"
    _check_speed(run)


def test_training_step_speed_of_eager():
    threads = torch.get_num_threads()
    try:
        _check_speed(train_glyphs.worker_speed({**SPEED_JOB, "backend": "eager"}))
    finally:
        torch.set_num_threads(threads)


def test_missing_cjk_fonts_name_the_debian_packages(fonts, tmp_path):
    """A font directory without CJK faces: the error names the packages to install."""
    with pytest.raises(SystemExit) as error:
        train_glyphs.main(["--font-dir", str(fonts), "--cache-dir", str(tmp_path / "cache"), "--out",
                           str(tmp_path / "out"), "--no-progress"])
    message = str(error.value)
    assert "CJK Unified Ideographs" in message and "found 0 font face(s)" in message
    assert "apt-get install " + " ".join(glyph_data.DEBIAN_CJK_PACKAGES) in message
    assert "make glyphs INSTALL_FONTS=1" in message
    assert not (tmp_path / "out").exists()


def test_duplicate_and_placeholder_faces_are_dropped(fonts, tmp_path):
    """A copy of a face under another name looks the same: kept once. Matplotlib's Last
    Resort font draws one placeholder per script: dropped. Within a character, the
    images of the faces that draw it alike (none here) count once."""
    folder = tmp_path / "fonts"
    shutil.copytree(fonts, folder, symlinks=True)
    shutil.copy(MPL_FONTS / "DejaVuSans.ttf", folder / "ZZCopyOfDejaVuSans.ttf")
    shutil.copy(MPL_FONTS / "LastResortHE-Regular.ttf", folder)
    glyphs = glyph_data.load("latin-greek-cyrillic", 16, font_dirs=[folder], cache_dir=tmp_path / "cache",
                             min_images=4, progress=False)
    dropped = {d["face"]: d for d in glyphs.dropped_faces}
    [copy] = [d for d in dropped.values() if d["duplicate_of"] is not None]
    assert copy["duplicate_of"] == "DejaVu Sans Book" and copy["fraction"] == 1.0
    assert any(d["duplicate_of"] is None and "Last Resort" in name for name, d in dropped.items())
    assert len(glyphs.faces) == 16  # DejaVu Sans, Sans Mono and Serif (4 each), STIX General (4)
    # one sample per distinct image of a character
    images = glyphs.images(np.arange(glyphs.sample_char.size))
    for char in range(len(glyphs.codepoints)):
        mine = images[glyphs.sample_char == char].reshape(-1, 16 * 16)
        assert len(np.unique(mine, axis=0)) == len(mine)
    # a second load reads the cache: nothing rendered
    again = glyph_data.load("latin-greek-cyrillic", 16, font_dirs=[folder], cache_dir=tmp_path / "cache",
                            min_images=4, progress=False)
    assert again.cache["rendered_faces"] == 0 and np.array_equal(again.sample_char, glyphs.sample_char)


def test_names_give_design_and_style_families():
    cases = {
        "Noto Sans Mono CJK JP": ("Noto Sans CJK", "sans"), "Noto Serif CJK TC": ("Noto Serif CJK", "serif"),
        "AR PL UKai TW MBE": ("AR PL UKai", "kai"), "AR PL Mingti2L Big5": ("AR PL Mingti2L", "serif"),
        "AR PL SungtiL GB": ("AR PL SungtiL", "serif"), "WenQuanYi Zen Hei Sharp": ("WenQuanYi Zen Hei", "sans"),
        "IPAPGothic": ("IPA Gothic", "sans"), "IPAexMincho": ("IPA Mincho", "serif"), "HanaMinA": ("HanaMin", "serif"),
        "LXGW WenKai Mono": ("LXGW WenKai", "handwriting"), "Droid Sans Fallback": ("Droid Sans Fallback", "sans"),
        "STIXGeneral": ("STIXGeneral", "serif"), "cmr10": ("cmr10", "other"),
    }
    for family, (design, style) in cases.items():
        assert (glyph_data.design_family(family), glyph_data.style_family(family)) == (design, style), family


def test_split_keeps_what_measures_apart_from_what_trains(fonts, cache):
    glyphs = glyph_data.load("latin-greek-cyrillic", 32, font_dirs=[fonts], cache_dir=cache, min_images=4,
                             progress=False)
    split = train_glyphs.make_split(glyphs, classes=50, heldout_fraction=0.3, holdout_families=["DejaVu Serif"],
                                    verify_chars=30, closed_samples=10**6, seed=0)
    char, face = glyphs.sample_char, glyphs.sample_face
    held_faces = np.flatnonzero(split["held_faces"])
    assert {glyphs.faces[f].design for f in held_faces} == {"DejaVu Serif"}
    train_chars = set(char[split["train"]].tolist())
    assert len(train_chars) == 50 and split["train_labels"].max() == 49
    assert not np.isin(face[split["train"]], held_faces).any()
    # closed set: the training characters, in the held-out faces only
    assert set(char[split["closed"]].tolist()) <= train_chars and np.isin(face[split["closed"]], held_faces).all()
    # verification and gallery: characters never trained on, in every face
    verify_chars = set(char[split["verify"]].tolist())
    assert len(verify_chars) == 30 and not verify_chars & train_chars
    assert np.isin(face[split["verify"]], held_faces).any()
    gallery = char[split["gallery"]]
    assert len(set(gallery.tolist())) == gallery.size == split["num_heldout_chars"]
    assert not set(gallery.tolist()) & train_chars
    # every probe's character has a gallery image, and the probes exclude it
    assert verify_chars <= set(gallery.tolist()) and split["probe"].sum() == split["verify"].size - 30
    for name, pairs in split["pairs"].items():
        labels = split["verify_labels"]
        assert (labels[pairs["first"]] == labels[pairs["second"]]).tolist() == pairs["genuine"].tolist(), name
    groups = split["verify_groups"]
    assert (groups[split["pairs"]["cross"]["first"]] != groups[split["pairs"]["cross"]["second"]]).all()


def test_augmentation_is_seeded():
    # blocky images (8x8 pixel cells), which a small affine map and blur leave recognizable
    cells = torch.randint(0, 2, (8, 4, 4), generator=torch.Generator().manual_seed(0))
    images = (cells * 255).to(torch.uint8).repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    first = train_glyphs.augment(images, torch.Generator().manual_seed(5))
    again = train_glyphs.augment(images, torch.Generator().manual_seed(5))
    other = train_glyphs.augment(images, torch.Generator().manual_seed(6))
    assert first.shape == (8, 1, 32, 32) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    # the images survive it: each stays nearer its own original than the others'
    plain = train_glyphs._to_input(images).flatten(1)
    assert (torch.cdist(first.flatten(1), plain).argmin(dim=1) == torch.arange(8)).all()


@pytest.mark.parametrize(("argv", "message"), [
    (["--heads", "softmax,bogus"], "--heads: unknown ['bogus']"),
    (["--heads", "softmax"], "--compare-head 'arcface' is not among --heads"),
    (["--image-size", "30"], "--image-size must be a multiple of 8"),
    (["--heldout-chars", "1.0"], "--heldout-chars must lie in (0, 1)"),
    (["--classes", "100000"], "--classes must lie in [2, "),
    (["--classes", "all", "--verify-chars", "100000"], "--verify-chars must lie in [2, "),
    (["--holdout-families", "Comic Sans"], "--holdout-families Comic Sans: no face of these design families"),
    (["--backend", "nonsense"], "--backend 'nonsense'"),
])
def test_bad_arguments_are_refused_by_name(argv, message, fonts, cache, tmp_path):
    args = [*DATA_ARGS, "--font-dir", str(fonts), "--cache-dir", str(cache), "--out", str(tmp_path / "out"),
            "--no-progress", *argv]
    with pytest.raises(SystemExit) as error:
        train_glyphs.main(args)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()
