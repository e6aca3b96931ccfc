"""Draw the groups (DRIP: segments) a trained encoder's token reducer makes on images.

    tools/visualize_boundaries --checkpoint LOGS/NAME --image-dir DIR [--max-images N] --out DIR
    tools/visualize_boundaries --checkpoint LOGS/NAME/checkpoints/step_N --images A.jpg B.jpg --out DIR

The model comes out of a DeepSpeed checkpoint of any ZeRO stage (:mod:`dtp_ds.train.export`)
and runs in eval mode, where boundaries follow the predictor's deterministic evaluation rule
(the one zero-shot evaluation and FLOP counts use: for the MLP predictor by default the
``round(sum of probabilities)`` most probable patches), on each image after the model's own
val transform. The groups are read with :func:`~dtp_ds.models.record_forward` during the image
tower's normal forward (``TowerOutput.groups``, ``.scores``), so they are the ones that forward
pooled with; any reducer that reports groups can be drawn.

A boundary at patch ``l`` (raster order: rows left to right, top to bottom) ends the segment
that contains ``l``: the next patch is in another group. DRIP's segments are runs of patches in
raster order: strips that may wrap from one row to the next.

Each PNG shows the model's input image (un-normalised, upscaled to about
:data:`TARGET_PX` pixels) with the patch grid (thin lines), each segment tinted in one
colour and outlined (thick lines between neighbouring patches of different segments), a dot
on every boundary patch, and a title band with the segment count and the compression
(patches / segments).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from dtp_ds.data.decode import BadSample, decode_image
from dtp_ds.models import VisionTransformer, record_forward, trunks

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TARGET_PX = 512  # the drawn image is upscaled by the integer factor that brings it nearest this
TITLE_PX = 44  # height of the title band above the image
PALETTE = [  # matplotlib's tab10
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


@dataclass
class ImageBoundaries:
    """One image's deterministic groups over its patch grid (raster order)."""

    hard: np.ndarray  # (L,) bool: the next patch (raster order) is in another group
    probs: np.ndarray  # (L,) float: the reducer's per-patch score (DRIP: boundary probability); 0 if none
    segments: np.ndarray  # (L,) int: group id of each patch, numbered 0.. in order of first patch
    grid: tuple[int, int]  # (rows, cols), rows * cols = L
    patch_size: int

    @property
    def num_patches(self) -> int:
        return int(self.hard.size)

    @property
    def num_segments(self) -> int:
        return int(self.segments.max()) + 1

    @property
    def compression(self) -> float:
        return self.num_patches / self.num_segments


def grouping_trunk(model: nn.Module, name: str | None = None) -> VisionTransformer:
    """The model's one trunk with a token reducer; ValueError for models without one."""
    found = [t for t in trunks(model) if t.reducer.type_name != "none"]
    label = f"model '{name}'" if name else "this model"
    if not found:
        grouping = [m for m in open_clip.list_models() if m.startswith("DRIP-")]
        raise ValueError(f"{label} has no token reducer that groups patches (a plain ViT): it has no groups "
                         f"to draw. Models that group patches: {', '.join(grouping[:4])}, ...")
    if len(found) > 1:
        raise ValueError(f"{label} has {len(found)} trunks with a token reducer; expected one")
    return found[0]


def target_compression(trunk: VisionTransformer) -> str:
    """The reducer's configured compression, for titles ("" when it has no rate)."""
    rate = trunk.reducer.default_rate()
    return f" (target {1.0 / rate:g}x)" if rate else ""


def _renumber(groups: torch.Tensor) -> torch.Tensor:
    """(B, L) group ids -> 0, 1, ... per image in order of each group's first patch."""
    out = torch.empty_like(groups)
    for b, row in enumerate(groups):
        _, inverse = torch.unique(row, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), row.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(row.numel()), reduce="amin")
        out[b] = torch.argsort(torch.argsort(first))[inverse]
    return out


@torch.no_grad()
def extract_boundaries(model: nn.Module, images: torch.Tensor) -> list[ImageBoundaries]:
    """Run the image tower on ``images`` (B, 3, H, W, already transformed) in eval mode and
    return each image's groups, as that forward used them."""
    trunk = grouping_trunk(model)
    tower = getattr(model, "visual", model)
    was_training = model.training
    model.eval()
    try:
        with record_forward() as rec:
            tower(images)
    finally:
        model.train(was_training)
    if len(rec) != 1:
        raise RuntimeError(f"the trunk ran {len(rec)} times in one forward; expected once")
    if rec[0].groups is None:
        raise ValueError(f"the {trunk.reducer.type_name!r} reducer reports no groups: nothing to draw")
    ids = _renumber(rec[0].groups.long().cpu())
    hard = torch.zeros_like(ids, dtype=torch.bool)
    hard[:, :-1] = ids[:, 1:] != ids[:, :-1]
    probs = torch.zeros(ids.shape) if rec[0].scores is None else rec[0].scores.float().cpu()
    hard_np, probs_np, ids_np = hard.numpy(), probs.numpy(), ids.numpy()
    return [ImageBoundaries(hard_np[i], probs_np[i], ids_np[i], tuple(trunk.grid_size), trunk.patch_size)
            for i in range(len(ids_np))]


def val_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The model's own val transform (as ``open_clip.create_model_and_transforms`` makes it)."""
    return image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)


def to_display(image: torch.Tensor, model: nn.Module) -> np.ndarray:
    """A transformed image (3, H, W) back to (H, W, 3) uint8, as the model sees it."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(3, 1, 1)
    pixels = (image.float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte()
    return pixels.permute(1, 2, 0).numpy()


def display_scale(height: int, width: int) -> int:
    """Integer upscaling factor for drawing: the one bringing the longer side nearest TARGET_PX."""
    return max(1, round(TARGET_PX / max(height, width)))


def png_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of the PNG drawn for an input image of ``height`` x ``width`` pixels."""
    s = display_scale(height, width)
    return width * s, height * s + TITLE_PX


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render(image: np.ndarray, bnd: ImageBoundaries, title: str, subtitle: str = "") -> Image.Image:
    """The picture: image, patch grid, tinted and outlined segments, boundary dots, title."""
    height, width = image.shape[:2]
    s = display_scale(height, width)
    rows, cols = bnd.grid
    p = bnd.patch_size * s  # patch side on the canvas
    base = Image.fromarray(image).convert("RGB").resize((width * s, height * s), Image.BICUBIC).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    seg = bnd.segments.reshape(rows, cols)
    hard = bnd.hard.reshape(rows, cols)
    for r in range(rows):
        for c in range(cols):
            tint = (*PALETTE[seg[r, c] % len(PALETTE)], 90)
            draw.rectangle([c * p, r * p, (c + 1) * p - 1, (r + 1) * p - 1], fill=tint)
    for r in range(rows + 1):  # the patch grid
        draw.line([(0, r * p), (cols * p, r * p)], fill=(255, 255, 255, 110), width=1)
    for c in range(cols + 1):
        draw.line([(c * p, 0), (c * p, rows * p)], fill=(255, 255, 255, 110), width=1)
    thick = max(2, p // 10)
    edge = (0, 0, 0, 235)
    for r in range(rows):  # segment outlines: between neighbours of different segments, and the border
        for c in range(cols):
            if c + 1 == cols or seg[r, c] != seg[r, c + 1]:
                draw.line([((c + 1) * p, r * p), ((c + 1) * p, (r + 1) * p)], fill=edge, width=thick)
            if r + 1 == rows or seg[r, c] != seg[r + 1, c]:
                draw.line([(c * p, (r + 1) * p), ((c + 1) * p, (r + 1) * p)], fill=edge, width=thick)
            if c == 0:
                draw.line([(0, r * p), (0, (r + 1) * p)], fill=edge, width=thick)
            if r == 0:
                draw.line([(c * p, 0), ((c + 1) * p, 0)], fill=edge, width=thick)
            if hard[r, c]:  # this patch ends its segment
                cx, cy, rad = c * p + p / 2, r * p + p / 2, max(2.0, p / 7)
                draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=(255, 255, 255, 255), outline=edge,
                             width=max(1, thick // 2))
    picture = Image.alpha_composite(base, overlay).convert("RGB")
    canvas = Image.new("RGB", (picture.width, picture.height + TITLE_PX), (255, 255, 255))
    canvas.paste(picture, (0, TITLE_PX))
    text = ImageDraw.Draw(canvas)
    text.text((6, 4), title, fill=(0, 0, 0), font=_font(16))
    if subtitle:
        text.text((6, 24), subtitle, fill=(80, 80, 80), font=_font(12))
    return canvas


def _segments(bnd: ImageBoundaries) -> str:
    return f"{bnd.num_segments} segment{'' if bnd.num_segments == 1 else 's'}"


@dataclass
class Written:
    """One PNG written by :func:`visualize`."""

    image: str
    png: str
    boundaries: ImageBoundaries


def _png_names(paths: Sequence[str], root: str | None) -> list[str]:
    names, seen = [], set()
    for path in paths:
        rel = os.path.relpath(path, root) if root else os.path.basename(path)
        stem = os.path.splitext(rel)[0].replace(os.sep, "_")
        name, k = stem, 1
        while name in seen:
            k += 1
            name = f"{stem}_{k}"
        seen.add(name)
        names.append(name + ".png")
    return names


def visualize(model: nn.Module, name: str, paths: Sequence[str], out_dir: str, image_root: str | None = None,
              batch_size: int = 32, device: str | torch.device = "cpu") -> list[Written]:
    """Draw the boundaries of ``model`` on each image of ``paths`` into ``out_dir`` (one PNG
    each, named after the image; relative to ``image_root`` when given)."""
    trunk = grouping_trunk(model, name)
    transform = val_transform(model)
    pngs = _png_names(paths, image_root)
    written: list[Written] = []
    for start in range(0, len(paths), batch_size):
        chunk = list(range(start, min(start + batch_size, len(paths))))
        tensors = []
        for i in chunk:
            try:
                img = decode_image(paths[i])  # the one decoding rule (transparency on white)
            except BadSample as e:  # unreadable / not an image
                raise ValueError(f"cannot read image {paths[i]}: {e}") from e
            tensors.append(transform(img))
        batch = torch.stack(tensors).to(device)
        for i, tensor, bnd in zip(chunk, tensors, extract_boundaries(model, batch)):
            title = f"{_segments(bnd)} / {bnd.num_patches} patches: compression {bnd.compression:.2f}x"
            subtitle = (f"{name}{target_compression(trunk)} | {os.path.basename(paths[i])} | "
                        f"boundary p max {bnd.probs.max():.2f} | dots: boundary patches")
            png = os.path.join(out_dir, pngs[i])
            os.makedirs(out_dir, exist_ok=True)
            render(to_display(tensor, model), bnd, title, subtitle).save(png)
            written.append(Written(paths[i], png, bnd))
    return written


def list_images(image_dir: str, max_images: int | None) -> list[str]:
    """Image files under ``image_dir`` (recursively), sorted, at most ``max_images``."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"--image-dir {image_dir}: not a directory")
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(image_dir) for f in files
                   if f.lower().endswith(IMAGE_EXTS))
    if not found:
        raise FileNotFoundError(f"--image-dir {image_dir}: no images ({', '.join(IMAGE_EXTS)}) in it")
    return found[:max_images] if max_images else found
