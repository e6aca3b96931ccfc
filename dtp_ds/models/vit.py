"""The shared ViT trunk every token reducer plugs into (see ``models/README.md``).

patch embed + CLS + positions -> ``norm_pre`` -> blocks -> final LayerNorm -> pooling ->
bias-free head (the CLIP projection, or a classifier). A :class:`~.reducers.TokenReducer`
acts on the input tokens, at block boundaries or inside blocks (between attention and MLP);
the trunk with the ``none`` reducer is a plain ViT.

Tokens are dense (B, T, D) or packed rows (N, D) of variable-length sequences with their
:class:`~.segments.Packing` (see :mod:`.segments`): token-wise layers run on the real tokens
only and attention on a layout padded to the batch's longest sequence with a key mask.

Plain single-device module. Parameters are only touched inside the ``forward`` of the module
that owns them (ZeRO-3 gathers per module), inputs are cast to the patch embedding's dtype
(DeepSpeed casts every parameter to bf16/fp16).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed, to_2tuple
from torch import nn
from torch.utils.checkpoint import checkpoint

from .protocol import ForwardState, MidBlockFn, TokenWeights, TowerOutput, check_stats
from .segments import Packing, from_padded, to_padded
from .seqcomp import NONE, SeqComp, gather_tokens, pi_resize_kernel, token_keep_indices

POOL_TYPES = ("mean_with_cls", "mean_without_cls", "cls", "last")
STEMS = ("patch", "conv")


def drop_path(x: torch.Tensor, prob: float, training: bool, packing: Packing | None) -> torch.Tensor:
    """Stochastic depth per *sample*, also when rows are packed tokens of several samples."""
    if prob == 0.0 or not training:
        return x
    batch = x.shape[0] if packing is None else packing.batch
    keep = x.new_empty(batch).bernoulli_(1.0 - prob).div_(1.0 - prob)
    if packing is not None:
        keep = keep[packing.sample]
    return x * keep.view(-1, *([1] * (x.ndim - 1)))


def policy_weights(q: torch.Tensor, k: torch.Tensor, gate: torch.Tensor, key_bias: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
    """Attention weights (B, H, T, T), fp32, under a per-key gate (B, T) in [0, 1] (a token
    policy: DynamicViT's): ``w_ij = exp(s_ij) * P_ij / (sum_j exp(s_ij) * P_ij + eps)`` with
    ``P_ij = gate_j`` off the diagonal and 1 on it: no query attends to a gated-off key (weight
    exactly 0 at ``gate_j = 0``), every token still attends to itself. Multiplicative, not an
    additive ``log gate``: at ``gate_j = 0`` the gradient with respect to ``gate_j`` stays finite
    (``exp(s_ij) / sum``), so a policy predictor learns from dropped tokens too; the logits are
    shifted by their maximum over all keys (each ``exp`` at most 1)."""
    scale = q.shape[-1] ** -0.5
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    if key_bias is not None:
        logits = logits + key_bias.float()[:, None, None, :]
    logits = logits - logits.amax(dim=-1, keepdim=True).detach()
    length = gate.shape[1]
    eye = torch.eye(length, device=gate.device, dtype=torch.float32)
    policy = gate.float()[:, None, None, :] * (1.0 - eye) + eye  # (B, 1, T, T)
    weights = logits.exp() * policy
    return weights / (weights.sum(dim=-1, keepdim=True) + eps)


def policy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                     key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention (B, H, T, hd) under a per-key gate (:func:`policy_weights`), in fp32, cast back."""
    return (policy_weights(q, k, gate, key_bias) @ v.float()).to(v.dtype)


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

    def forward(self, x: torch.Tensor, packing: Packing | None = None, key_bias: torch.Tensor | None = None,
                want_keys: bool = False, key_gate: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The per-key terms of :class:`~.protocol.TokenWeights`: ``key_bias`` added to every
        query's logit for each key, (B, T) for dense input or (N,) for packed rows (padded with
        them; padding stays masked); ``key_gate`` (B, T, dense input only) in [0, 1] multiplying
        each key's weight (its own excepted): attention then runs explicitly
        (:func:`policy_attention`), not through SDPA. ``want_keys``: also return the keys
        averaged over heads (B, T, head width), a similarity metric (ToMe's)."""
        qkv = self.qkv(x)
        mask = None
        if key_bias is not None and key_bias.shape != x.shape[:-1]:
            raise ValueError(f"a per-key attention bias (TokenWeights.attn_bias) of shape {tuple(key_bias.shape)} "
                             f"for tokens of shape {tuple(x.shape)}: give one value per token, "
                             f"{tuple(x.shape[:-1])} ((B, T) dense, (N,) packed rows)")
        if packing is not None:
            if key_gate is not None:
                raise ValueError("a per-key attention gate (TokenWeights.attn_gate) applies to dense tokens, "
                                 "not packed rows")
            qkv = to_padded(qkv, packing)
            mask = packing.attn_mask
            if key_bias is not None:
                key_bias = to_padded(key_bias, packing)
        batch, length, dim3 = qkv.shape
        dim = dim3 // 3
        q, k, v = qkv.view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if key_gate is not None:
            out = policy_attention(q, k, v, key_gate, key_bias)
        else:
            if key_bias is not None:
                bias = key_bias[:, None, None, :].to(q.dtype)
                mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        if packing is not None:
            out = from_padded(out, packing)
        out = self.proj(out)
        return (out, k.mean(dim=1)) if want_keys else out


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` layout and parameter names) that also runs
    on packed sequences, with an optional reducer hook between attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, packing: Packing | None = None, mid: MidBlockFn | None = None,
                weights: TokenWeights | None = None) -> tuple[torch.Tensor, Packing | None, TokenWeights | None]:
        """``weights``: the tokens' attention terms (:class:`~.protocol.TokenWeights`), or None;
        ``mid`` may change tokens, packing and weights (returned)."""
        bias, gate = (None, None) if weights is None else (weights.attn_bias, weights.attn_gate)
        h = self.attn(self.norm1(x), packing, bias, want_keys=mid is not None, key_gate=gate)
        if mid is not None:
            h, keys = h
        x = x + drop_path(h, self.drop_path, self.training, packing)
        if mid is not None:
            x, packing, weights = mid(x, packing, weights, keys)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training, packing), packing, weights


class PatchEmbed(nn.Conv2d):
    """Non-overlapping patch projection (no bias, as CLIP's ``conv1``) -> (B, N, D)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=False)

    def forward(self, x: torch.Tensor, patch: int | None = None) -> torch.Tensor:
        """``patch``: run at this patch size with the stored kernel PI-resized to it (FlexiViT;
        the stored kernel is not changed; the image sides must be multiples of ``patch``)."""
        # Images arrive in whatever dtype the loader made; the weights may be bf16/fp16.
        x = x.to(self.weight.dtype)
        if patch is None or patch == self.kernel_size[0]:
            x = super().forward(x)
        else:  # inside this module's forward: ZeRO-3 has gathered the kernel
            x = F.conv2d(x, pi_resize_kernel(self.weight, patch), stride=patch)
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

    def forward(self, x: torch.Tensor, patch: int | None = None) -> torch.Tensor:
        if patch is not None:
            raise ValueError("the conv stem cannot run at another patch size (no single kernel to PI-resize)")
        x = self.convs(x.to(self.convs[0].weight.dtype))
        return x.flatten(2).transpose(1, 2)


_RECORDS: contextvars.ContextVar[tuple[list[TowerOutput], ...]] = contextvars.ContextVar("dtp_ds_tower_records",
                                                                                        default=())


@contextlib.contextmanager
def record_forward() -> Iterator[list[TowerOutput]]:
    """Collect the :class:`TowerOutput` of every trunk forward run inside the block, in call
    order. The caller owns the list (and the graphs in it): nothing stays on the modules, so
    this works however the trunk is wrapped (open_clip's ``CLIP.forward`` under a DeepSpeed
    engine, which must run whole for ZeRO-3 to gather its parameters). Nested recorders each
    see every forward run inside them."""
    records: list[TowerOutput] = []
    token = _RECORDS.set((*_RECORDS.get(), records))
    try:
        yield records
    finally:
        _RECORDS.reset(token)


class VisionTransformer(nn.Module):
    """The shared trunk (see module doc). ``num_classes`` is the width of the bias-free head
    (the CLIP embedding width, or the classes), 0 for none; ``global_pool`` one of
    :data:`POOL_TYPES`; ``reducer`` a :class:`~.reducers.TokenReducer` (``None``: plain ViT)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 32,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 512,
        global_pool: str = "mean_with_cls",
        drop_path_rate: float = 0.0,
        stem: str = "patch",
        reducer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        from .reducers import NoReducer  # reducers build on this module's blocks

        if stem not in STEMS:
            raise ValueError(f"stem must be 'patch' (a ViT's linear patch embedding) or 'conv', got {stem!r}")
        if global_pool not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.any_input_size = False  # True: other image sizes run with resampled positions (multi-crop)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = False
        # the training-time seqcomp strategy a schedule sets (set_seqcomp); not module state
        self.seqcomp: SeqComp = NONE

        self.patch_embed = (ConvStem if stem == "conv" else PatchEmbed)(patch_size, in_chans, embed_dim)
        scale = embed_dim**-0.5
        self.cls_token = nn.Parameter(scale * torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(scale * torch.randn(1, self.num_patches + 1, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim)
        # Stochastic depth rising linearly over all blocks (python floats: works on meta too).
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i]) for i in range(depth))
        self.reducer = reducer if reducer is not None else NoReducer()
        self.reducer.check(self)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = self._make_head(num_classes)
        self._init_weights()
        self._register_load_state_dict_pre_hook(self._upgrade_keys)

    def _upgrade_keys(self, state_dict: dict, prefix: str, *_: Any) -> None:
        self.reducer.upgrade_state_dict(state_dict, prefix)

    def _make_head(self, num_classes: int) -> nn.Module:
        # Bias-free, as CLIP's ``proj``: with timm_proj="" open_clip uses this head as the
        # CLIP projection, so the whole image tower is one module.
        head = nn.Linear(self.embed_dim, num_classes, bias=False) if num_classes else nn.Identity()
        if num_classes:
            nn.init.normal_(head.weight, std=self.embed_dim**-0.5)
        return head

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- timm model API (used by open_clip's TimmModel) ---------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing (non-reentrant) on every block."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Positions and CLS are embeddings: decaying them pulls every position toward the
        # same vector (open_clip decays them because they are 2-d; timm ViTs do not).
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for timm's ``group_parameters`` (open_clip's ``lock_image_tower(unlocked_groups=N)``,
        timm's layer-wise LR decay): the embeddings, each block (the final norm joins the last:
        timm's 99999), then the head and the reducer's own weights, last: new in a warm start,
        they are unlocked first and keep the full LR (``coarse`` groups the same)."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed|^norm_pre",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm\.", (99999,)), (r"^(?:head|reducer)\.", (100000,))]}

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

    # --- seqcomp (training only; see models/seqcomp.py) ----------------------------------
    def check_seqcomp(self, strategy: SeqComp) -> None:
        """``ValueError`` naming the problem when this trunk cannot train under ``strategy``."""
        if strategy.scales(self.patch_size):
            if not isinstance(self.patch_embed, PatchEmbed):
                raise ValueError(f"patch scaling p={strategy.patch}: this trunk has a conv stem (trunk_cfg stem "
                                 f"'conv'), which cannot be PI-resized; use token dropout (r) only with it, or a "
                                 f"model with the linear patch stem (e.g. PatchStem-ViT-Tiny-8)")
            if min(self.img_size) < strategy.patch:
                raise ValueError(f"patch scaling p={strategy.patch}: larger than the {self.img_size} px image")
        gh, gw = strategy.grid(self.img_size, self.patch_size)
        self.reducer.check_input(gh * gw, None if strategy.rate else (gh, gw), strategy.describe())

    def set_seqcomp(self, strategy: SeqComp) -> None:
        """Apply ``strategy`` to every training forward from now on (evaluation never has it)."""
        self.check_seqcomp(strategy)
        self.seqcomp = strategy

    # --- forward --------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images -> (tokens (B, 1 + N, D) after positions and ``norm_pre``, patch embeddings,
        the kept patch indices (B, K) under token dropout or None). In training, under
        :attr:`seqcomp`; the identity strategy runs exactly the path without it."""
        comp = self.seqcomp if self.training else NONE
        if comp.scales(self.patch_size):
            embed, pos = self._embed_scaled(x, comp.patch)
        else:
            embed, pos = self.patch_embed(x), self.pos_embed
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
            if embed.shape[1] != self.num_patches and self.any_input_size and grid[0] * grid[1] == embed.shape[1]:
                # another image size (DINO's local crops): the position table resampled to its grid
                pos = resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid_size), num_prefix_tokens=1)
            elif embed.shape[1] != self.num_patches:
                raise ValueError(
                    f"got {embed.shape[1]} patches, model built for {self.num_patches} "
                    f"({self.img_size} px); call set_input_size() for another resolution"
                )
        batch = embed.shape[0]
        cls = self.cls_token.to(embed.dtype).expand(batch, -1, -1)
        x = torch.cat([cls, embed], dim=1) + pos.to(embed.dtype)
        keep = None
        if comp.rate > 0.0:  # after the positions: a kept token carries its own
            keep = token_keep_indices(batch, embed.shape[1], comp.rate, embed.device)
            x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], keep)], dim=1)
            embed = gather_tokens(embed, keep)
        return self.norm_pre(x), embed, keep

    def _embed_scaled(self, x: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings at patch size ``patch`` and the position table resampled to its grid;
        image sides that ``patch`` does not divide are resized to ``floor(side / patch) * patch``
        (see models/seqcomp.py for why resize, not crop)."""
        h, w = x.shape[-2:]
        grid = (max(1, h // patch), max(1, w // patch))
        if (grid[0] * patch, grid[1] * patch) != (h, w):
            x = F.interpolate(x.float(), size=(grid[0] * patch, grid[1] * patch), mode="bilinear",
                              antialias=True, align_corners=False).to(x.dtype)
        embed = self.patch_embed(x, patch)
        pos = resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid_size), num_prefix_tokens=1)
        return embed, pos

    def _block(self, index: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        blk, mid = self.blocks[index], self.reducer.mid_block(index, st)
        if self.grad_checkpointing and torch.is_grad_enabled():
            x, st.packing, st.weights = checkpoint(blk, x, st.packing, mid, st.weights, use_reentrant=False)
        else:
            x, st.packing, st.weights = blk(x, st.packing, mid, st.weights)
        return x

    def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState, list[torch.Tensor | float]]:
        """Images -> (final-normed tokens, the forward's state, tokens per sample entering each block)."""
        images = x
        x, embed, kept = self._embed(x)
        st = ForwardState(embed=embed, images=images, kept_patches=kept)
        x = self.reducer.on_input(x, st)
        counts: list[torch.Tensor | float] = []
        for i in range(len(self.blocks)):
            x = self.reducer.at_boundary(i, x, st)
            counts.append(st.tokens_per_sample(x))
            x = self._block(i, x, st)
        x = self.norm(self.reducer.at_boundary(len(self.blocks), x, st))
        check_stats(self.reducer, st.stats, self.training)
        return x, st, counts

    def forward_with_aux(self, x: torch.Tensor) -> TowerOutput:
        """Images (B, C, H, W) -> :class:`TowerOutput` (embeddings and the reducer's report)."""
        x, st, counts = self._forward_tokens(x)
        device = x.device
        token_counts = torch.stack([torch.as_tensor(c, dtype=torch.float32).to(device) for c in counts]) \
            if counts else torch.zeros(0, device=device)
        features = self.head(self._pool(x, st.packing, None if st.weights is None else st.weights.pool))
        return TowerOutput(features, st.aux_losses, st.stats, token_counts.detach(), st.groups, st.scores, st.extras)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final tokens (B, T, D), timm's contract (packed sequences padded to the
        longest with zeros; :meth:`forward_tokens_valid` says which tokens are real)."""
        return self.forward_tokens_valid(x)[0]

    def forward_tokens_valid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (final tokens (B, T, D), valid (B, T) bool): packed sequences are padded
        to the longest (zeros at padding)."""
        x, st, _ = self._forward_tokens(x)
        if st.packing is None:
            if st.weights is not None and st.weights.pool is not None:  # tokens pooling ignores are not valid
                return x, st.weights.pool > 0
            return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return to_padded(x, st.packing), st.packing.valid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> embeddings (B, num_classes); the rest of the forward's output
        goes to the caller's :func:`record_forward`, if any."""
        out = self.forward_with_aux(x)
        for records in _RECORDS.get():
            records.append(out)
        return out.features

    def _pool(self, x: torch.Tensor, packing: Packing | None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Pool each sample's final tokens (dense (B, T, D) or packed (N, D)) -> (B, D); ``weights``
        (B, T, dense only; :attr:`TokenWeights.pool`) weigh the mean (a merged token as the patches
        it stands for, a token policy by its value)."""
        if packing is not None and weights is not None:
            raise ValueError("pooling weights (TokenWeights.pool) apply to dense tokens, not packed rows")
        if packing is None:
            if self.global_pool == "cls":
                return x[:, 0]
            if self.global_pool == "last":
                return x[:, -1]
            start = 0 if self.global_pool == "mean_with_cls" else 1
            if weights is None:
                return x[:, start:].mean(1)
            w = weights[:, start:].float().unsqueeze(-1)
            return ((x[:, start:].float() * w).sum(1) / w.sum(1).clamp_min(1e-6)).to(x.dtype)
        if self.global_pool == "cls":
            return x.index_select(0, packing.starts)
        if self.global_pool == "last":
            return x.index_select(0, packing.starts + packing.lengths - 1)
        if self.global_pool == "mean_with_cls":
            keep, n = None, packing.lengths
        else:
            keep, n = (packing.pos > 0).to(x.dtype).unsqueeze(-1), packing.counts
        src = x.float() if keep is None else x.float() * keep
        sums = torch.zeros(packing.batch, x.shape[-1], device=x.device, dtype=torch.float32)
        return (sums.index_add(0, packing.sample, src) / n.unsqueeze(-1)).to(x.dtype)


def trunks(module: nn.Module) -> list[VisionTransformer]:
    """Every :class:`VisionTransformer` inside ``module`` (itself included)."""
    return [m for m in module.modules() if isinstance(m, VisionTransformer)]
