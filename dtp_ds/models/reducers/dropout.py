"""FLIP patch dropout (Li et al. 2023, "Scaling Language-Image Pre-training via Masking"): in
training, each image keeps a random subset of its patch tokens (CLS always kept), through timm's
``PatchDropout``; evaluation sees every patch. ``ordered`` keeps the kept patches in raster order.
FLIP ends with a short unmasked segment of training: ``final_unmasked`` is that fraction of the
run's steps, a :class:`UnmaskedFinal` schedule the Trainer steps and checkpoints.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import PatchDropout

from ..protocol import ForwardState
from . import TokenReducer, register_reducer


@register_reducer("patch_dropout")
class PatchDropoutReducer(TokenReducer):
    """Drop ``prob`` of the patch tokens in training (keep ``max(1, int(N (1 - prob)))``)."""

    stat_names = ("compression",)

    def __init__(self, dim: int, depth: int, num_patches: int, prob: float = 0.5, ordered: bool = True,
                 final_unmasked: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch dropout prob must be in [0, 1), got {prob}")
        if not 0.0 <= final_unmasked < 1.0:
            raise ValueError(f"final_unmasked (a fraction of the run's steps) must be in [0, 1), got {final_unmasked}")
        self.prob, self.final_unmasked = prob, final_unmasked
        self.drop = PatchDropout(prob, num_prefix_tokens=1, ordered=ordered)

    def set_prob(self, prob: float) -> None:
        self.drop.prob = prob

    def on_input(self, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        x = self.drop(x)
        st.stats["compression"] = torch.tensor(st.patches / (x.shape[1] - 1), device=x.device)
        return x

    def planned_tokens(self, patches: int, depth: int, rate: float | None = None) -> list[float]:
        """Training's tokens (evaluation runs every patch)."""
        prob = self.drop.prob if rate is None else rate
        return [1.0 + (max(1, int(patches * (1.0 - prob))) if prob else patches)] * depth

    def schedule(self, total_steps: int) -> UnmaskedFinal | None:
        return UnmaskedFinal(self, total_steps) if self.final_unmasked else None


class UnmaskedFinal:
    """Patch dropout at its configured rate, then off for the last ``final_unmasked`` of the
    ``total_steps`` (FLIP's unmasked tuning)."""

    def __init__(self, reducer: PatchDropoutReducer, total_steps: int) -> None:
        self.reducer, self.total_steps = reducer, total_steps
        self.switch_at = int(round(total_steps * (1.0 - reducer.final_unmasked)))
        self.step_done = 0

    def step(self, state: Any) -> None:
        self.step_done = state.step
        self.reducer.set_prob(0.0 if self.step_done >= self.switch_at else self.reducer.prob)

    def state_dict(self) -> dict[str, Any]:
        return {"step_done": self.step_done, "switch_at": self.switch_at, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_done, self.switch_at = state["step_done"], state["switch_at"]
        self.reducer.set_prob(0.0 if self.step_done >= self.switch_at else self.reducer.prob)
