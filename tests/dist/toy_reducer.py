"""A token reducer of a test's own, in its own file: the model JSON names it as
``"type": "tests.dist.toy_reducer:StrideReducer"`` and nothing in dtp_ds changes."""
from __future__ import annotations

import torch

from dtp_ds.models import ForwardState, TokenReducer


class StrideReducer(TokenReducer):
    """Before block ``at``: keep CLS and every ``stride``-th patch token, each scaled by a learned
    gate; an auxiliary loss pulls the mean gate toward 1 (so it has a gradient to follow)."""

    stat_names = ("kept_fraction",)

    def __init__(self, dim: int, depth: int, num_patches: int, at: int = 1, stride: int = 2) -> None:
        super().__init__()
        self.at, self.stride = at, stride
        self.gate = torch.nn.Parameter(torch.full((dim,), 0.5))

    def at_boundary(self, index: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        if index != self.at:
            return x
        kept = x[:, 1::self.stride] * self.gate
        st.aux_losses["gate_loss"] = (self.gate.float().mean() - 1.0).square()
        st.stats["kept_fraction"] = torch.tensor(kept.shape[1] / (x.shape[1] - 1), device=x.device)
        return torch.cat([x[:, :1], kept], dim=1)

    def planned_tokens(self, patches: int, depth: int, rate: float | None = None) -> list[float]:
        kept = 1.0 + len(range(0, patches, self.stride))
        return [patches + 1.0] * self.at + [kept] * (depth - self.at)
