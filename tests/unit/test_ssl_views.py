"""The MoCo v3 / SimCLR / DINO view recipes: shapes, the published probabilities, determinism
under the loader's per-sample torch seed (Python's ``random`` plays no part)."""
from __future__ import annotations

import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dtp_ds.data.views import (
    ViewStage,
    blur_kernel,
    dino_local_size,
    dino_views,
    mocov3_views,
    simclr_views,
    view_transform,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def image(size: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def steps(transform: T.Compose) -> list:
    return list(transform.transforms)


def find(transform: T.Compose, kind: type) -> list[tuple[float, object]]:
    """(probability, transform) of every ``kind`` in the pipeline (inside RandomApply too)."""
    out = []
    for s in steps(transform):
        if isinstance(s, T.RandomApply):
            out += [(s.p, t) for t in s.transforms if isinstance(t, kind)]
        elif isinstance(s, kind):
            out.append((getattr(s, "p", 1.0), s))
    return out


def test_mocov3_views_are_asymmetric_as_published():
    views = mocov3_views(64, MEAN, STD)
    a, b = views(image())
    assert a.shape == b.shape == (3, 64, 64)
    t1, t2 = views.globals
    assert [p for p, _ in find(t1, T.GaussianBlur)] == [1.0] and [p for p, _ in find(t2, T.GaussianBlur)] == [0.1]
    assert find(t1, T.RandomSolarize) == [] and [p for p, _ in find(t2, T.RandomSolarize)] == [0.2]
    for t in (t1, t2):
        (p, jitter), = find(t, T.ColorJitter)
        assert p == 0.8 and jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
        assert jitter.saturation == (0.8, 1.2)
        assert [p for p, _ in find(t, T.RandomGrayscale)] == [0.2]
        crop = steps(t)[0]
        assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.08, 1.0) and crop.size == (64, 64)


def test_simclr_views_share_one_distribution():
    views = simclr_views(64, MEAN, STD)
    assert views.recipes[0] == views.recipes[1]
    (p, jitter), = find(views.globals[0], T.ColorJitter)
    assert p == 0.8 and jitter.brightness == pytest.approx((0.2, 1.8)) and jitter.hue == pytest.approx((-0.2, 0.2))
    assert [p for p, _ in find(views.globals[0], T.GaussianBlur)] == [0.5]
    assert find(views.globals[0], T.RandomSolarize) == []


def test_dino_global_and_local_crops():
    views = dino_views(64, MEAN, STD, n_local=4, patch=8)
    assert dino_local_size(64, 8) == 24 and dino_local_size(224) == 96 and dino_local_size(224, 16) == 96
    g1, g2, local = views(image())
    assert g1.shape == g2.shape == (3, 64, 64) and local.shape == (4, 3, 24, 24)
    assert views.names == ("view1", "view2", "local")
    assert steps(views.globals[0])[0].scale == (0.4, 1.0) and steps(views.local)[0].scale == (0.05, 0.4)
    assert [p for p, _ in find(views.local, T.GaussianBlur)] == [0.5]
    assert [p for p, _ in find(views.globals[1], T.RandomSolarize)] == [0.2]
    assert dino_views(64, MEAN, STD, n_local=0).names == ("view1", "view2")


def test_blur_sigma_scales_with_the_input_size():
    (_, blur224), = find(view_transform(mocov3_views(224, MEAN, STD).recipes[0], MEAN, STD), T.GaussianBlur)
    (_, blur64), = find(mocov3_views(64, MEAN, STD).globals[0], T.GaussianBlur)
    assert blur224.sigma == pytest.approx((0.1, 2.0)) and blur224.kernel_size == (13, 13)
    assert blur64.sigma == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))
    assert blur_kernel(0.2) == 3


@pytest.mark.parametrize("make", [mocov3_views, simclr_views, lambda *a: dino_views(*a, n_local=2)])
def test_views_depend_on_the_torch_seed_only(make):
    views, img = make(64, MEAN, STD), image()
    torch.manual_seed(5)
    random.seed(1)
    first = views(img)
    torch.manual_seed(5)
    random.seed(2)  # another Python RNG state: no effect
    np.random.seed(3)
    again = views(img)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    torch.manual_seed(6)
    other = views(img)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # two draws, not one view twice


def test_view_stage_is_a_label_free_data_stage():
    stage = ViewStage(mocov3_views(32, MEAN, STD))
    assert stage.keys == () and stage.batch_keys == ("view1", "view2")
    out = stage(image(48), {"jpg": b""})
    assert isinstance(out, tuple) and len(out) == 2 and out[0].dtype == torch.float32
