"""Grouping layers in the style of the Native Segmentation ViT (Brasó, Ošep, Leal-Taixé 2025,
"Native Segmentation Vision Transformers"; no official code: re-implemented from the paper's
description). The patch tokens are clustered into fewer tokens at chosen block boundaries:

- **local grouping** (before each block of ``local_at``): the current tokens form a 2-D grid (the
  patch grid, then the previous layer's centroid grid). Centroids start as a strided convolution of
  the (LayerNorm'd) token grid (kernel = stride = ``stride``: the grid shrinks by ``stride`` per
  side), then ``iters`` rounds of soft k-means: each token is softly assigned among the centroids
  of the 3x3 window of centroid cells around its own cell (a softmax over those <= 9 candidates of
  ``<W_k x, W_q c> / sqrt(D)``), and each centroid becomes the assignment-weighted mean of the
  projected tokens ``W_v x`` that assigned to it. Windows are formed with ``unfold`` and the
  updates scattered back with ``fold`` (its adjoint): no loop over positions.
- **dense grouping** (before block ``dense_at``): ``tokens`` centroids, initialised by average
  pooling the current grid to a ``th x tw`` grid plus a learned embedding per centroid, soft
  k-means against every current token (softmax over all centroids).

A grouping layer's output token is the assignment-weighted mean of the *unnormalised* input tokens
(the residual stream keeps its scale) plus a projection of the final centroid. CLS stays in front,
untouched; every sample keeps the same count (dense tensors), and nothing is random, so evaluation
is deterministic. ``st.groups`` (B, N): the group each patch ended in, following the hard (argmax)
assignment of every layer in turn; ``st.extras["assignments"]``: each layer's soft assignment as a
dense detached (B, tokens in, tokens out) matrix.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..protocol import ForwardState
from . import TokenPlan, TokenReducer, register_reducer


def _near_square(n: int) -> tuple[int, int]:
    """``n = th * tw`` with ``th <= tw`` as close as possible."""
    th = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return th, n // th


def _to_cells(x: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """Raster (B, h*w, C) -> per centroid cell (B, h/s * w/s, s*s, C)."""
    b, _, c = x.shape
    h, w = grid
    return x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, (h // s) * (w // s), s * s, c)


def _from_cells(x: torch.Tensor, grid: tuple[int, int], s: int) -> torch.Tensor:
    """Inverse of :func:`_to_cells` (any trailing shape after the cell axes)."""
    b, rest = x.shape[0], x.shape[3:]
    h, w = grid
    x = x.view(b, h // s, w // s, s, s, *rest).transpose(2, 3)
    return x.reshape(b, h * w, *rest)


def _neighbours(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Grid values (B, h*w, C) -> each cell's 3x3 neighbourhood (B, h*w, 9, C), zeros outside."""
    b, m, c = x.shape
    cols = F.unfold(x.transpose(1, 2).reshape(b, c, *grid), kernel_size=3, padding=1)  # (B, C*9, m)
    return cols.view(b, c, 9, m).permute(0, 3, 2, 1)


def _gather_back(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Adjoint of :func:`_neighbours`: (B, h*w, 9, C) -> (B, h*w, C), each value added to the
    neighbour cell it belongs to (what lands outside the grid is dropped)."""
    b, m, _, c = x.shape
    out = F.fold(x.permute(0, 3, 2, 1).reshape(b, c * 9, m), output_size=grid, kernel_size=3, padding=1)
    return out.flatten(2).transpose(1, 2)


def window_index(grid: tuple[int, int], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For a centroid grid: (index (m, 9) long of each cell's 3x3 neighbours, valid (m, 9) bool)."""
    m = grid[0] * grid[1]
    ids = torch.arange(m, device=device, dtype=torch.float32).view(1, m, 1)
    ones = torch.ones(1, m, 1, device=device)
    return _neighbours(ids, grid)[0, :, :, 0].long(), _neighbours(ones, grid)[0, :, :, 0] > 0.5


class GroupingLayer(nn.Module):
    """One grouping layer: ``stride`` set: local (3x3 windows on the grid), else dense with
    ``tokens`` centroids. ``forward(x, grid)`` -> (centroid tokens, their grid, hard assignment
    (B, n) of each input token, soft assignment as a dense (B, n, m) matrix, detached)."""

    def __init__(self, dim: int, iters: int, stride: int | None = None, tokens: int | None = None) -> None:
        super().__init__()
        self.iters, self.stride, self.tokens = iters, stride, tokens
        self.scale = dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.norm_c = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        if stride is not None:
            self.init = nn.Conv2d(dim, dim, kernel_size=stride, stride=stride)
        else:
            self.slots = nn.Parameter(dim**-0.5 * torch.randn(tokens, dim))
        self._init_weights(dim)

    @torch.no_grad()
    def _init_weights(self, dim: int) -> None:
        # k-means in the normalised token space at init: W_k = W_v = W_q = I and the strided
        # convolution an average pooling, so the first assignments follow content (small random
        # projections would give near-uniform assignments and identical centroids).
        for lin in (self.to_kv, self.to_q, self.proj):
            nn.init.zeros_(lin.bias)
        eye = torch.eye(dim, device=self.to_q.weight.device)
        self.to_q.weight.copy_(eye)
        self.to_kv.weight.copy_(torch.cat([eye, eye]))
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        if self.stride is not None:
            self.init.weight.copy_(eye[:, :, None, None].expand(-1, -1, self.stride, self.stride) / self.stride**2)
            nn.init.zeros_(self.init.bias)

    def out_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        if self.stride is None:
            return _near_square(self.tokens)
        return grid[0] // self.stride, grid[1] // self.stride

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor,
                                                                    torch.Tensor]:
        b, n, d = x.shape
        dtype = x.dtype
        xn = self.norm(x)
        out_grid = self.out_grid(grid)
        spatial = xn.transpose(1, 2).reshape(b, d, *grid)
        if self.stride is not None:
            c = self.init(spatial).flatten(2).transpose(1, 2)
        else:
            c = F.adaptive_avg_pool2d(spatial, out_grid).flatten(2).transpose(1, 2) + self.slots.to(dtype)
        k, v = self.to_kv(xn).float().chunk(2, dim=-1)
        # what the centroids average: the projected tokens, a one (the mass), and in the last
        # round also the raw tokens (the output's residual)
        ones = v.new_ones(*v.shape[:2], 1)
        inner, last = torch.cat([v, ones], dim=-1), torch.cat([v, ones, x.float()], dim=-1)
        if self.stride is not None:
            s = self.stride
            index, valid = window_index(out_grid, x.device)
            k, inner, last = (_to_cells(t, grid, s) for t in (k, inner, last))  # (B, m, s*s, .)
            bias = torch.zeros(valid.shape, device=x.device).masked_fill(~valid, float("-inf"))
        for it in range(self.iters):
            q = self.to_q(self.norm_c(c.to(dtype))).float()
            payload = last if it == self.iters - 1 else inner
            if self.stride is not None:
                # (B, m, s*s, 9): each token of cell c against the centroids of c's 3x3 window
                logits = torch.einsum("bctd,bckd->bctk", k, _neighbours(q, out_grid)) * self.scale
                a = (logits + bias[:, None]).softmax(-1)
                sums = _gather_back(torch.einsum("bctk,bctd->bckd", a, payload), out_grid)  # (B, m, .)
            else:
                a = (torch.einsum("bnd,bmd->bnm", k, q) * self.scale).softmax(-1)  # (B, n, m)
                sums = torch.einsum("bnm,bnd->bmd", a, payload)
            means = sums / sums[..., d:d + 1].clamp_min(1e-6)
            c = means[..., :d]
        residual = means[..., d + 1:]
        out = residual.to(dtype) + self.proj(c.to(dtype))
        with torch.no_grad():
            if self.stride is not None:
                cells = torch.arange(a.shape[1], device=x.device)[:, None]
                hard = _from_cells(index[cells, a.argmax(-1)], grid, self.stride)
                dense = x.new_zeros(b, a.shape[1], a.shape[2], out.shape[1], dtype=torch.float32)
                dense.scatter_add_(3, index[None, :, None, :].expand(b, -1, a.shape[2], -1), a)
                dense = _from_cells(dense, grid, self.stride)
            else:
                hard, dense = a.argmax(-1), a
        return out, out_grid, hard, dense.detach()


@register_reducer("grouping")
class GroupingReducer(TokenReducer):
    """Local grouping layers before the blocks ``local_at`` (each divides the grid side by
    ``stride``), then a dense grouping layer to ``tokens`` tokens before block ``dense_at``
    (``None``: none). See the module doc. Reports ``compression`` (patch tokens / final tokens)."""

    stat_names = ("compression",)

    def __init__(self, dim: int, depth: int, num_patches: int, local_at: Sequence[int] = (2,), stride: int = 2,
                 dense_at: int | None = 4, tokens: int = 8, iters: int = 2) -> None:
        super().__init__()
        local_at = [int(i) for i in ([local_at] if isinstance(local_at, int) else local_at)]
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"grouping needs a square patch grid, got {num_patches} patches")
        if not local_at and dense_at is None:
            raise ValueError("grouping needs at least one grouping layer: give local_at and/or dense_at")
        for at in [*local_at, *([] if dense_at is None else [dense_at])]:
            if not 0 < at < depth:
                raise ValueError(f"grouping at block {at}: must be a block boundary inside the trunk (1..{depth - 1})")
        if any(b <= a for a, b in zip(local_at, local_at[1:])):
            raise ValueError(f"grouping local_at={local_at}: must be strictly increasing")
        if dense_at is not None and local_at and dense_at < local_at[-1]:
            raise ValueError(f"grouping dense_at={dense_at} comes before local_at={local_at}: the dense layer is last")
        if local_at and stride < 2:
            raise ValueError(f"grouping stride={stride}: must be at least 2")
        if local_at and side % stride ** len(local_at):
            raise ValueError(f"grouping: a {side}x{side} patch grid cannot be divided by stride {stride} "
                             f"{len(local_at)} times (needs a side divisible by {stride ** len(local_at)})")
        if dense_at is not None and not 0 < tokens <= num_patches:
            raise ValueError(f"grouping tokens={tokens}: must be in 1..{num_patches} (the patches)")
        if iters < 1:
            raise ValueError(f"grouping iters={iters}: at least one soft k-means round")
        self.local_at, self.dense_at, self.stride, self.tokens, self.side = local_at, dense_at, stride, tokens, side
        self.local = nn.ModuleList(GroupingLayer(dim, iters, stride=stride) for _ in local_at)
        self.dense = GroupingLayer(dim, iters, tokens=tokens) if dense_at is not None else None

    def check(self, trunk: nn.Module) -> None:
        grid = tuple(getattr(trunk, "grid_size", (self.side, self.side)))
        if grid != (self.side, self.side):
            raise ValueError(f"grouping was built for a {self.side}x{self.side} patch grid, the trunk has {grid}")

    def check_input(self, patches: int, grid: tuple[int, int] | None, strategy: str) -> None:
        if grid is None:
            raise ValueError(f"the grouping reducer cannot train under seqcomp {strategy}: its local "
                             f"3x3 windows need the whole patch grid, and token dropout leaves a random subset; "
                             f"use patch scaling only (p=...) with grouping")
        if grid[0] != grid[1] or (self.local and grid[0] % self.stride ** len(self.local)):
            raise ValueError(f"the grouping reducer cannot train under seqcomp {strategy}: a {grid[0]}x"
                             f"{grid[1]} patch grid is not square or not divisible by stride {self.stride} "
                             f"{len(self.local)} times; choose a patch size giving such a grid")

    def _layers(self) -> list[tuple[int, GroupingLayer]]:
        found = list(zip(self.local_at, self.local))
        return found + ([(self.dense_at, self.dense)] if self.dense is not None else [])

    def planned_tokens(self, patches: int, depth: int, rate: float | None = None) -> list[float]:
        side = math.isqrt(patches)
        counts, current = [], float(patches)
        layers = self._layers()
        for i in range(depth):
            for at, layer in layers:
                if at == i:
                    if layer.stride is not None:
                        side //= layer.stride
                        current = float(side * side)
                    else:
                        current = float(layer.tokens)
            counts.append(current + 1.0)
        return counts

    def plan(self, patches: int, depth: int, width: int, rate: float | None = None,
             padding_sigmas: float = 3.0) -> TokenPlan:
        """Dense blocks; the grouping layers' own saved activations, roughly (fp32): per layer
        the normed tokens, keys, values and their per-cell copies (~10 n D), and per round the
        centroid queries and their 3x3 neighbourhoods, the assignments and the means."""
        base = super().plan(patches, depth, width, rate, padding_sigmas)
        saved, n = 0.0, float(patches)
        for _, layer in self._layers():
            m = float(layer.tokens) if layer.stride is None else n / layer.stride**2
            candidates = m if layer.stride is None else 9.0
            window = 0.0 if layer.stride is None else 9.0 * m * width
            saved += 10 * n * width + layer.iters * (6 * m * width + window + 2 * n * candidates) + m * width
            n = m
        return dataclasses.replace(base, reducer_bytes=4.0 * saved)

    def at_boundary(self, index: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        layers = [layer for at, layer in self._layers() if at == index]
        if not layers:
            return x
        grid = st.carry  # the grid the previous layer left (None before the first)
        if grid is None:
            side = math.isqrt(st.patches)
            if side * side != st.patches or side % self.stride ** len(self.local):
                raise ValueError(f"grouping: {st.patches} patches do not form a grid this reducer can divide")
            grid = (side, side)
        for layer in layers:
            out, grid, hard, soft = layer(x[:, 1:], grid)
            st.groups = hard if st.groups is None else hard.gather(1, st.groups)
            st.extras.setdefault("assignments", []).append(soft)
            x = torch.cat([x[:, :1], out], dim=1)
        st.carry = grid
        st.stats["compression"] = torch.tensor(st.patches / (x.shape[1] - 1), device=x.device)
        return x
