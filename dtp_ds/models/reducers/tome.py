"""ToMe: token merging between attention and MLP in every block (Bolya et al. 2023, "Token
Merging: Your ViT but Faster"), re-implemented from the paper.

In block ``i`` the tokens are split alternately into sets A (even positions, CLS among them) and
B (odd positions); each A token's most similar B token is found by cosine similarity of the
attention keys (averaged over heads); the ``r_i`` A tokens with the most similar partners are
merged into them (a size-weighted mean), so the sequence loses ``r_i`` tokens. Token sizes (how
many patches a token stands for) are carried from block to block as the tokens'
:class:`~dtp_ds.models.protocol.TokenWeights`: their pooling weights, and their log as each key's
attention bias ("proportional attention": a merged token attends as the tokens it stands for). CLS is never
merged and stays first; the other tokens keep their relative order within A and within B.
Matching has no gradient (it is an argmax); the merged values do.

``r``: one int per block (a schedule), or one int for every block. With few tokens (49 at
ViT-B-32) a constant r collapses the sequence within a few blocks: give a decreasing list.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..protocol import ForwardState, MidBlockFn, TokenWeights
from ..segments import Packing
from . import TokenReducer, register_reducer


def mergeable(tokens: int, r: int) -> int:
    """How many tokens one bipartite step can merge: A (even positions) less CLS, at most |B|."""
    return max(0, min(r, (tokens + 1) // 2 - 1, tokens // 2))


def bipartite_merge(x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of ``x`` (B, T, D) with sizes (B, T) by bipartite soft matching on
    ``metric`` (B, T, C); CLS (position 0) is kept first. Returns (x, sizes) of T - r tokens."""
    if r <= 0:
        return x, sizes
    with torch.no_grad():
        m = F.normalize(metric.float(), dim=-1)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(1, 2)
        scores[:, 0] = -torch.inf  # CLS is never merged
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src = order[:, :r]  # A tokens merged away
        keep = order[:, r:].sort(dim=-1).values  # A tokens kept, in their order (CLS first)
        dst = partner.gather(1, src)
    dim = x.shape[-1]
    xa, xb = x[:, ::2], x[:, 1::2]
    sa, sb = sizes[:, ::2], sizes[:, 1::2]
    weighted_a = (xa.float() * sa.unsqueeze(-1))
    # B tokens absorb their partners: size-weighted sums, then divided by the new sizes
    sum_b = (xb.float() * sb.unsqueeze(-1)).scatter_add(
        1, dst.unsqueeze(-1).expand(-1, -1, dim), weighted_a.gather(1, src.unsqueeze(-1).expand(-1, -1, dim)))
    size_b = sb.scatter_add(1, dst, sa.gather(1, src))
    kept_a = xa.gather(1, keep.unsqueeze(-1).expand(-1, -1, dim))
    merged_b = (sum_b / size_b.unsqueeze(-1)).to(x.dtype)
    return torch.cat([kept_a, merged_b], dim=1), torch.cat([sa.gather(1, keep), size_b], dim=1)


@register_reducer("tome")
class ToMeReducer(TokenReducer):
    """ToMe (see module doc). Reports ``compression`` (patch tokens / tokens after the last block,
    CLS aside)."""

    stat_names = ("compression",)

    def __init__(self, dim: int, depth: int, num_patches: int, r: int | list[int] = 0) -> None:
        super().__init__()
        schedule = [int(r)] * depth if isinstance(r, int) else [int(v) for v in r]
        if len(schedule) != depth or any(v < 0 for v in schedule):
            raise ValueError(f"ToMe r: one non-negative int or {depth} of them (one per block), got {r!r}")
        self.r = schedule  # a step merges at most half the tokens: one patch token always remains

    def planned_tokens(self, patches: int, depth: int, rate: float | None = None) -> list[float]:
        tokens, out = patches + 1, []
        for r in self.r:
            out.append(float(tokens))
            tokens -= mergeable(tokens, r)
        return out

    def mid_block(self, index: int, st: ForwardState) -> MidBlockFn | None:
        r = self.r[index]
        if r == 0:
            return None

        def merge(x: torch.Tensor, packing: Packing | None, weights: TokenWeights | None,
                  metric: torch.Tensor) -> tuple[torch.Tensor, Packing | None, TokenWeights]:
            if packing is not None:
                raise ValueError("ToMe merges dense sequences; it cannot follow a reducer that packs rows")
            if weights is not None and weights.attn_gate is not None:
                raise ValueError("ToMe merges tokens by size; it cannot follow a reducer that gates attention")
            # the sizes so far are the pooling weights (every token one patch before the first merge)
            sizes = weights.pool if weights is not None else None
            if sizes is None:
                sizes = x.new_ones(x.shape[:2], dtype=torch.float32)
            x, sizes = bipartite_merge(x, sizes, metric, mergeable(x.shape[1], r))
            return x, packing, TokenWeights(attn_bias=sizes.log(), pool=sizes)

        return merge

    def at_boundary(self, index: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        if index == len(self.r):
            st.stats["compression"] = torch.tensor(st.patches / max(1, x.shape[1] - 1), device=x.device)
        return x
