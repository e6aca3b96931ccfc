"""The one decoding rule (dtp_ds.data.decode.decode_image): transparency on white as img2dataset
composites it, CMYK and 16-bit grey converted sanely, decompression bombs refused with the reason;
and every path that opens images goes through it."""
from __future__ import annotations

import io
import re
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtp_ds.data.decode import BadSample, decode_image

ROOT = Path(__file__).resolve().parents[2]


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _px(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def test_rgba_black_strokes_on_a_transparent_background_stay_black_on_white():
    """A logo: black strokes (opaque) on a fully transparent background whose hidden colour is
    black too. convert("RGB") would give an all-black image; the rule gives black on white."""
    a = np.zeros((8, 8, 4), np.uint8)
    a[2:6, 2:6, 3] = 255  # the strokes: opaque black
    out = _px(decode_image(_png(Image.fromarray(a, "RGBA"))))
    assert (out[2:6, 2:6] == 0).all()
    assert (out[0, 0] == 255).all() and (out[7, 7] == 255).all()
    assert (np.asarray(Image.fromarray(a, "RGBA").convert("RGB")) == 0).all()  # what the old rule saw


def test_half_transparent_pixels_follow_img2datasets_formula():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    out = _px(decode_image(_png(Image.fromarray(a, "RGBA"))))
    alpha = a[..., 3:4].astype(float)
    want = np.rint(np.clip(alpha / 255 * a[..., :3] + 255 - alpha, 0, 255)).astype(int)
    assert (out == want).all()


def test_the_same_pixels_as_img2datasets_own_resizer():
    """Checked against img2dataset itself (its OpenCV alpha matting), where it is installed."""
    resizer_mod = pytest.importorskip("img2dataset.resizer", reason="img2dataset not installed (pip install .[data])")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
    data = _png(Image.fromarray(a, "RGBA"))
    resizer = resizer_mod.Resizer(image_size=12, resize_mode="no", resize_only_if_bigger=False,
                                  encode_format="png", encode_quality=9)
    written, *_, err = resizer(io.BytesIO(data))
    assert err is None
    with Image.open(io.BytesIO(written)) as im:
        theirs = np.asarray(im.convert("RGB")).astype(int)
    assert (_px(decode_image(data)) == theirs).all()


def test_la_grey_with_alpha():
    a = np.zeros((4, 4, 2), np.uint8)
    a[..., 0] = 100
    a[:2, :, 1] = 255  # top half opaque grey, bottom half transparent
    out = _px(decode_image(_png(Image.fromarray(a, "LA"))))
    assert (out[:2] == 100).all() and (out[2:] == 255).all()


def test_palette_with_a_transparent_index():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)  # index 0 black, index 1 red
    pal.putpixel((0, 0), 1)
    data = _png(pal, transparency=0)  # index 0 transparent
    out = _px(decode_image(data))
    assert tuple(out[0, 0]) == (200, 10, 10)
    assert (out[1:] == 255).all()
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[1:] == 0).all()  # the old rule: black


def test_rgb_with_a_transparent_key_colour():
    im = Image.new("RGB", (4, 4), (0, 0, 0))
    im.putpixel((0, 0), (0, 128, 0))
    out = _px(decode_image(_png(im, transparency=(0, 0, 0))))
    assert tuple(out[0, 0]) == (0, 128, 0) and (out[1:] == 255).all()


def test_cmyk_jpeg():
    im = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    for x in range(4):
        for y in range(8):
            im.putpixel((x, y), (255, 0, 0, 0))  # full cyan
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    out = _px(decode_image(buf.getvalue()))
    assert (np.abs(out[:, 6:] - 255) <= 6).all()
    cyan = out[:, :2].reshape(-1, 3).mean(0)
    assert cyan[0] < 20 and cyan[1] > 235 and cyan[2] > 235


def test_16_bit_grey_png_is_scaled_not_clipped():
    a = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    data = _png(Image.fromarray(a))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = _px(decode_image(data))
    assert list(out[0, :, 0]) == [0, 64, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()
    assert list(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, :, 0]) == [0, 255, 255, 255]  # old


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` (8-bit RGB) and holds one tiny IDAT: what matters is
    that its size is refused from the header, before anything is decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_with_the_reason():
    with pytest.raises(BadSample, match=r"decompression bomb: .*900000000 pixels.*MAX_IMAGE_PIXELS") as e:
        decode_image(_png_header_only(30000, 30000))
    assert e.value.kind == "decode_error"


def test_a_real_large_png_over_the_limit_is_refused_and_under_it_decodes(monkeypatch):
    data = _png(Image.new("RGB", (2048, 2048), (9, 9, 9)))  # compresses to a few kB
    assert decode_image(data).size == (2048, 2048)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2048 * 2048 // 4)  # PIL refuses over twice this
    with pytest.raises(BadSample, match="decompression bomb"):
        decode_image(data)


def test_a_file_path_decodes_by_the_same_rule(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    (tmp_path / "x.png").write_bytes(_png(Image.fromarray(a, "RGBA")))
    assert (_px(decode_image(str(tmp_path / "x.png"))) == 255).all()


def test_every_path_that_opens_images_decodes_through_the_rule():
    """No Image.open / convert("RGB") on image files outside dtp_ds/data/decode.py, and every
    torchvision ImageFolder is given the rule as its loader (its default loader converts)."""
    files = subprocess.run(["git", "ls-files", "dtp_ds", "tools"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    offenders = []
    for rel in files:
        if rel == "dtp_ds/data/decode.py" or not (rel.endswith(".py") or rel.startswith("tools/")):
            continue
        text = (ROOT / rel).read_text(errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if "Image.open(" in line or re.search(r"ImageFolder\((?![^)]*loader=)", line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "open images with dtp_ds.data.decode.decode_image:\n" + "\n".join(offenders)
