"""What counts as bad data: the one place that decides.

A sample's bytes become a PIL RGB image (fully decoded, not just its header read), a caption
(``txt``: utf-8 text) and a class index (``cls``: an integer), or :class:`BadSample` is raised.

:func:`decode_image` is the one decoding rule for every path that reads images (shards, class
folders, classification and zero-shot evaluation, retrieval, pictures), so evaluation sees what
training saw. It turns every mode into RGB the way img2dataset writes shards:

- transparency (RGBA, LA, PA, a palette or a grey/RGB image with a ``tRNS`` key colour) is
  composited onto **white** with img2dataset's formula (``rint(a/255 * rgb + 255 - a)``);
  ``convert("RGB")`` alone drops the alpha and shows whatever colour hides under it (often
  black), so black strokes of a transparent logo would vanish;
- 16-bit grey (``I;16``, PNG) is scaled 0..65535 -> 0..255 (``convert`` clips at 255: all
  white); 32-bit ``I`` is read as 16-bit data the same way (what PNG and TIFF decoders give);
- CMYK goes through PIL's conversion (Adobe's inverted JPEGs are un-inverted by the decoder);
- EXIF orientation is not applied (img2dataset's OpenCV decode does not either);
- an image over PIL's decompression-bomb limit (``2 * Image.MAX_IMAGE_PIXELS`` pixels) is
  refused with its size and the limit, before any pixel is decoded.
Only read and decode errors of the data become :class:`BadSample`: an image that cannot be
identified, is truncated or corrupt, is a decompression bomb, or cannot be read from disk;
a caption that is not utf-8; a ``cls`` that is not an integer; a missing image or field.

The loaders (:mod:`dtp_ds.data.shards`, :mod:`dtp_ds.data.folder`, the classification
evaluation) count a :class:`BadSample` toward the bad-data limit and catch nothing else: they run
the task's data stage (augmentation, tokenisation) on the decoded sample outside that ``try``, so
an exception in the project's own code stops the run with its traceback.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# What PIL raises for unreadable or corrupt image data: UnidentifiedImageError and "image file is
# truncated" are OSErrors (so is a failed read from disk); some decoders raise ValueError,
# EOFError or SyntaxError (broken PNG chunks); DecompressionBombError is an Exception of its own.
_IMAGE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


class BadSample(Exception):
    """One sample's data cannot be used (``kind``: a :data:`dtp_ds.data.shards.BAD_KINDS` name;
    the message says why). The only exception the loaders count as bad data."""

    def __init__(self, reason: str, kind: str = "decode_error") -> None:
        super().__init__(reason)
        self.kind = kind


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Image bytes (or a file path) -> a fully decoded RGB image (transparency on white, see the
    module doc); :class:`BadSample` with the reason if they cannot be read or decoded."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return to_rgb(im)  # decodes every pixel (a copy even when already RGB)
    except Image.DecompressionBombError as e:  # (raised by open, from the header: nothing decoded)
        raise BadSample(f"decompression bomb: {e} Raise PIL.Image.MAX_IMAGE_PIXELS to accept such "
                        f"images") from e
    except _IMAGE_ERRORS as e:
        raise BadSample(f"{type(e).__name__}: {e}") from e


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened image in any mode -> RGB by the one rule (the module doc says which)."""
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _on_white(im.convert("RGBA"))
    if im.mode in _WIDE_GREY_MODES:
        grey = np.asarray(im, dtype=np.float64)  # (the modes PIL has no 8-bit conversion for, but clipping)
        return Image.fromarray(np.rint(np.clip(grey, 0, 65535) / 257.0).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    """RGBA composited onto white with img2dataset's formula (its resizer's alpha matting), so a
    transparent image decodes to the same pixels whether it comes through img2dataset or not."""
    px = np.asarray(rgba, dtype=np.float64)
    alpha = px[..., 3:4]
    rgb = alpha / 255.0 * px[..., :3] + 255.0 - alpha
    return Image.fromarray(np.rint(np.clip(rgb, 0, 255)).astype(np.uint8), "RGB")


def decode_field(sample: dict[str, Any], key: str) -> Any:
    """A sample's field, decoded: ``txt`` -> str (utf-8), ``cls`` -> int, any other -> its bytes;
    :class:`BadSample` if it is missing or does not decode."""
    if key not in sample:
        raise BadSample(f"no {'caption' if key == 'txt' else key}", "no_caption" if key == "txt" else "decode_error")
    value = sample[key]
    try:
        if key == "txt":
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if key == "cls":
            return int(value)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadSample(f"{key}: {type(e).__name__}: {e}") from e
    return value


def decode_sample(sample: dict[str, Any], keys: tuple[str, ...] = ("txt",)) -> tuple[Image.Image, dict[str, Any]]:
    """A raw (webdataset-grouped) sample -> (its RGB image, its ``keys`` decoded); raises
    :class:`BadSample` for a missing image or field or one that does not decode."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("no image", "no_image")
    fields = {key: decode_field(sample, key) for key in keys}
    return decode_image(sample[ext]), fields
