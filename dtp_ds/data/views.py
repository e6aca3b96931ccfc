"""The augmentation recipes of augmentation-invariance pretraining: several random views of one
image, as MoCo v3, SimCLR and DINO publish them (torchvision v1 transforms).

- MoCo v3 (BYOL's recipe): two views, both random-resized-crop (area 0.08-1), flip, colour jitter
  (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2; asymmetric blur (p 1.0 / 0.1) and
  solarisation (p 0 / 0.2).
- SimCLR: two views from one distribution: crop (0.08-1), flip, jitter (0.8 s, 0.8 s, 0.8 s, 0.2 s)
  with p 0.8 (s = 1), grayscale p 0.2, blur p 0.5.
- DINO: two global crops (area 0.4-1; blur p 1.0 / 0.1, solarisation p 0.2 on the second) and N
  local crops (area 0.05-0.4, blur p 0.5) at the published 96/224 of the input size.

The recipes are published for 224 px inputs; the trunks here may be much smaller (64 px). Sizes
and the blur's sigma (0.1-2.0 px at 224) scale with ``size / 224`` so that a view loses the same
share of its detail at any input size; the blur kernel spans 3 sigma each side (what a Gaussian
keeps; BYOL's 23 px kernel at 224 px is wider than that, with the same result).

Determinism: every transform used here draws from torch's RNG (torchvision v1's GaussianBlur,
ColorJitter, RandomApply, ... all do; none uses Python's ``random``), which the data loader seeds
per sample, so a sample's views are the same on a resumed run. tests/unit/test_ssl_views.py
checks it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

REFERENCE_SIZE = 224  # the input size the recipes are published for
DINO_LOCAL_SIZE = 96  # DINO's local crops at REFERENCE_SIZE
BLUR_SIGMA = (0.1, 2.0)  # px at REFERENCE_SIZE (BYOL, SimCLR, DINO)


@dataclass(frozen=True)
class ViewRecipe:
    """One view's distribution: crop to ``size`` px from ``scale`` of the area, then flip, colour
    jitter (brightness, contrast, saturation, hue) with ``jitter_p``, grayscale with ``gray_p``,
    Gaussian blur with ``blur_p``, solarisation (threshold 128) with ``solarize_p``."""

    size: int
    scale: tuple[float, float]
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    interpolation: InterpolationMode = InterpolationMode.BILINEAR


def scaled(value: float, size: int) -> float:
    """``value`` (px at 224) at input size ``size``."""
    return value * size / REFERENCE_SIZE


def blur_kernel(sigma_max: float) -> int:
    """The odd kernel size spanning 3 sigma each side of the centre (at least 3)."""
    return max(3, 2 * math.ceil(3 * sigma_max) + 1)


def view_transform(recipe: ViewRecipe, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL image -> normalised (3, size, size) tensor drawn from ``recipe``."""
    steps: list[Any] = [T.RandomResizedCrop(recipe.size, scale=recipe.scale, interpolation=recipe.interpolation),
                        T.RandomHorizontalFlip()]
    if recipe.jitter_p > 0:
        steps.append(T.RandomApply([T.ColorJitter(*recipe.jitter)], p=recipe.jitter_p))
    if recipe.gray_p > 0:
        steps.append(T.RandomGrayscale(p=recipe.gray_p))
    if recipe.blur_p > 0:
        blur = T.GaussianBlur(blur_kernel(recipe.blur_sigma[1]), sigma=recipe.blur_sigma)
        steps.append(blur if recipe.blur_p >= 1 else T.RandomApply([blur], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        steps.append(T.RandomSolarize(threshold=128, p=recipe.solarize_p))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class MultiView:
    """PIL image -> one tensor per global view, then (with local views) the local views stacked
    into one ``(n_local, 3, s, s)`` tensor."""

    def __init__(self, global_views: Sequence[ViewRecipe], mean: Sequence[float], std: Sequence[float],
                 local_view: ViewRecipe | None = None, n_local: int = 0) -> None:
        if n_local and local_view is None:
            raise ValueError("n_local local views need a local_view recipe")
        self.recipes = tuple(global_views)
        self.local_recipe, self.n_local = local_view, n_local
        self.globals = [view_transform(r, mean, std) for r in global_views]
        self.local = view_transform(local_view, mean, std) if local_view is not None and n_local else None

    @property
    def names(self) -> tuple[str, ...]:
        """The batch keys of the views, in order: ``view1``, ``view2``, ... (``local``)."""
        return tuple(f"view{i + 1}" for i in range(len(self.globals))) + (("local",) if self.local else ())

    def __call__(self, image: Any) -> tuple[torch.Tensor, ...]:
        views = [t(image) for t in self.globals]
        if self.local is not None:
            views.append(torch.stack([self.local(image) for _ in range(self.n_local)]))
        return tuple(views)


def _sigma(size: int) -> tuple[float, float]:
    return (scaled(BLUR_SIGMA[0], size), scaled(BLUR_SIGMA[1], size))


def mocov3_views(size: int, mean: Sequence[float], std: Sequence[float]) -> MultiView:
    """MoCo v3's two asymmetric views (blur 1.0 / 0.1, solarisation 0 / 0.2)."""
    common = {"size": size, "scale": (0.08, 1.0), "blur_sigma": _sigma(size)}
    return MultiView([ViewRecipe(**common, blur_p=1.0, solarize_p=0.0),
                      ViewRecipe(**common, blur_p=0.1, solarize_p=0.2)], mean, std)


def simclr_views(size: int, mean: Sequence[float], std: Sequence[float], strength: float = 1.0) -> MultiView:
    """SimCLR's two views from one distribution (colour distortion strength ``strength``)."""
    s = strength
    one = ViewRecipe(size, (0.08, 1.0), jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), blur_p=0.5,
                     blur_sigma=_sigma(size))
    return MultiView([one, one], mean, std)


def dino_local_size(size: int, patch: int | None = None) -> int:
    """The local crops' size for input size ``size``: 96/224 of it, rounded to a multiple of the
    trunk's ``patch`` (at least one patch) so that the crops tile into whole patches."""
    local = scaled(DINO_LOCAL_SIZE, size)
    if patch:
        return max(patch, patch * round(local / patch))
    return max(1, round(local))


def dino_views(size: int, mean: Sequence[float], std: Sequence[float], n_local: int = 8,
               local_size: int | None = None, patch: int | None = None,
               global_scale: tuple[float, float] = (0.4, 1.0),
               local_scale: tuple[float, float] = (0.05, 0.4)) -> MultiView:
    """DINO's two global crops (blur 1.0 / 0.1, solarisation 0 / 0.2) and ``n_local`` local crops
    (blur 0.5) of ``local_size`` px (default :func:`dino_local_size`); bicubic as DINO resizes."""
    sigma, bicubic = _sigma(size), InterpolationMode.BICUBIC
    g1 = ViewRecipe(size, global_scale, blur_p=1.0, blur_sigma=sigma, interpolation=bicubic)
    g2 = ViewRecipe(size, global_scale, blur_p=0.1, solarize_p=0.2, blur_sigma=sigma, interpolation=bicubic)
    local = ViewRecipe(local_size or dino_local_size(size, patch), local_scale, blur_p=0.5, blur_sigma=sigma,
                       interpolation=bicubic)
    return MultiView([g1, g2], mean, std, local if n_local else None, n_local)


RECIPES = {"mocov3": mocov3_views, "simclr": simclr_views, "dino": dino_views}


class ViewStage:
    """A data stage (:class:`dtp_ds.tasks.DataStage`): an image -> its views. Labels are unused
    (``keys`` is empty: any image sample is usable); :attr:`batch_keys` names the tensors."""

    keys: tuple[str, ...] = ()

    def __init__(self, views: MultiView) -> None:
        self.views = views

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.views.names

    def __call__(self, image: Any, sample: dict[str, bytes]) -> tuple[torch.Tensor, ...]:
        return self.views(image)
