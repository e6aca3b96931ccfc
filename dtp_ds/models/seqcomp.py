"""Sequence compression of the image trunk's input in training ("Accelerating Augmentation
Invariance Pretraining", Lin et al. 2024): a :class:`SeqComp` strategy (token-drop rate
``r``, patch size ``p``) set on every :class:`~.vit.VisionTransformer` by a schedule
(:class:`dtp_ds.train.seqcomp_schedule.SeqCompSchedule`); evaluation always runs full-sequence.

- **token dropout** at rate ``r``: each sample keeps a random subset of
  ``max(1, floor((1 - r) N))`` of its ``N`` patch tokens after the position embedding, CLS
  kept, the kept ones in raster order (DRIP's segments are runs of neighbouring patches);
  applied before the reducer's ``on_input``, so it composes with every reducer that does not
  need the whole patch grid.
- **patch scaling** to ``p``: the linear patch kernel is PI-resized on the fly from the stored
  one (FlexiViT; timm ``resample_patch_embed``: differentiable, the stored kernel is never
  overwritten), the position grid resampled (timm ``resample_abs_pos_embed``, CLS kept). An
  image side that ``p`` does not divide is **resized** (bilinear, antialiased) to
  ``floor(side / p) * p``: the whole field of view the full-sequence model sees stays in the
  input, at a slightly different scale (a crop would drop the border the text may describe;
  CLIPA trains on resized low-resolution images for the same reason). The conv stem cannot be
  PI-resized.

``p`` = the stored patch and ``r`` = 0 run exactly the full-sequence code path (bit-identical).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize


@dataclass(frozen=True)
class SeqComp:
    """A strategy: token-drop rate ``rate`` in [0, 1) and patch size ``patch`` (None: the stored one)."""

    rate: float = 0.0
    patch: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"token-drop rate r={self.rate}: must be in [0, 1) (r=0: keep every patch)")
        if self.patch is not None and (not isinstance(self.patch, int) or self.patch < 1):
            raise ValueError(f"patch size p={self.patch!r}: must be a positive integer (or omitted: the stored one)")

    def patch_or(self, stored: int) -> int:
        return stored if self.patch is None else self.patch

    def scales(self, stored: int) -> bool:
        """Whether the patch embedding runs at another patch size than ``stored``."""
        return self.patch is not None and self.patch != stored

    def is_identity(self, stored: int) -> bool:
        return self.rate == 0.0 and not self.scales(stored)

    def grid(self, img_size: tuple[int, int], stored: int) -> tuple[int, int]:
        """The patch grid at this strategy's patch size (image sides resized to a multiple of it)."""
        p = self.patch_or(stored)
        return max(1, img_size[0] // p), max(1, img_size[1] // p)

    def describe(self) -> str:
        """The SPEC form (``none``, ``r=0.5``, ``p=16``, ``r=0.5,p=16``)."""
        parts = ([f"r={self.rate:.10g}"] if self.rate else []) + ([f"p={self.patch}"] if self.patch is not None else [])
        return ",".join(parts) or "none"


NONE = SeqComp()


def keep_count(patches: int, rate: float) -> int:
    """``max(1, floor((1 - rate) patches))`` (1e-9 absorbs binary rounding: (1 - 0.9) * 10 is 0.999...)."""
    if rate == 0.0:
        return patches
    return max(1, min(patches, math.floor((1.0 - rate) * patches + 1e-9)))


def token_keep_indices(batch: int, patches: int, rate: float, device: torch.device | None = None) -> torch.Tensor:
    """(B, K) long: each sample's kept patch indices, a uniform random subset, ascending (raster order)."""
    k = keep_count(patches, rate)
    return torch.rand(batch, patches, device=device).argsort(dim=1)[:, :k].sort(dim=1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, K) of ``x`` (B, N, D) -> (B, K, D) (gradient flows to the kept rows only)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@functools.cache
def _resampler(stored: int) -> PatchEmbedResamplerFixedOrigSize:
    # keeps the pseudo-inverse per target size and device: timm's resample_patch_embed recomputes
    # it (an SVD of a p^2 x p0^2 matrix) at every call, i.e. every training step
    return PatchEmbedResamplerFixedOrigSize((stored, stored), interpolation="bicubic", antialias=True)


def pi_resize_kernel(weight: torch.Tensor, patch: int) -> torch.Tensor:
    """The (D, C, p0, p0) patch kernel PI-resized to (D, C, p, p) (FlexiViT): for every patch
    ``x``, ``<resize(x), w'> == <x, w>`` where resize upsamples; a new tensor with gradient to
    ``weight``, which is left as it is."""
    if tuple(weight.shape[-2:]) == (patch, patch):
        return weight
    return _resampler(weight.shape[-1])(weight, [patch, patch])


def block_macs(tokens: float, width: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds per sample of one pre-norm transformer block on ``tokens`` tokens: q/k/v and
    output projections (4 D^2 per token), the MLP (2 mlp_ratio D^2), attention (2 T^2 D)."""
    return tokens * (4 + 2 * mlp_ratio) * width * width + 2 * tokens * tokens * width


def image_tower_macs(trunk, strategy: SeqComp) -> float:
    """Estimated training multiply-adds per sample of ``trunk``'s image tower under ``strategy``:
    patch projection, then each block at the tokens its reducer plans (``planned_tokens`` of the
    patches the strategy leaves), then the head. An estimate (the reducers' own layers left out)
    for cost units where no measured cost is given; ``dtp_ds.eval.flops`` counts."""
    stored = trunk.patch_size
    gh, gw = strategy.grid(trunk.img_size, stored)
    p = strategy.patch_or(stored)
    patches = gh * gw
    kept = keep_count(patches, strategy.rate)
    width = trunk.embed_dim
    chans = getattr(trunk.patch_embed, "in_channels", 3)
    mlp_ratio = trunk.blocks[0].mlp.fc1.out_features / width if len(trunk.blocks) else 4.0
    embed = patches * p * p * chans * width
    tokens = trunk.reducer.planned_tokens(kept, trunk.depth)
    blocks = sum(block_macs(t, width, mlp_ratio) for t in tokens)
    return embed + blocks + width * max(trunk.num_classes, 0)


def image_tower_cost(trunk, strategy: SeqComp) -> float:
    """:func:`image_tower_macs` as a fraction of the full-sequence trunk's (1.0 for the identity)."""
    if strategy.is_identity(trunk.patch_size):
        return 1.0
    return image_tower_macs(trunk, strategy) / image_tower_macs(trunk, NONE)
