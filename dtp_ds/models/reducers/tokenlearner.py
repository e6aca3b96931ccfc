"""TokenLearner (Ryoo et al. 2021, "TokenLearner: What Can 8 Learned Tokens Do for Images and
Videos?"), version 1.1 as its authors released it: before block ``at``, the patch tokens are
replaced by ``tokens`` learned ones. Each learned token is a weighted mean of the patch tokens,
its weights a softmax over positions of one output of a small MLP (LayerNorm, Linear, GELU,
Linear) on the patch tokens. CLS is kept in front; blocks ``[at, depth)`` run on ``1 + tokens``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..protocol import ForwardState
from . import TokenReducer, register_reducer


@register_reducer("tokenlearner")
class TokenLearnerReducer(TokenReducer):
    """Learn ``tokens`` tokens before block ``at`` (see module doc). Reports ``compression``
    (patch tokens / learned tokens)."""

    stat_names = ("compression",)

    def __init__(self, dim: int, depth: int, num_patches: int, at: int, tokens: int = 8,
                 hidden: int | None = None) -> None:
        super().__init__()
        if not 0 < at < depth:
            raise ValueError(f"TokenLearner at={at}: must be a block boundary inside the trunk (1..{depth - 1})")
        if not 0 < tokens <= num_patches:
            raise ValueError(f"TokenLearner tokens={tokens}: must be in 1..{num_patches} (the patches)")
        self.at, self.tokens = at, tokens
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden or dim), nn.GELU(), nn.Linear(hidden or dim, tokens))

    def planned_tokens(self, patches: int, depth: int, rate: float | None = None) -> list[float]:
        return [patches + 1.0] * self.at + [self.tokens + 1.0] * (depth - self.at)

    def at_boundary(self, index: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        if index != self.at:
            return x
        patches = x[:, 1:]
        weights = self.mlp(self.norm(patches)).float().softmax(dim=1)  # (B, N, S): softmax over positions
        learned = torch.einsum("bns,bnd->bsd", weights, patches.float()).to(x.dtype)
        st.stats["compression"] = torch.tensor(st.patches / self.tokens, device=x.device)
        return torch.cat([x[:, :1], learned], dim=1)
