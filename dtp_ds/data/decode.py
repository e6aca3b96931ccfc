"""What counts as bad data: the one place that decides.

A sample's bytes become a PIL RGB image (fully decoded, not just its header read), a caption
(``txt``: utf-8 text) and a class index (``cls``: an integer), or :class:`BadSample` is raised.
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
    """Image bytes (or a file path) -> a fully decoded RGB image; :class:`BadSample` if they
    cannot be read or decoded."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.convert("RGB")  # decodes every pixel (a copy even when already RGB)
    except _IMAGE_ERRORS as e:
        raise BadSample(f"{type(e).__name__}: {e}") from e


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
