"""Printed characters as a face-recognition data set: a character is an identity, a font
face draws a photo of it. ``train_glyphs.py`` trains and measures on it.

* **Fonts.** The faces that draw a character set are found with fontconfig
  (``fc-list ':charset=4e00'`` for the CJK Unified Ideographs), or by scanning font
  directories (the usual ones where ``fc-list`` is missing, or those given). A face is
  used when its character map covers at least 5% of the set. Each face has a *design
  family* (its family name without regional, width and weight variants: the unit held
  out whole) and a *style* (sans, serif, kai, handwriting or other, from its name).
* **Rendering.** Pillow draws each character in white on black, centred by its ink box,
  with the em ``0.9 * size`` pixels, into a ``size x size`` uint8 image. Every face is
  rendered once and cached (one ``.npy`` per face) under the user's cache directory,
  keyed by the font file (path, face index, size, modification time), the image size,
  the character set and the rendering code's version.
* **Duplicates.** Faces whose renderings of a probe set look the same (at least 95% of
  the probe characters within a mean absolute difference of 8 grey levels: the Mono
  variants, the proportional IPA fonts against the fixed ones, WenQuanYi Zen Hei Sharp,
  regional forms that agree on nearly every character, as AR PL UKai's CN, HK and TW or
  Noto's JP and KR) are kept once, the first in name order; a face that draws most probe
  characters as one image (a placeholder font) is dropped. Within a character,
  byte-identical images from several faces (regional forms that agree) are kept once;
  characters whose images equal another character's in every face (homoglyphs such as
  Latin A, Greek Alpha and Cyrillic A) are kept once.

This module imports no torch: rendering runs in worker processes that need only Pillow,
fontTools and numpy.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Debian's packages of CJK fonts (about 300 MB): `make glyphs INSTALL_FONTS=1` installs them
DEBIAN_CJK_PACKAGES = (
    "fonts-noto-cjk", "fonts-arphic-ukai", "fonts-arphic-uming", "fonts-arphic-bkai00mp", "fonts-arphic-gkai00mp",
    "fonts-arphic-bsmi00lp", "fonts-arphic-gbsn00lp", "fonts-wqy-zenhei", "fonts-wqy-microhei",
    "fonts-ipafont-gothic", "fonts-ipafont-mincho", "fonts-ipaexfont-gothic", "fonts-ipaexfont-mincho",
    "fonts-hanazono", "fonts-droid-fallback", "fonts-lxgw-wenkai",
)


def _letters(*ranges: tuple[int, int]) -> tuple[int, ...]:
    return tuple(cp for lo, hi in ranges for cp in range(lo, hi + 1))


#: character sets by name: their code points, in order
CHARSETS: dict[str, tuple[int, ...]] = {
    # the CJK Unified Ideographs block: 20,992 code points
    "cjk": tuple(range(0x4E00, 0xA000)),
    # what the fonts matplotlib ships draw: Latin, Greek and Cyrillic letters
    "latin-greek-cyrillic": _letters((0x41, 0x5A), (0x61, 0x7A), (0x391, 0x3A1), (0x3A3, 0x3A9), (0x3B1, 0x3C9),
                                     (0x410, 0x44F)),
}
#: the code point fontconfig is asked for (``fc-list ':charset=HEX'``) per character set
FONTCONFIG_PROBE = {"cjk": 0x4E00, "latin-greek-cyrillic": 0x3B1}
#: the directories scanned where fontconfig is missing
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
             "/Library/Fonts", "/System/Library/Fonts", "~/Library/Fonts")
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")

#: bumped whenever rendering changes what a cached image holds
RENDER_VERSION = 1
#: the em size, as a fraction of the image side (CJK ink fills about 0.9 em)
EM_FRACTION = 0.9
#: a face is used when it draws at least this fraction of the character set
MIN_COVERAGE = 0.05
#: duplicate faces: images within this mean absolute difference (grey levels) look the same ...
SAME_LOOK_GREY_LEVELS = 8.0
#: ... and two faces are duplicates when at least this fraction of their common probe characters do
DUPLICATE_FRACTION = 0.95
#: probe characters per face for the duplicate test
PROBE_CHARS = 256


class NoFontsError(RuntimeError):
    """Too few fonts draw the character set."""


@dataclass(frozen=True)
class Face:
    """One font face: a file, the face's index in it (collections hold several), names."""

    path: str
    index: int
    family: str
    style: str

    @property
    def name(self) -> str:
        return f"{self.family} {self.style}".strip()

    @property
    def design(self) -> str:
        """The design family: the family name without regional, width and weight variants."""
        return design_family(self.family)

    @property
    def look(self) -> str:
        """The style family: 'handwriting', 'kai', 'serif', 'sans' or 'other'."""
        return style_family(self.family)


_VARIANT_WORDS = re.compile(r"\b(CN|HK|TW|MBE|JP|KR|SC|TC|GB|Big5|Mono|Sharp|Regular|Book|Light|Medium|Bold)\b")


def design_family(family: str) -> str:
    name = re.sub(r"^IPA(?:ex)?P?(Gothic|Mincho)$", r"IPA \1", family.strip())
    name = re.sub(r"^HanaMin[AB]$", "HanaMin", name)
    return re.sub(r"\s+", " ", _VARIANT_WORDS.sub(" ", name)).strip() or family


_STYLES = (("handwriting", r"WenKai|Hand|Brush|Script"), ("kai", r"Kai"),
           ("serif", r"Serif|Ming|Sung|Song|Mincho|HanaMin|STIX"), ("sans", r"Sans|Hei|Gothic"))


def style_family(family: str) -> str:
    return next((style for style, pattern in _STYLES if re.search(pattern, family)), "other")


# ---------------------------------------------------------------------------------
# Finding the faces.
# ---------------------------------------------------------------------------------


def _fontconfig_faces(probe: int) -> list[Face] | None:
    """The faces fontconfig lists as drawing ``probe``; None without fontconfig."""
    if shutil.which("fc-list") is None:
        return None
    try:
        done = subprocess.run(["fc-list", "--format", "%{file}\t%{index}\t%{family[0]}\t%{style[0]}\n",
                               f":charset={probe:x}"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    faces = []
    for line in done.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[1].isdigit():
            faces.append(Face(parts[0], int(parts[1]), parts[2], parts[3]))
    return faces


def _scanned_faces(directories: Sequence[str | Path]) -> list[Face]:
    """Every face of every font file below ``directories``, named from its name table."""
    from fontTools.ttLib import TTCollection, TTFont, TTLibError

    faces = []
    for directory in directories:
        root = Path(directory).expanduser()
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file()):
            try:
                count = len(TTCollection(path, lazy=True).fonts) if path.suffix.lower() in (".ttc", ".otc") else 1
                for index in range(count):
                    names = TTFont(path, fontNumber=index, lazy=True)["name"]
                    family = names.getDebugName(16) or names.getDebugName(1) or path.stem
                    style = names.getDebugName(17) or names.getDebugName(2) or ""
                    faces.append(Face(str(path), index, family, style))
            except (TTLibError, OSError, KeyError, AssertionError):
                continue  # not a font fontTools reads: skipped
    return faces


def coverage(face: Face, codepoints: Sequence[int]) -> np.ndarray:
    """Bool (len(codepoints),): whether the face's Unicode character map has each one."""
    from fontTools.ttLib import TTFont, TTLibError

    try:
        cmap = TTFont(face.path, fontNumber=face.index, lazy=True).getBestCmap() or {}
    except (TTLibError, OSError, KeyError, AssertionError):
        cmap = {}
    return np.fromiter((cp in cmap for cp in codepoints), dtype=bool, count=len(codepoints))


def missing_fonts_message(charset: str, found: int, where: str) -> str:
    if charset == "cjk":
        return (f"found {found} font face(s) drawing the CJK Unified Ideographs (U+4E00-U+9FFF) ({where}); at least "
                "2 are needed. On Debian or Ubuntu install them with\n"
                f"    apt-get install {' '.join(DEBIAN_CJK_PACKAGES)}\n"
                "(about 300 MB; as root, `make glyphs INSTALL_FONTS=1` installs them and runs the benchmark), "
                "or pass --font-dir DIR with CJK fonts.")
    return f"found {found} font face(s) drawing the character set {charset!r} ({where}); at least 2 are needed."


def find_faces(charset: str, font_dirs: Sequence[str | Path] | None = None) -> list[tuple[Face, np.ndarray]]:
    """The faces drawing at least :data:`MIN_COVERAGE` of the character set, each with its
    coverage; one per font file and face index (links resolved), in name order.
    ``font_dirs``: scan these directories instead of asking fontconfig. Raises
    :class:`NoFontsError` (naming Debian's packages for 'cjk') with fewer than two."""
    codepoints = CHARSETS[charset]
    if font_dirs:
        candidates, where = _scanned_faces(font_dirs), f"in {', '.join(str(d) for d in font_dirs)}"
    else:
        listed = _fontconfig_faces(FONTCONFIG_PROBE[charset])
        if listed is None:
            candidates, where = _scanned_faces(FONT_DIRS), "fontconfig missing; scanned " + ", ".join(FONT_DIRS)
        else:
            candidates, where = listed, f"fontconfig: fc-list ':charset={FONTCONFIG_PROBE[charset]:x}'"
    unique: dict[tuple[str, int], Face] = {}
    for face in candidates:
        real = os.path.realpath(face.path)
        unique.setdefault((real, face.index), Face(real, face.index, face.family, face.style))
    found = []
    for face in sorted(unique.values(), key=lambda f: (f.family, f.style, f.path, f.index)):
        drawn = coverage(face, codepoints)
        if drawn.mean() >= MIN_COVERAGE:
            found.append((face, drawn))
    if len(found) < 2:
        raise NoFontsError(missing_fonts_message(charset, len(found), where))
    return found


# ---------------------------------------------------------------------------------
# Rendering, in worker processes.
# ---------------------------------------------------------------------------------


def render(face: Face, codepoints: Sequence[int], size: int) -> np.ndarray:
    """uint8 (len(codepoints), size, size): each character white on black, its ink box
    centred (cut to ``size`` where larger); all zeros where the face draws no ink."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(face.path, max(round(EM_FRACTION * size), 1), index=face.index)
    canvas = Image.new("L", (2 * size, 2 * size), 0)
    draw = ImageDraw.Draw(canvas)
    out = np.zeros((len(codepoints), size, size), dtype=np.uint8)
    for i, cp in enumerate(codepoints):
        draw.rectangle((0, 0, 2 * size, 2 * size), fill=0)
        draw.text((size, size), chr(cp), fill=255, font=font, anchor="mm")
        box = canvas.getbbox()
        if box is None:
            continue
        ink = np.asarray(canvas.crop(box))
        h, w = ink.shape
        top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
        ink = ink[top:top + size, left:left + size]
        h, w = ink.shape
        out[i, (size - h) // 2:(size - h) // 2 + h, (size - w) // 2:(size - w) // 2 + w] = ink
    return out


def _render_task(face: dict[str, Any], codepoints: list[int], size: int) -> np.ndarray:
    return render(Face(**face), codepoints, size)


def _render_all(tasks: list[tuple[Face, list[int]]], size: int, jobs: int,
                on_done: Callable[[int, np.ndarray], None]) -> None:
    """Renders each (face, code points) task, in ``jobs`` worker processes when > 1;
    ``on_done(task index, images)`` as each finishes."""
    if jobs <= 1 or len(tasks) <= 1:
        for i, (face, cps) in enumerate(tasks):
            on_done(i, render(face, cps, size))
        return
    context = multiprocessing.get_context("spawn")  # the parent may run OpenMP threads (torch)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_render_task, asdict(face), cps, size): i for i, (face, cps) in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            on_done(futures[future], future.result())


# ---------------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$FUSED_MARGIN_CACHE/glyphs``, else ``$XDG_CACHE_HOME/fused_margin/glyphs``, else
    ``~/.cache/fused_margin/glyphs``."""
    if os.environ.get("FUSED_MARGIN_CACHE"):
        return Path(os.environ["FUSED_MARGIN_CACHE"]).expanduser() / "glyphs"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "fused_margin" / "glyphs"


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def face_key(face: Face, charset: str, size: int) -> str:
    stat = os.stat(face.path)
    return _digest(face.path, face.index, stat.st_size, stat.st_mtime_ns, charset, CHARSETS[charset], size,
                   EM_FRACTION, RENDER_VERSION)


# ---------------------------------------------------------------------------------
# The data set.
# ---------------------------------------------------------------------------------


@dataclass
class GlyphSet:
    """Every image of the data set: the faces kept, the characters kept (code points), and
    one sample per distinct (character, face) image.

    ``sample_char`` (N,) int32 indexes ``codepoints``, ``sample_face`` (N,) int16 indexes
    ``faces``. :meth:`images` reads samples from the per-face cache files (memory-mapped).
    """

    charset: str
    size: int
    faces: list[Face]
    codepoints: np.ndarray
    sample_char: np.ndarray
    sample_face: np.ndarray
    dropped_faces: list[dict[str, Any]]
    cache: dict[str, Any]
    _arrays: list[np.ndarray] = field(repr=False)
    _rows: list[np.ndarray] = field(repr=False)  # per face: row of each kept character in its array, -1 where absent

    def images(self, samples: np.ndarray) -> np.ndarray:
        """uint8 (len(samples), size, size)."""
        samples = np.asarray(samples)
        out = np.empty((samples.size, self.size, self.size), dtype=np.uint8)
        faces = self.sample_face[samples]
        for f in np.unique(faces):
            mine = np.flatnonzero(faces == f)
            rows = self._rows[f][self.sample_char[samples[mine]]]
            order = np.argsort(rows)  # sequential reads of the memory map
            out[mine[order]] = self._arrays[f][rows[order]]
        return out

    def describe(self) -> dict[str, Any]:
        per_char = np.bincount(self.sample_char, minlength=len(self.codepoints))
        return {
            "charset": self.charset, "image_size": self.size, "characters": int(len(self.codepoints)),
            "images": int(self.sample_char.size),
            "images_per_character": {"min": int(per_char.min()), "median": float(np.median(per_char)),
                                     "max": int(per_char.max())},
            "faces": [{"name": f.name, "family": f.family, "style": f.style, "design": f.design, "look": f.look,
                       "file": os.path.basename(f.path), "index": f.index,
                       "images": int((self.sample_face == i).sum())} for i, f in enumerate(self.faces)],
            "dropped_faces": self.dropped_faces, "cache": self.cache,
        }


def _image_hashes(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint64 hash of each image (N, S, S): a random linear form of its bytes, mod 2^64."""
    flat = images.reshape(len(images), -1)
    padded = np.zeros((len(flat), -(-flat.shape[1] // 8) * 8), dtype=np.uint8)
    padded[:, :flat.shape[1]] = flat
    words = padded.view(np.uint64)
    weights = np.random.default_rng(seed).integers(1, 2**63, size=words.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (words * weights).sum(axis=1, dtype=np.uint64)


def _duplicates(probes: list[np.ndarray], drawn: list[np.ndarray]) -> dict[int, tuple[int | None, float]]:
    """Faces to drop: face -> (the earlier face it duplicates, fraction alike), or
    (None, fraction of distinct probe images) for a placeholder font."""
    dropped: dict[int, tuple[int | None, float]] = {}
    kept: list[int] = []
    for j, (images, has) in enumerate(zip(probes, drawn, strict=True)):
        inked = has & (images.reshape(len(images), -1).max(axis=1) > 0)
        distinct = np.unique(_image_hashes(images[inked])).size / max(int(inked.sum()), 1)
        if distinct < 0.5:
            dropped[j] = (None, distinct)
            continue
        for i in kept:
            both = inked & drawn[i] & (probes[i].reshape(len(images), -1).max(axis=1) > 0)
            if both.sum() < 16:
                continue
            diff = np.abs(images[both].astype(np.int16) - probes[i][both].astype(np.int16)).mean(axis=(1, 2))
            alike = float((diff <= SAME_LOOK_GREY_LEVELS).mean())
            if alike >= DUPLICATE_FRACTION:
                dropped[j] = (i, alike)
                break
        else:
            kept.append(j)
    return dropped


def load(charset: str = "cjk", size: int = 32, *, font_dirs: Sequence[str | Path] | None = None,
         cache_dir: Path | None = None, min_images: int = 10, jobs: int = 1, cache_limit_bytes: int | None = 2**30,
         progress: bool = True) -> GlyphSet:
    """The data set: faces found, deduplicated, rendered (or read from the cache), and the
    characters with at least ``min_images`` distinct images. ``cache_limit_bytes``: refuse
    to render more than this (pick a smaller ``size``)."""
    if charset not in CHARSETS:
        raise ValueError(f"charset must be one of {sorted(CHARSETS)}, got {charset!r}")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = find_faces(charset, font_dirs)
    codepoints = np.asarray(CHARSETS[charset])
    faces = [face for face, _ in found]
    drawn = [has for _, has in found]
    keys = [face_key(face, charset, size) for face in faces]

    # duplicate faces, from the probe set (the verdict is cached with the faces' keys)
    index_path = cache_dir / f"index-{_digest(keys, PROBE_CHARS, SAME_LOOK_GREY_LEVELS, DUPLICATE_FRACTION)}.json"
    if index_path.is_file():
        dropped = {int(k): tuple(v) for k, v in json.loads(index_path.read_text())["dropped"].items()}
    else:
        probe_at = np.sort(np.random.default_rng(0).choice(len(codepoints), min(PROBE_CHARS, len(codepoints)),
                                                           replace=False))
        probe_cps = codepoints[probe_at].tolist()
        probes: list[np.ndarray] = [np.empty(0)] * len(faces)

        def keep_probe(i: int, images: np.ndarray) -> None:
            probes[i] = images

        _render_all([(face, probe_cps) for face in faces], size, jobs, keep_probe)
        dropped = _duplicates(probes, [has[probe_at] for has in drawn])
        cache_dir.mkdir(parents=True, exist_ok=True)
        index_path.write_text(json.dumps({"faces": [asdict(f) for f in faces], "dropped": dropped}))
    dropped_faces = [{"face": faces[j].name, "duplicate_of": faces[i].name if i is not None else None,
                      "fraction": round(fraction, 4),
                      "reason": "looks the same" if i is not None else "draws one image for most characters"}
                     for j, (i, fraction) in sorted(dropped.items())]
    keep = [j for j in range(len(faces)) if j not in dropped]
    faces, drawn, keys = [faces[j] for j in keep], [drawn[j] for j in keep], [keys[j] for j in keep]

    # render what the cache lacks
    paths = [cache_dir / "faces" / f"{key}.npy" for key in keys]
    todo = [j for j, path in enumerate(paths) if not path.is_file()]
    total = sum(int(h.sum()) for h in drawn) * size * size
    if todo and cache_limit_bytes is not None and total > cache_limit_bytes:
        raise ValueError(f"the rendered faces would take {total / 2**30:.2f} GiB of cache at {size}x{size}, over the "
                         f"limit of {cache_limit_bytes / 2**30:.2f} GiB: pick a smaller image size")
    if todo:
        _render_faces(faces, drawn, codepoints, paths, todo, size, jobs, progress)
    arrays = [np.load(path, mmap_mode="r") for path in paths]
    rows = []
    for has in drawn:
        row = np.full(len(codepoints), -1, dtype=np.int64)
        row[has] = np.arange(int(has.sum()))
        rows.append(row)

    # distinct images per character (an image with no ink counts as not drawn)
    chars, face_of, hashes = [], [], []
    for f, (array, has) in enumerate(zip(arrays, drawn, strict=True)):
        inked = array.reshape(len(array), -1).max(axis=1) > 0
        chars.append(np.flatnonzero(has)[inked])
        face_of.append(np.full(int(inked.sum()), f, dtype=np.int16))
        hashes.append(_image_hashes(np.asarray(array)[inked]))
    char_all, face_all, hash_all = np.concatenate(chars), np.concatenate(face_of), np.concatenate(hashes)
    order = np.lexsort((face_all, hash_all, char_all))  # by character, image, then face: the first face is kept
    char_all, face_all, hash_all = char_all[order], face_all[order], hash_all[order]
    first = np.r_[True, (char_all[1:] != char_all[:-1]) | (hash_all[1:] != hash_all[:-1])]
    char_all, face_all, hash_all = char_all[first], face_all[first], hash_all[first]
    # homoglyphs: characters with the same images in the same faces are kept once
    with np.errstate(over="ignore"):
        face_weight = np.random.default_rng(1).integers(1, 2**63, size=len(faces), dtype=np.uint64) | np.uint64(1)
        signature = np.zeros(len(codepoints), dtype=np.uint64)
        np.add.at(signature, char_all, hash_all * face_weight[face_all])
    per_char = np.bincount(char_all, minlength=len(codepoints))
    eligible = per_char >= min_images
    _, first_of_signature = np.unique(signature, return_index=True)
    unique_char = np.zeros(len(codepoints), dtype=bool)
    unique_char[first_of_signature] = True
    eligible &= unique_char | (per_char == 0)
    kept_chars = np.flatnonzero(eligible)
    new_index = np.full(len(codepoints), -1, dtype=np.int64)
    new_index[kept_chars] = np.arange(len(kept_chars))
    mine = eligible[char_all]
    sample_char = new_index[char_all[mine]].astype(np.int32)
    sample_face = face_all[mine]
    order = np.lexsort((sample_face, sample_char))
    cache_bytes = sum(path.stat().st_size for path in paths)
    return GlyphSet(charset=charset, size=size, faces=faces, codepoints=codepoints[kept_chars],
                    sample_char=sample_char[order], sample_face=sample_face[order], dropped_faces=dropped_faces,
                    cache={"directory": str(cache_dir), "bytes": cache_bytes, "rendered_faces": len(todo)},
                    _arrays=arrays, _rows=[row[kept_chars] for row in rows])


def _render_faces(faces: list[Face], drawn: list[np.ndarray], codepoints: np.ndarray, paths: list[Path],
                  todo: list[int], size: int, jobs: int, progress: bool) -> None:
    """Renders the faces ``todo`` in chunks (so that the workers stay busy and the bar
    moves), each face's images written to its cache file once complete."""
    from tqdm import tqdm

    chunk = 2048
    tasks, owner = [], []
    for j in todo:
        cps = codepoints[drawn[j]].tolist()
        for start in range(0, len(cps), chunk):
            tasks.append((faces[j], cps[start:start + chunk]))
            owner.append((j, start))
    parts: dict[int, dict[int, np.ndarray]] = {j: {} for j in todo}
    expected = {j: int(drawn[j].sum()) for j in todo}
    bar = tqdm(total=sum(expected.values()), desc="render", unit="glyph", unit_scale=True, disable=not progress)

    def done(i: int, images: np.ndarray) -> None:
        j, start = owner[i]
        parts[j][start] = images
        bar.update(len(images))
        if sum(len(p) for p in parts[j].values()) == expected[j]:
            array = np.concatenate([parts[j][s] for s in sorted(parts[j])]) if parts[j] else \
                np.zeros((0, size, size), np.uint8)
            paths[j].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[j].with_name(paths[j].stem + ".tmp.npy")
            np.save(tmp, array)
            os.replace(tmp, paths[j])  # a reader (or a kill) never sees half a file
            del parts[j]

    _render_all(tasks, size, jobs, done)
    bar.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.glyph_data --debian-packages``: the package list (for the Makefile)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--debian-packages", action="store_true", help="print Debian's CJK font packages")
    args = p.parse_args(argv)
    if args.debian_packages:
        print(" ".join(DEBIAN_CJK_PACKAGES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
