"""Synthetic captioned-image shards for tests and the demo.

Each image is one saturated shape (colour x shape x size x position) on a muted plain or
textured background; its caption names what is drawn in varied wording, so a tiny CLIP can
learn the image-text mapping in minutes on CPU. Output mirrors img2dataset:

    OUT/train/00000.tar          KEY.jpg, KEY.txt, KEY.json per sample (KEY = 9-digit counter)
    OUT/train/00000_stats.json   count / successes per shard
    OUT/zeroshot/c000/*.jpg      ImageFolder layout, one folder per "colour shape" class
    OUT/zeroshot/classnames.json class names in index order
    OUT/zeroshot/templates.json  open_clip-style prompt templates with "{}"
    OUT/zeroshot/objects.json    where every shape of every image is (rebuilds its mask)
    OUT/layout/...               the same for two-object scenes whose class is their layout
                                 ("circle left of a star": what pooling keeps shows there)
    OUT/classify/train/00000.tar class-labelled shards (``--task classify``): KEY.jpg, KEY.cls
                                 (the class index of "colour on background", 56 classes),
                                 KEY.json
    OUT/classify/val/c000/*.jpg  its validation split as a class-folder tree (classnames.json)
    OUT/classify/val_shards/     the same validation images as ``cls`` shards
    OUT/dataset.json             summary, written last (a complete dataset has one)

A share of the training images (``pair_prob``) are such two-object scenes, captioned with
their layout; each sample's JSON records its objects (shape, centre, radius, angle), from
which :func:`object_mask` redraws the exact mask.

Every sample is drawn from its own RNG seeded by (seed, split, index), so content does not
depend on shard size and the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 20),
    "purple": (135, 45, 195),
    "orange": (250, 135, 10),
    "cyan": (10, 205, 220),
    "pink": (250, 115, 190),
}
SIZES: dict[str, tuple[float, float]] = {
    # Radius as a fraction of the image side; gaps between buckets keep them separable. Even
    # "small" spans about three 8 px patches at 64 px: smaller, corners and spikes blur away.
    "small": (0.17, 0.20),
    "medium": (0.23, 0.26),
    "large": (0.29, 0.33),
}
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    # Muted on purpose: far from every shape colour, so the object always stands out.
    "gray": (128, 128, 128),
    "white": (236, 236, 232),
    "black": (24, 24, 28),
    "beige": (214, 200, 170),
}
TEXTURED_BACKGROUNDS: tuple[str, ...] = ("striped", "checkered", "noisy")
BACKGROUNDS: tuple[str, ...] = tuple(PLAIN_BACKGROUNDS) + TEXTURED_BACKGROUNDS

ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a drawing of a {}.",
    "a {} on a plain background.",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a small {}.",
    "a large {}.",
    "a {} in the center.",
)

LAYOUT_TEMPLATES: tuple[str, ...] = (
    "a {}.",
    "a drawing of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
)

TEXTURED_PROB = 0.3  # share of training images on a striped/checkered/noisy background
MIN_BG_DISTANCE = 100.0  # RGB distance shape <-> background mean; resampled below this
JPEG_QUALITY = 90
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-reduced: anti-aliased edges at 64 px
TAR_MTIME = 1_700_000_000  # fixed tar header time, so shards are byte-identical per seed
PAIR_PROB = 0.2  # share of training images that are two-object layout scenes
# RNG streams: the pair decision has its own, so single-shape samples are what they always were.
_TRAIN_SPLIT, _ZEROSHOT_SPLIT, _PAIR_CHOICE, _LAYOUT_SPLIT, _CLASSIFY_TRAIN, _CLASSIFY_VAL = 0, 1, 2, 3, 4, 5
_SHARD_RE = re.compile(r"^\d{5}(\.tar|_stats\.json)$")


def classnames() -> list[str]:
    """Zero-shot class names, colour-major: index = colour_idx * len(SHAPES) + shape_idx."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


def layout_classnames() -> list[str]:
    """Layout classes: ordered pairs of different shapes, ``"circle left of a star"``."""
    return [f"{a} left of a {b}" for a in SHAPES for b in SHAPES if a != b]


@dataclass(frozen=True)
class SampleSpec:
    """What one image shows; everything the caption and the json metadata are built from."""

    shape: str
    color: str
    size: str
    position: str
    background: str
    distractor: dict | None = None

    @property
    def class_index(self) -> int:
        return list(COLORS).index(self.color) * len(SHAPES) + SHAPES.index(self.shape)


def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, split, index]))


def _pick(rng: np.random.Generator, options: Sequence) -> object:
    return options[int(rng.integers(len(options)))]


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + d, 0, 255))


# ----------------------------------------------------------------------------- drawing


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Polygon vertices of ``shape`` with circumradius ~``r``, rotated by ``angle`` radians."""
    if shape == "square":
        # Half-side 0.8 r keeps its area close to the other shapes at the same size.
        h = 0.8 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "diamond":
        # Taller than wide, so a slightly rotated square never reads as a diamond.
        pts = [(0.0, -r), (0.68 * r, 0.0), (0.0, r), (-0.68 * r, 0.0)]
    elif shape == "triangle":
        # Equilateral, pointing up, centred on its bounding box rather than its centroid.
        pts = [(0.0, -r), (0.95 * r, 0.75 * r), (-0.95 * r, 0.75 * r)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        w = 0.32 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
               (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _shape_alpha(size: int, shape: str, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """Anti-aliased coverage (``L`` image, 0-255) of one shape: drawn at SUPERSAMPLE x, reduced."""
    n = size * SUPERSAMPLE
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    s = SUPERSAMPLE
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        draw.polygon([(x * s, y * s) for x, y in _shape_points(shape, cx, cy, r, angle)], fill=255)
    return mask.reduce(s)


def _draw_shape(img: Image.Image, shape: str, rgb: tuple, cx: float, cy: float, r: float,
                angle: float, objects: list[dict] | None = None) -> None:
    """Paint an anti-aliased shape onto ``img`` in place; record it in ``objects``."""
    img.paste(rgb, None, _shape_alpha(img.width, shape, cx, cy, r, angle))
    if objects is not None:
        objects.append({"shape": shape, "cx": round(cx, 4), "cy": round(cy, 4), "r": round(r, 4),
                        "angle": round(angle, 6)})


def object_mask(objects: Sequence[dict], image_size: int) -> np.ndarray:
    """(H, W) bool: pixels covered (more than half) by any recorded object."""
    cover = np.zeros((image_size, image_size), dtype=np.uint8)
    for o in objects:
        alpha = np.asarray(_shape_alpha(image_size, o["shape"], o["cx"], o["cy"], o["r"], o["angle"]))
        cover = np.maximum(cover, alpha)
    return cover > 127


def patch_labels(objects: Sequence[dict], image_size: int, patch_size: int) -> np.ndarray:
    """(rows * cols,) bool in raster order: the patch lies mostly on a shape (else background)."""
    mask = object_mask(objects, image_size)
    g = image_size // patch_size
    cells = mask[: g * patch_size, : g * patch_size].reshape(g, patch_size, g, patch_size)
    return (cells.mean(axis=(1, 3)) > 0.5).reshape(-1)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _background(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    """A plain muted colour or a low-saturation texture (never a saturated shape colour)."""
    if kind in PLAIN_BACKGROUNDS:
        return Image.new("RGB", (size, size), _jitter(rng, PLAIN_BACKGROUNDS[kind], 8))
    tint = rng.integers(-8, 9, size=3)
    dark = np.clip(int(rng.integers(70, 111)) + tint, 0, 255)
    light = np.clip(int(rng.integers(150, 206)) + tint, 0, 255)
    x, y = _grid(size)
    if kind == "striped":
        theta = float(_pick(rng, (0.0, 0.25, 0.5, 0.75))) * math.pi
        period = float(rng.uniform(0.1, 0.2)) * size
        t = (x * math.cos(theta) + y * math.sin(theta)) / period + rng.uniform(0, 1)
        sel = (np.floor(t * 2) % 2).astype(bool)
    elif kind == "checkered":
        cell = int(rng.integers(max(2, size // 12), max(3, size // 6) + 1))
        sel = ((x // cell + y // cell) % 2).astype(bool)
    elif kind == "noisy":
        base = (dark + light) / 2
        noise = rng.normal(0.0, 32.0, size=(size, size, 1))  # luminance noise keeps it muted
        return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    else:
        raise ValueError(f"unknown background {kind!r}")
    arr = np.where(sel[..., None], light, dark).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _placement(rng: np.random.Generator, size_name: str, position: str, image_size: int,
               shrink: float = 1.0) -> tuple[float, float, float]:
    """Centre and radius for a shape so it lies fully inside the image at ``position``."""
    lo, hi = SIZES[size_name]
    r = float(rng.uniform(lo, hi)) * image_size * shrink
    margin, jit = 0.03 * image_size, 0.05 * image_size

    def coord(side: str) -> float:
        if side in ("left", "top"):
            return margin + r + float(rng.uniform(0, jit))
        if side in ("right", "bottom"):
            return image_size - margin - r - float(rng.uniform(0, jit))
        return image_size / 2 + float(rng.uniform(-jit, jit))

    vert, horiz = position.split() if " " in position else ("center", "center")
    return coord(horiz), coord(vert), r


def _color_distance(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def sample_spec(rng: np.random.Generator, distractor_prob: float = 0.0,
                shape: str | None = None, color: str | None = None) -> SampleSpec:
    """Draw the attributes of one image (``shape``/``color`` fixed for the zero-shot split)."""
    shape = shape or str(_pick(rng, SHAPES))
    color = color or str(_pick(rng, list(COLORS)))
    position = str(_pick(rng, POSITIONS))
    textured = rng.random() < TEXTURED_PROB
    background = str(_pick(rng, TEXTURED_BACKGROUNDS if textured else list(PLAIN_BACKGROUNDS)))
    distractor = None
    if rng.random() < distractor_prob:
        # Keep the main object dominant: it is medium/large, the distractor is half "small",
        # sits in a different corner and has another shape and colour.
        size = str(_pick(rng, ("medium", "large")))
        corners = [p for p in POSITIONS if p not in (position, "center")]
        distractor = {
            "shape": str(_pick(rng, [s for s in SHAPES if s != shape])),
            "color": str(_pick(rng, [c for c in COLORS if c != color])),
            "position": str(_pick(rng, corners)),
        }
    else:
        size = str(_pick(rng, list(SIZES)))
    return SampleSpec(shape, color, size, position, background, distractor)


def _backdrop(rng: np.random.Generator, kind: str, image_size: int, *rgbs: tuple) -> Image.Image:
    for _ in range(8):  # resample a texture that happens to sit too close to a shape colour
        bg = _background(rng, kind, image_size)
        mean = np.asarray(bg).reshape(-1, 3).mean(0)
        if min(_color_distance(mean, rgb) for rgb in rgbs) >= MIN_BG_DISTANCE:
            break
    return bg


def render_with_objects(rng: np.random.Generator, spec: SampleSpec,
                        image_size: int) -> tuple[Image.Image, list[dict]]:
    """Draw ``spec`` as an RGB image of ``image_size`` x ``image_size``; also return where
    each shape went (in drawing order: the main shape last, on top)."""
    rgb = _jitter(rng, COLORS[spec.color], 12)
    bg = _backdrop(rng, spec.background, image_size, rgb)
    objects: list[dict] = []
    if spec.distractor is not None:
        d = spec.distractor
        cx, cy, r = _placement(rng, "small", d["position"], image_size, shrink=0.5)
        _draw_shape(bg, d["shape"], _jitter(rng, COLORS[d["color"]], 12), cx, cy, r,
                    float(rng.uniform(-0.2, 0.2)), objects)
    cx, cy, r = _placement(rng, spec.size, spec.position, image_size)
    # Small rotations only: a square turned by 45 degrees would be a diamond.
    _draw_shape(bg, spec.shape, rgb, cx, cy, r, float(rng.uniform(-0.2, 0.2)), objects)
    return bg, objects


def render(rng: np.random.Generator, spec: SampleSpec, image_size: int) -> Image.Image:
    """Draw ``spec`` as an RGB image of ``image_size`` x ``image_size``."""
    return render_with_objects(rng, spec, image_size)[0]


@dataclass(frozen=True)
class PairSpec:
    """A two-object layout scene: one shape in the left half, another in the right half."""

    left_shape: str
    left_color: str
    right_shape: str
    right_color: str
    background: str

    @property
    def classname(self) -> str:
        return f"{self.left_shape} left of a {self.right_shape}"

    @property
    def class_index(self) -> int:
        return layout_classnames().index(self.classname)


def pair_spec(rng: np.random.Generator, left_shape: str | None = None,
              right_shape: str | None = None) -> PairSpec:
    left_shape = left_shape or str(_pick(rng, SHAPES))
    right_shape = right_shape or str(_pick(rng, [s for s in SHAPES if s != left_shape]))
    left_color = str(_pick(rng, list(COLORS)))
    right_color = str(_pick(rng, [c for c in COLORS if c != left_color]))
    background = str(_pick(rng, list(PLAIN_BACKGROUNDS)))
    return PairSpec(left_shape, left_color, right_shape, right_color, background)


def render_pair(rng: np.random.Generator, spec: PairSpec, image_size: int) -> tuple[Image.Image, list[dict]]:
    """Two small shapes side by side (left one first in ``objects``)."""
    rgbs = [_jitter(rng, COLORS[c], 12) for c in (spec.left_color, spec.right_color)]
    bg = _backdrop(rng, spec.background, image_size, *rgbs)
    objects: list[dict] = []
    for side, shape, rgb in ((0.25, spec.left_shape, rgbs[0]), (0.75, spec.right_shape, rgbs[1])):
        lo, hi = SIZES["small"]
        r = float(rng.uniform(lo, hi)) * image_size
        cx = (side + float(rng.uniform(-0.02, 0.02))) * image_size
        cy = float(rng.uniform(0.35, 0.65)) * image_size
        _draw_shape(bg, shape, rgb, cx, cy, r, float(rng.uniform(-0.2, 0.2)), objects)
    return bg, objects


def pair_caption(rng: np.random.Generator, spec: PairSpec) -> str:
    """A varied description of a pair scene that always says which shape is on which side."""
    colored = rng.random() < 0.6
    left = f"{spec.left_color} {spec.left_shape}" if colored else spec.left_shape
    right = f"{spec.right_color} {spec.right_shape}" if colored else spec.right_shape
    style = int(rng.integers(4))
    if style == 0:
        text = f"{_article(left)} {left} {_pick(rng, ('left of', 'to the left of'))} {_article(right)} {right}"
    elif style == 1:
        text = f"{_article(right)} {right} {_pick(rng, ('right of', 'to the right of'))} {_article(left)} {left}"
    elif style == 2:
        text = f"{_article(left)} {left} on the left and {_article(right)} {right} on the right"
    else:
        text = f"on the left {_article(left)} {left}, on the right {_article(right)} {right}"
    prefix = str(_pick(rng, _PREFIXES))
    text = f"{prefix} {text}" if prefix else text
    if rng.random() < 0.4:
        text += "."
    return text


# ----------------------------------------------------------------------------- captions

_PREFIXES = ("", "", "a drawing of", "a picture of", "an image of", "a photo of", "there is",
             "an illustration of", "a simple drawing of", "a rendering of")
_SIZE_WORDS = {"small": ("small", "small", "little"), "medium": ("medium", "medium-sized"),
               "large": ("large", "large", "big")}
_POS_WORDS = {
    "top left": ("top left", "top left corner", "upper left"),
    "top right": ("top right", "top right corner", "upper right"),
    "bottom left": ("bottom left", "bottom left corner", "lower left"),
    "bottom right": ("bottom right", "bottom right corner", "lower right"),
    "center": ("center", "middle", "centre"),
}
_BG_WORDS = {"gray": ("gray", "grey"), "white": ("white",), "black": ("black",),
             "beige": ("beige",), "striped": ("striped",), "checkered": ("checkered",),
             "noisy": ("noisy", "grainy")}


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption(rng: np.random.Generator, spec: SampleSpec) -> str:
    """A varied description of ``spec`` that always names its colour and shape."""
    size = str(_pick(rng, _SIZE_WORDS[spec.size])) if rng.random() < 0.6 else None
    pos = str(_pick(rng, _POS_WORDS[spec.position])) if rng.random() < 0.5 else None
    bg = str(_pick(rng, _BG_WORDS[spec.background])) if rng.random() < 0.5 else None
    pos_phrase = None
    if pos is not None:
        prep = "in the" if spec.position != "center" or rng.random() < 0.7 else "at the"
        pos_phrase = f"{prep} {pos}"
    bg_phrase = f"{_pick(rng, ('on', 'against'))} a {bg} background" if bg else None
    style = int(rng.integers(5))
    if style == 0:
        # Comma list, optional attributes in random order: "red circle, small, top left".
        extras = [x for x in (size, pos, f"{bg} background" if bg else None) if x]
        rng.shuffle(extras)
        text = ", ".join([f"{spec.color} {spec.shape}", *extras])
    elif style == 1:
        # Shape before colour: "a small circle colored red in the top left".
        head = f"{size} {spec.shape}" if size else spec.shape
        verb = str(_pick(rng, ("colored", "coloured", "that is", "in")))
        tail = [x for x in (pos_phrase, bg_phrase) if x]
        rng.shuffle(tail)
        text = " ".join([_article(head), head, verb, spec.color, *tail])
    elif style == 2 and (pos_phrase or bg_phrase):
        # Context first: "on a gray background, a red circle in the center".
        lead, rest = (pos_phrase, bg_phrase) if pos_phrase and (
            not bg_phrase or rng.random() < 0.5) else (bg_phrase, pos_phrase)
        noun = " ".join(x for x in (size, spec.color, spec.shape) if x)
        text = " ".join(x for x in (f"{lead},", _article(noun), noun, rest) if x)
    else:
        # Plain sentence: "a drawing of a large red circle in the top left on a gray background".
        noun = " ".join(x for x in (size, spec.color, spec.shape) if x)
        tail = [x for x in (pos_phrase, bg_phrase) if x]
        rng.shuffle(tail)
        prefix = str(_pick(rng, _PREFIXES))
        text = " ".join(x for x in (prefix, _article(noun), noun, *tail) if x)
    if rng.random() < 0.4:
        text += "."
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text


# ----------------------------------------------------------------------------- writing


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: with 4:2:0 a small shape's colour bleeds into the background at 64 px.
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def make_train_sample(seed: int, index: int, image_size: int, distractor_prob: float = 0.1,
                      pair_prob: float = PAIR_PROB) -> tuple[bytes, str, dict]:
    """JPEG bytes, caption and img2dataset-style metadata of training sample ``index``."""
    rng = _rng(seed, _TRAIN_SPLIT, index)
    if _rng(seed, _PAIR_CHOICE, index).random() < pair_prob:
        pair = pair_spec(rng)
        img, objects = render_pair(rng, pair, image_size)
        text = pair_caption(rng, pair)
        described = {"kind": "pair", **asdict(pair), "classname": pair.classname,
                     "class_index": pair.class_index}
    else:
        spec = sample_spec(rng, distractor_prob)
        img, objects = render_with_objects(rng, spec, image_size)
        text = caption(rng, spec)
        described = {"kind": "single", **asdict(spec), "class_index": spec.class_index,
                     "classname": f"{spec.color} {spec.shape}"}
    jpg = _jpeg(img)
    key = f"{index:09d}"
    meta = {
        "url": None,
        "key": key,
        "status": "success",
        "error_message": None,
        "caption": text,
        "width": image_size,
        "height": image_size,
        "original_width": image_size,
        "original_height": image_size,
        "sha256": hashlib.sha256(jpg).hexdigest(),
        **described,
        "objects": objects,
    }
    return jpg, text, meta


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uname = info.gname = "bigdata"  # what webdataset's TarWriter writes
    tar.addfile(info, io.BytesIO(data))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_shard(path: Path, seed: int, start: int, count: int, image_size: int,
                 distractor_prob: float, pair_prob: float) -> None:
    """Write one tar under a temp name and rename it, so a crash never leaves a partial shard."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, start + count):
                jpg, text, meta = make_train_sample(seed, index, image_size, distractor_prob, pair_prob)
                key = meta["key"]
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.txt", text.encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    stats = {"count": count, "successes": count, "failed_to_download": 0,
             "failed_to_resize": 0, "status_dict": {"success": count}}
    _atomic_write(path.with_name(f"{path.stem}_stats.json"),
                  json.dumps(stats, indent=2).encode("utf-8"))


def _zeroshot_image(seed: int, ci: int, k: int, image_size: int) -> tuple[Image.Image, list[dict]]:
    color, shape = classnames()[ci].split(" ")
    # Index by (class, k): disjoint from the train stream through the split id.
    rng = _rng(seed, _ZEROSHOT_SPLIT, ci * 1_000_000 + k)
    return render_with_objects(rng, sample_spec(rng, 0.0, shape=shape, color=color), image_size)


def _layout_image(seed: int, ci: int, k: int, image_size: int) -> tuple[Image.Image, list[dict]]:
    left, right = layout_classnames()[ci].split(" left of a ")
    rng = _rng(seed, _LAYOUT_SPLIT, ci * 1_000_000 + k)
    return render_pair(rng, pair_spec(rng, left, right), image_size)


def _write_class_split(out: Path, names: list[str], templates: Sequence[str], draw, seed: int,
                       per_class: int, image_size: int) -> int:
    """Write a class-folder split (with ``objects.json``) into a temp dir, then swap it in."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    objects: dict[str, list[dict]] = {}
    for ci in range(len(names)):
        folder = tmp / f"c{ci:03d}"
        folder.mkdir()
        for k in range(per_class):
            img, objs = draw(seed, ci, k, image_size)
            (folder / f"{k:05d}.jpg").write_bytes(_jpeg(img))
            objects[f"c{ci:03d}/{k:05d}.jpg"] = objs
    (tmp / "classnames.json").write_text(json.dumps(names, indent=1) + "\n")
    (tmp / "templates.json").write_text(json.dumps(list(templates), indent=1) + "\n")
    (tmp / OBJECTS_FILE).write_text(json.dumps({"image_size": image_size, "objects": objects}) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return per_class * len(names)


OBJECTS_FILE = "objects.json"


def read_objects(split_dir: str | os.PathLike) -> dict | None:
    """A split's ``objects.json`` (``{"image_size", "objects": {relpath: [object, ...]}}``), or
    ``None`` for a split without one (ImageNet)."""
    path = Path(split_dir) / OBJECTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def existing_outputs(out_dir: str | os.PathLike) -> list[Path]:
    """Generated files/folders already under ``out_dir`` (what ``--overwrite`` would replace)."""
    out = Path(out_dir)
    found = sorted(p for p in (out / "train").glob("*") if _SHARD_RE.match(p.name))
    found += [p for p in (out / "zeroshot", out / "layout", out / "classify", out / "dataset.json") if p.exists()]
    return found


# ----------------------------------------------------------------------------- classification


def classify_classnames() -> list[str]:
    """Classification classes: the shape's colour and the background it is drawn on (56),
    colour-major: index = colour_idx * len(BACKGROUNDS) + background_idx. Both are learnt within
    a hundred CPU steps by a tiny trunk; "colour shape" (the zero-shot classes) is not: a tiny
    trunk needs about 30k samples before it tells the shapes apart, and colour alone is 8x chance."""
    return [f"{c} on {b}" for c in COLORS for b in BACKGROUNDS]


def classify_spec(rng: np.random.Generator, color: str | None = None, background: str | None = None) -> SampleSpec:
    """What one classification image shows: one shape of any kind, size and position (no
    distractor: its colour would blur the class), its background drawn uniformly."""
    spec = sample_spec(rng, 0.0, color=color)
    return replace(spec, background=background or str(_pick(rng, BACKGROUNDS)))


def classify_index(spec: SampleSpec) -> int:
    return list(COLORS).index(spec.color) * len(BACKGROUNDS) + BACKGROUNDS.index(spec.background)


def _classify_train_sample(seed: int, index: int, image_size: int) -> tuple[bytes, int, dict]:
    """JPEG bytes, class index and metadata of classification training sample ``index``."""
    rng = _rng(seed, _CLASSIFY_TRAIN, index)
    spec = classify_spec(rng)
    img, objects = render_with_objects(rng, spec, image_size)
    ci = classify_index(spec)
    return _jpeg(img), ci, {"key": f"{index:09d}", **asdict(spec), "class_index": ci,
                            "classname": classify_classnames()[ci], "objects": objects}


def _classify_val_image(seed: int, ci: int, k: int, image_size: int) -> tuple[Image.Image, list[dict]]:
    color, background = classify_classnames()[ci].split(" on ")
    rng = _rng(seed, _CLASSIFY_VAL, ci * 1_000_000 + k)
    return render_with_objects(rng, classify_spec(rng, color, background), image_size)


def _write_cls_shard(path: Path, samples: Sequence[tuple[str, bytes, int, dict]]) -> None:
    """One ``KEY.jpg`` / ``KEY.cls`` / ``KEY.json`` shard (temp name, then renamed) and its stats."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpg, cls, meta in samples:
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.cls", str(cls).encode())
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    n = len(samples)
    stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0, "status_dict": {"success": n}}
    _atomic_write(path.with_name(f"{path.stem}_stats.json"), json.dumps(stats, indent=2).encode("utf-8"))


def write_classify_split(out_dir: str | os.PathLike, num_train: int, samples_per_shard: int, val_per_class: int,
                         image_size: int = 64, seed: int = 0) -> dict:
    """``OUT/classify/``: ``train/`` cls shards, ``val/`` class-folder tree and ``val_shards/``
    (the same images, interleaved by class so a capped evaluation still sees every class).
    Rewritten whole (a temp dir swapped in). Returns its summary (paths relative to OUT)."""
    out = Path(out_dir) / "classify"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    num_shards = math.ceil(num_train / samples_per_shard)
    for s in range(num_shards):
        first = s * samples_per_shard
        samples = []
        for index in range(first, min(first + samples_per_shard, num_train)):
            jpg, cls, meta = _classify_train_sample(seed, index, image_size)
            samples.append((meta["key"], jpg, cls, meta))
        _write_cls_shard(tmp / "train" / f"{s:05d}.tar", samples)
    names = classify_classnames()
    _write_class_split(tmp / "val", names, ("a shape: {}.",), _classify_val_image, seed, val_per_class, image_size)
    (tmp / "val_shards").mkdir()
    val = [(f"{k:05d}{ci:03d}", (tmp / "val" / f"c{ci:03d}" / f"{k:05d}.jpg").read_bytes(), ci, {"classname": name})
           for k in range(val_per_class) for ci, name in enumerate(names)]
    if val:
        _write_cls_shard(tmp / "val_shards" / "00000.tar", val)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"classify_train_pattern": f"classify/train/{{00000..{num_shards - 1:05d}}}.tar",
            "classify_num_train": num_train, "classify_val_dir": "classify/val",
            "classify_val_shards": "classify/val_shards/00000.tar", "classify_num_val": len(val),
            "classify_num_classes": len(names)}


def write_synthetic_dataset(out_dir: str | os.PathLike, num_train: int = 20000,
                            samples_per_shard: int = 1000, val_per_class: int = 20,
                            image_size: int = 64, seed: int = 0, *,
                            distractor_prob: float = 0.1, pair_prob: float = PAIR_PROB,
                            overwrite: bool = True, classify_train: int = 0,
                            classify_val_per_class: int | None = None) -> dict:
    """Write train shards and the zero-shot split under ``out_dir``; return a summary. With
    ``classify_train`` > 0 also the class-labelled split (:func:`write_classify_split`;
    ``classify_val_per_class`` defaults to ``val_per_class``).

    Re-running with the same arguments rewrites identical files; shards left over from a
    larger earlier run are removed so a ``*.tar`` glob never mixes runs. With
    ``overwrite=False`` an ``out_dir`` that already holds outputs raises FileExistsError.
    """
    if num_train < 1 or samples_per_shard < 1 or val_per_class < 0:
        raise ValueError("num_train and samples_per_shard must be >= 1, val_per_class >= 0")
    if image_size < 16:
        raise ValueError(f"image_size {image_size} is too small to draw shapes; use >= 16")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    old = existing_outputs(out)
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} generated outputs")
    t0 = time.perf_counter()
    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)  # marks the dataset incomplete until done
    num_shards = math.ceil(num_train / samples_per_shard)
    shards = []
    for s in range(num_shards):
        start = s * samples_per_shard
        path = train / f"{s:05d}.tar"
        _write_shard(path, seed, start, min(samples_per_shard, num_train - start), image_size,
                     distractor_prob, pair_prob)
        shards.append(f"train/{path.name}")
    for p in train.glob("*"):  # drop stale shards of an earlier, larger run
        if _SHARD_RE.match(p.name) and int(p.name[:5]) >= num_shards:
            p.unlink()
    train_seconds = time.perf_counter() - t0
    num_zeroshot = _write_class_split(out / "zeroshot", classnames(), ZEROSHOT_TEMPLATES, _zeroshot_image,
                                      seed, val_per_class, image_size)
    num_layout = _write_class_split(out / "layout", layout_classnames(), LAYOUT_TEMPLATES, _layout_image,
                                    seed, val_per_class, image_size)
    classify = {}
    if classify_train > 0:
        classify = write_classify_split(out, classify_train, samples_per_shard,
                                        val_per_class if classify_val_per_class is None else classify_val_per_class,
                                        image_size, seed)
    elif (out / "classify").exists():  # an earlier run's: it is not this dataset's
        shutil.rmtree(out / "classify")
    # dataset.json holds paths relative to out_dir (movable, byte-identical per seed);
    # the returned summary has them joined to out_dir.
    summary = {
        "num_train": num_train,
        "num_shards": num_shards,
        "samples_per_shard": samples_per_shard,
        "train_pattern": f"train/{{00000..{num_shards - 1:05d}}}.tar",
        "shards": shards,
        "num_classes": len(classnames()),
        "val_per_class": val_per_class,
        "num_zeroshot": num_zeroshot,
        "zeroshot_dir": "zeroshot",
        "num_layout_classes": len(layout_classnames()),
        "num_layout": num_layout,
        "layout_dir": "layout",
        "image_size": image_size,
        "seed": seed,
        "distractor_prob": distractor_prob,
        "pair_prob": pair_prob,
        "attributes": {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES),
                       "position": list(POSITIONS), "background": list(BACKGROUNDS)},
        **classify,
    }
    _atomic_write(out / "dataset.json", (json.dumps(summary, indent=1) + "\n").encode())
    seconds = time.perf_counter() - t0
    paths = {"train_pattern": str(out / summary["train_pattern"]),
             "shards": [str(out / p) for p in shards], "zeroshot_dir": str(out / "zeroshot"),
             "layout_dir": str(out / "layout"),
             **{k: str(out / v) for k, v in classify.items() if isinstance(v, str)}}
    return {**summary, **paths, "seconds": seconds,
            "train_samples_per_second": num_train / max(train_seconds, 1e-9)}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``make_synthetic_shards --out DIR [--num-samples N] ...``; returns an exit code."""
    p = argparse.ArgumentParser(prog="make_synthetic_shards", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=20000, help="training samples")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--val-per-class", type=int, default=20, help="zero-shot images per class")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distractor-prob", type=float, default=0.1,
                   help="share of training images with a second, small unmentioned shape")
    p.add_argument("--pair-prob", type=float, default=PAIR_PROB,
                   help="share of training images that are two-object scenes captioned with their layout")
    p.add_argument("--classify-samples", type=int, default=None,
                   help="class-labelled training samples under OUT/classify/ (default: --num-samples; 0: none)")
    p.add_argument("--classify-val-per-class", type=int, default=None,
                   help="classification validation images per class (default: --val-per-class)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.samples_per_shard < 1:
        p.error("--num-samples and --samples-per-shard must be >= 1")
    if args.val_per_class < 0 or args.image_size < 16 or not 0 <= args.distractor_prob <= 1 \
            or not 0 <= args.pair_prob <= 1:
        p.error("need --val-per-class >= 0, --image-size >= 16, 0 <= --distractor-prob <= 1, "
                "0 <= --pair-prob <= 1")
    if (args.classify_samples or 0) < 0 or (args.classify_val_per_class or 0) < 0:
        p.error("--classify-samples and --classify-val-per-class must be >= 0")
    old = existing_outputs(args.out)
    if old and not args.overwrite:
        print(f"error: --out {args.out} already holds generated data ({len(old)} entries, e.g. "
              f"{old[0]}); pass --overwrite to replace it, or choose an empty --out",
              file=sys.stderr)
        return 1
    try:
        s = write_synthetic_dataset(args.out, args.num_samples, args.samples_per_shard,
                                    args.val_per_class, args.image_size, args.seed,
                                    distractor_prob=args.distractor_prob, pair_prob=args.pair_prob,
                                    overwrite=True,
                                    classify_train=(args.num_samples if args.classify_samples is None
                                                    else args.classify_samples),
                                    classify_val_per_class=args.classify_val_per_class)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {s['num_train']} train samples in {s['num_shards']} shards "
          f"({s['train_samples_per_second']:.0f} samples/s): {s['train_pattern']}")
    print(f"wrote {s['num_zeroshot']} zero-shot images, {s['num_classes']} classes: "
          f"{s['zeroshot_dir']}; {s['num_layout']} layout images, {s['num_layout_classes']} classes: "
          f"{s['layout_dir']}  ({s['seconds']:.1f} s total)")
    if "classify_num_train" in s:
        print(f"wrote {s['classify_num_train']} class-labelled train samples ({s['classify_num_classes']} classes, "
              f"--task classify): {s['classify_train_pattern']}; {s['classify_num_val']} validation images: "
              f"{s['classify_val_dir']} (class folders) and {s['classify_val_shards']} (cls shard)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
