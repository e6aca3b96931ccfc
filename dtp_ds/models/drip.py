"""DRIP vision transformer: a ViT whose middle blocks run on dynamically pooled segments.

patch embed + CLS + positions -> ``pre`` blocks (full sequence) -> boundary predictor ->
mean-pool patch tokens within segments (CLS kept) -> ``shorten`` blocks (short sequences)
[-> broadcast segments back to the patches + pre-pooling residual -> ``post`` blocks]
-> final LayerNorm -> pooling -> projection (the ``head``).

The short sequences are packed (see :mod:`.segments`): token-wise layers run on the real
tokens only and attention on a layout padded to the batch's largest segment count with a key
mask, so padding costs neither FLOPs in the linear layers nor correctness in attention.

Plain single-device module. Parameters are only touched inside the ``forward`` of the
module that owns them (ZeRO-3 gathers per module), inputs are cast to the patch
embedding's dtype (DeepSpeed casts every parameter to bf16/fp16), and the boundary path
runs in fp32.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed, to_2tuple
from torch import nn
from torch.utils.checkpoint import checkpoint

from .boundary import make_boundary_predictor
from .segments import (
    Packing,
    from_padded,
    make_packing,
    pack_segments,
    segment_ids,
    to_padded,
    unpack_patches,
)

POOL_TYPES = ("mean_with_cls", "mean_without_cls", "cls", "last")
# What the boundary predictor reads: the tokens after the ``pre`` blocks (DTP's and H-Net's
# place), or the patch embeddings before positions are added (content only: after the position
# embedding, neighbouring tokens differ by position even on a uniform background).
PREDICTOR_INPUTS = ("tokens", "embed")


def drop_path(x: torch.Tensor, prob: float, training: bool, packing: Packing | None) -> torch.Tensor:
    """Stochastic depth per *sample*, also when rows are packed tokens of several samples."""
    if prob == 0.0 or not training:
        return x
    batch = x.shape[0] if packing is None else packing.batch
    keep = x.new_empty(batch).bernoulli_(1.0 - prob).div_(1.0 - prob)
    if packing is not None:
        keep = keep[packing.sample]
    return x * keep.view(-1, *([1] * (x.ndim - 1)))


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    Dense input (B, T, D), or packed rows (N, D) with their :class:`Packing`: the q/k/v and
    output projections run on the packed rows, only SDPA sees the padded layout.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        qkv = self.qkv(x)
        mask = None
        if packing is not None:
            qkv = to_padded(qkv, packing)
            mask = packing.attn_mask
        batch, length, dim3 = qkv.shape
        dim = dim3 // 3
        q, k, v = qkv.view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        if packing is not None:
            out = from_padded(out, packing)
        return self.proj(out)


class DripBlock(nn.Module):
    """Pre-norm transformer block (timm ``Block`` layout and parameter names) that also runs
    on packed short sequences."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), packing), self.drop_path, self.training, packing)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, packing)


class PatchEmbed(nn.Conv2d):
    """Non-overlapping patch projection (no bias, as CLIP's ``conv1``) -> (B, N, D)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Images arrive in whatever dtype the loader made; the weights may be bf16/fp16.
        x = super().forward(x.to(self.weight.dtype))
        return x.flatten(2).transpose(1, 2)


class ConvStem(nn.Module):
    """Patch embedding by stride-2 3x3 convolutions down to the patch grid, then a 1x1
    projection -> (B, N, D). Early convolutions give a ViT its edge and corner detectors
    at once (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"): a tiny
    model trained for minutes then learns shapes, not only colours."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        steps = patch_size.bit_length() - 1
        if patch_size < 2 or 2**steps != patch_size:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
        layers: list[nn.Module] = []
        chans = in_chans
        for i in range(steps):
            out = max(16, dim // 2 ** (steps - i))
            layers += [nn.Conv2d(chans, out, 3, stride=2, padding=1), nn.GELU()]
            chans = out
        layers.append(nn.Conv2d(chans, dim, 1))
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x.to(self.convs[0].weight.dtype))
        return x.flatten(2).transpose(1, 2)


class DripVisionTransformer(nn.Module):
    """ViT with dynamic token pooling between ``pre`` and ``shorten`` blocks (see module doc).

    ``num_classes`` is the output (CLIP embedding) width of the bias-free projection head,
    0 for none; ``global_pool`` one of :data:`POOL_TYPES`. After each forward,
    :attr:`aux` holds ``boundary_loss`` (with grad), ``boundary_rate`` and ``compression``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 32,
        in_chans: int = 3,
        embed_dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        pre: int = 2,
        shorten: int = 10,
        post: int = 0,
        upsample: bool = False,
        compression: float = 10.0,
        predictor_hidden: int | None = None,
        temperature: float = 0.5,
        num_classes: int = 512,
        global_pool: str = "mean_with_cls",
        drop_path_rate: float = 0.0,
        stem: str = "patch",
        predictor: str = "mlp",
        eval_rule: str = "expected",
        straight_through: str = "cumsum",
        predictor_input: str = "tokens",
        selection: str = "threshold",
        tied: bool = False,
    ) -> None:
        super().__init__()
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' (a ViT's linear patch embedding) or 'conv', got {stem!r}")
        if global_pool not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
        if post and not upsample:
            raise ValueError("post blocks need upsample=True (without it they are shorten blocks)")
        if compression <= 1.0:
            raise ValueError(f"compression must be > 1, got {compression}")
        if predictor_input not in PREDICTOR_INPUTS:
            raise ValueError(f"predictor_input must be one of {PREDICTOR_INPUTS}, got {predictor_input!r}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = self.num_features = embed_dim
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.upsample = upsample
        self.compression = compression
        self.predictor_input = predictor_input
        self.layout = (pre, shorten, post)
        self.grad_checkpointing = False
        self.aux: dict[str, torch.Tensor] = {}

        self.patch_embed = (ConvStem if stem == "conv" else PatchEmbed)(patch_size, in_chans, embed_dim)
        scale = embed_dim**-0.5
        self.cls_token = nn.Parameter(scale * torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(scale * torch.randn(1, self.num_patches + 1, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim)

        depth = pre + shorten + post
        # Stochastic depth rising linearly over all blocks (python floats: works on meta too).
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]

        def blocks(start: int, count: int) -> nn.ModuleList:
            return nn.ModuleList(
                DripBlock(embed_dim, num_heads, mlp_ratio, drop_path=dpr[start + i]) for i in range(count)
            )

        self.pre_blocks = blocks(0, pre)
        self.boundary_predictor = make_boundary_predictor(
            predictor, embed_dim, predictor_hidden or embed_dim, 1.0 / compression, temperature, eval_rule,
            straight_through, selection, tied,
        )
        self.shorten_blocks = blocks(pre, shorten)
        self.post_blocks = blocks(pre + shorten, post)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = self._make_head(num_classes)
        self._init_weights()

    def _make_head(self, num_classes: int) -> nn.Module:
        # Bias-free, as CLIP's ``proj``: with timm_proj="" open_clip uses this head as the
        # CLIP projection, so the whole image tower is one module.
        head = nn.Linear(self.embed_dim, num_classes, bias=False) if num_classes else nn.Identity()
        if num_classes:
            nn.init.normal_(head.weight, std=self.embed_dim**-0.5)
        return head

    @torch.no_grad()
    def _init_weights(self) -> None:
        for blk in self.all_blocks():
            for m in blk.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    # --- timm model API (used by open_clip's TimmModel) ---------------------------------
    def all_blocks(self) -> Iterator[nn.Module]:
        """Every transformer block, in execution order."""
        yield from self.pre_blocks
        yield from self.shorten_blocks
        yield from self.post_blocks

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing (non-reentrant) on every pre/shorten/post block."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    @torch.no_grad()
    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the input resolution, resampling the position embedding (bicubic)."""
        self.img_size = to_2tuple(img_size)
        new_grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        if new_grid != self.grid_size:
            pos = resample_abs_pos_embed(self.pos_embed, list(new_grid), list(self.grid_size))
            self.pos_embed = nn.Parameter(pos)
            self.grid_size = new_grid
            self.num_patches = new_grid[0] * new_grid[1]

    # --- forward --------------------------------------------------------------------------
    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, packing: Packing | None) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, packing, use_reentrant=False)
            else:
                x = blk(x, packing)
        return x

    def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        """Images -> final-normed tokens: packed short sequences (N, D), or the full sequence
        (B, 1 + L, D) with upsampling; plus the packing."""
        x = self.patch_embed(x)
        batch, length, _ = x.shape
        if length != self.num_patches:
            raise ValueError(
                f"got {length} patches, model built for {self.num_patches} "
                f"({self.img_size} px); call set_input_size() for another resolution"
            )
        embed = x
        cls = self.cls_token.to(x.dtype).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm_pre(x)
        x = self._run(self.pre_blocks, x, None)

        bnd = self.boundary_predictor(x[:, 1:] if self.predictor_input == "tokens" else embed)
        ids = segment_ids(bnd.hard)
        packing = make_packing(ids)  # the forward's one host synchronisation
        weights = self.boundary_predictor.pooling_weights(bnd)
        short = self._run(self.shorten_blocks, pack_segments(x, packing, weights), packing)

        self.aux = {
            "boundary_loss": self.boundary_predictor.rate_loss(bnd),
            "boundary_rate": (bnd.hard.detach() > 0.5).float().mean(),
            "compression": float(batch * length) / packing.counts.sum(),
        }

        if self.upsample:
            cls_out = short.index_select(0, packing.starts).unsqueeze(1)
            x = x + torch.cat([cls_out, unpack_patches(short, packing)], dim=1)
            return self.norm(self._run(self.post_blocks, x, None)), packing
        return self.norm(short), packing

    def _pool(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Pool each sample's final tokens (dense (B, T, D) or packed (N, D)) -> (B, D)."""
        if x.ndim == 3:  # upsampled: the full, unpadded sequence
            if self.global_pool == "cls":
                return x[:, 0]
            if self.global_pool == "last":
                return x[:, -1]
            return x.mean(1) if self.global_pool == "mean_with_cls" else x[:, 1:].mean(1)
        if self.global_pool == "cls":
            return x.index_select(0, packing.starts)
        if self.global_pool == "last":
            return x.index_select(0, packing.starts + packing.counts)
        if self.global_pool == "mean_with_cls":
            keep, n = None, packing.lengths
        else:
            keep, n = (packing.pos > 0).to(x.dtype).unsqueeze(-1), packing.counts
        src = x.float() if keep is None else x.float() * keep
        sums = torch.zeros(packing.batch, x.shape[-1], device=x.device, dtype=torch.float32)
        return (sums.index_add(0, packing.sample, src) / n.unsqueeze(-1)).to(x.dtype)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (final tokens (B, T, D), valid (B, T) bool).

        Without upsampling T = 1 + the batch's largest segment count (CLS first, zeros at
        padding); with it T = 1 + L and every token is valid.
        """
        tokens, packing = self._forward_tokens(x)
        if tokens.ndim == 3:
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return to_padded(tokens, packing), packing.valid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> embeddings (B, num_classes)."""
        return self.head(self._pool(*self._forward_tokens(x)))


def drip_trunks(module: nn.Module) -> list[DripVisionTransformer]:
    """Every :class:`DripVisionTransformer` inside ``module`` (itself included)."""
    return [m for m in module.modules() if isinstance(m, DripVisionTransformer)]


def drip_aux(model: nn.Module) -> dict[str, torch.Tensor]:
    """Auxiliary outputs of the last forward of the DRIP trunks inside ``model``.

    ``boundary_loss`` (scalar, with grad: add ``weight * boundary_loss`` to the loss),
    ``boundary_rate`` (detached: hard boundaries / patch tokens) and ``compression``
    (detached: patch tokens / segments); averaged if several trunks ran; ``{}`` for
    models without a DRIP trunk (or before their first forward).
    """
    auxes = [t.aux for t in drip_trunks(model) if t.aux]
    if not auxes:
        return {}
    return {k: torch.stack([a[k] for a in auxes]).mean() for k in auxes[0]}


class pinned_segments:
    """Context manager cutting every DRIP trunk's patches into ``segments`` near-equal
    segments per sample (:func:`~dtp_ds.models.boundary.regular_boundaries`), whatever its
    predictor says. Used for FLOP counts and memory checks."""

    def __init__(self, model: nn.Module, segments: int) -> None:
        self.predictors = [t.boundary_predictor for t in drip_trunks(model)]
        self.segments = segments

    def __enter__(self) -> pinned_segments:
        self.saved = [p.forced_segments for p in self.predictors]
        for p in self.predictors:
            p.forced_segments = self.segments
        return self

    def __exit__(self, *exc: object) -> None:
        for p, saved in zip(self.predictors, self.saved):
            p.forced_segments = saved


class capture_boundaries:
    """Context manager collecting the :class:`~dtp_ds.models.boundary.Boundaries` of every
    forward of every DRIP trunk inside ``model`` (``.captured``, in call order): exactly the
    boundaries those forwards pooled with."""

    def __init__(self, model: nn.Module) -> None:
        self.predictors = [t.boundary_predictor for t in drip_trunks(model)]
        self.captured: list = []

    def __enter__(self) -> capture_boundaries:
        self.handles = [p.register_forward_hook(lambda _m, _i, out: self.captured.append(out))
                        for p in self.predictors]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
