"""Segment pooling for dynamic token pooling, vectorised with index ops, and packed short sequences.

A boundary at patch position ``l`` ends the segment that contains ``l``; the patches after
the last boundary form one more segment. Segment ids are an exclusive cumulative sum of the
hard boundaries, so no ``L x S`` assignment matrix is ever built.

Short sequences are *packed*: sample ``b``'s sequence ``[CLS, segment 0, ..., segment n_b - 1]``
occupies rows ``starts[b] ... starts[b] + n_b`` of one ``(N, D)`` tensor, ``N = sum(1 + n_b)``.
Token-wise layers (LayerNorm, Linear, MLP: nearly all the FLOPs) run on the packed rows, so no
compute is spent on padding; only attention sees a padded ``(B, T, D)`` layout with
``T = 1 + max n_b`` and a key mask. Means are ``index_add`` into the packed rows, broadcasting
back to the patches is ``index_select``; both are their own adjoints under autograd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def segment_ids(hard: torch.Tensor) -> torch.Tensor:
    """Segment index of every position: the number of boundaries strictly before it.

    ``hard``: (B, L) 0/1 boundaries (any dtype). Returns (B, L) int64 ids in ``[0, L)``.
    """
    # Threshold rather than cast: straight-through values ``h + p - p`` are 0/1 only up to
    # rounding (0.99999994 would truncate to 0).
    hard = (hard.detach() > 0.5).to(torch.int64)
    return hard.cumsum(-1) - hard


def straight_through_weights(boundaries: torch.Tensor) -> torch.Tensor:
    """Pooling weights whose value is 1 and whose gradient reaches the soft boundaries.

    Nawrot et al. (2023) build the pooling matrix from ``s - (cumsum(b) - b)`` with
    straight-through boundaries ``b``; the entry a token gets in its own segment is
    ``1 + (E - E.detach())`` where ``E`` is the exclusive cumulative sum of ``b``. The same
    per-token weight, applied in numerator and denominator of the mean, gives the same
    gradient without the matrix.
    """
    excl = boundaries.cumsum(-1) - boundaries
    return 1.0 + (excl - excl.detach())


@dataclass
class Packing:
    """Layout of a batch of packed short sequences (see the module docstring)."""

    batch: int
    num_rows: int  # N = sum(lengths)
    max_len: int  # T = max(lengths), the padded length attention sees
    counts: torch.Tensor  # (B,) segments per sample
    lengths: torch.Tensor  # (B,) 1 + counts
    starts: torch.Tensor  # (B,) row of each sample's CLS token
    sample: torch.Tensor  # (N,) sample of each row
    pos: torch.Tensor  # (N,) position of each row in its sequence (0 = CLS)
    pad_index: torch.Tensor  # (N,) row's index in the flattened (B * T) padded layout
    patch_rows: torch.Tensor  # (B * L,) row holding each patch's segment
    padded: bool  # False when every sample has the same length (packed == padded layout)
    valid: torch.Tensor  # (B, T) bool, True at real tokens of the padded layout
    attn_mask: torch.Tensor | None  # (B, 1, 1, T) SDPA key mask (True = attend); None without padding


def make_packing(ids: torch.Tensor) -> Packing:
    """Packing for segment ids (B, L). Holds the forward's one host synchronisation."""
    batch, _ = ids.shape
    device = ids.device
    counts = ids[:, -1] + 1  # ids are non-decreasing: the last is the largest
    lengths = counts + 1
    # One device->host copy for the three sizes the layout needs.
    max_len, min_len, total = torch.stack([lengths.max(), lengths.min(), lengths.sum()]).tolist()
    starts = lengths.cumsum(0) - lengths
    sample = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=total)
    pos = torch.arange(total, device=device) - starts[sample]
    valid = torch.arange(max_len, device=device) < lengths.unsqueeze(1)
    padded = min_len != max_len
    return Packing(
        batch=batch,
        num_rows=total,
        max_len=max_len,
        counts=counts,
        lengths=lengths,
        starts=starts,
        sample=sample,
        pos=pos,
        pad_index=sample * max_len + pos,
        patch_rows=(starts.unsqueeze(1) + 1 + ids).reshape(-1),
        padded=padded,
        valid=valid,
        # Built once per forward, shared by every shorten block.
        attn_mask=valid[:, None, None, :] if padded else None,
    )


def pack_segments(x: torch.Tensor, packing: Packing, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-pool patch tokens within segments, CLS kept: (B, 1 + L, D) -> packed (N, D).

    Accumulates in fp32 (fp64 stays fp64) so bf16/fp16 sums keep their precision; returns
    ``x.dtype``. ``weights`` (B, L), e.g. :func:`straight_through_weights`, carries the boundary
    gradient; ``None`` means plain counts.
    """
    batch, length, dim = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    patches = x[:, 1:].to(acc)
    if weights is None:
        w = torch.ones(batch * (length - 1), device=x.device, dtype=acc)
    else:
        w = weights.to(acc).reshape(-1)
        patches = patches * weights.to(acc).unsqueeze(-1)
    rows = packing.num_rows
    num = torch.zeros(rows, dim, device=x.device, dtype=acc)
    num = num.index_add(0, packing.starts, x[:, 0].to(acc)).index_add(
        0, packing.patch_rows, patches.reshape(-1, dim)
    )
    den = torch.zeros(rows, device=x.device, dtype=acc)
    den = den.index_add(0, packing.starts, torch.ones(batch, device=x.device, dtype=acc))
    den = den.index_add(0, packing.patch_rows, w)  # every row gets >= 1: no division by zero
    return (num / den.unsqueeze(-1)).to(x.dtype)


def row_sizes(packing: Packing) -> torch.Tensor:
    """Patches each packed row stands for, (N,) fp32: a segment its patch count, CLS 1."""
    ones = torch.ones(packing.patch_rows.numel(), device=packing.patch_rows.device)
    sizes = torch.zeros(packing.num_rows, device=ones.device).index_add(0, packing.patch_rows, ones)
    return sizes.clamp_min(1.0)  # CLS rows hold no patch


def unpack_patches(packed: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Give every patch its segment's row: packed (N, D) -> (B, L, D)."""
    return packed.index_select(0, packing.patch_rows).view(packing.batch, -1, packed.shape[-1])


def to_padded(packed: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Packed (N, ...) -> padded (B, T, ...), zeros at padding."""
    shape = (packing.batch, packing.max_len, *packed.shape[1:])
    if not packing.padded:
        return packed.view(shape)  # equal lengths: packed rows already are the padded layout
    flat = packed.new_zeros(packing.batch * packing.max_len, *packed.shape[1:])
    return flat.index_copy(0, packing.pad_index, packed).view(shape)


def from_padded(padded: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Padded (B, T, ...) -> packed (N, ...), padding dropped."""
    flat = padded.reshape(packing.batch * packing.max_len, *padded.shape[2:])
    return flat if not packing.padded else flat.index_select(0, packing.pad_index)
