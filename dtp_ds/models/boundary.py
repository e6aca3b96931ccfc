"""Boundary predictor (Gumbel-Sigmoid, straight-through) and the boundary-rate loss.

Everything here runs in fp32 whatever the parameter dtype or autocast state: the users
saw the sigmoid overflow to NaN in fp16 at high learning rates, so logits are clamped to
``[-LOGIT_CLAMP, LOGIT_CLAMP]`` before the sigmoid and probabilities to
``[PROB_EPS, 1 - PROB_EPS]`` after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_CLAMP = 20.0
PROB_EPS = 1e-4
_NOISE_EPS = 1e-6


class Fp32Linear(nn.Linear):
    """``nn.Linear`` computed in fp32 with autocast off, whatever dtype its weights are in.

    Its own ``forward`` reads its own parameters, so ZeRO-3 gathers them as usual.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), bias)


@dataclass
class Boundaries:
    """One forward's boundaries over the patch tokens, all (B, L) fp32.

    ``probs``: clamped per-token boundary probabilities (the relaxed sample when training);
    ``hard``: straight-through boundaries, value in {0, 1}, gradient of ``probs``.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    hard: torch.Tensor


def sample_boundaries(
    logits: torch.Tensor, temperature: float, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-Sigmoid (RelaxedBernoulli) sample when ``stochastic``, else plain sigmoid.

    Returns ``(probs, hard)`` where ``hard = 1[probs > 0.5]`` with the straight-through
    gradient of ``probs``.
    """
    logits = logits.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    if stochastic:
        u = torch.rand_like(logits).clamp(_NOISE_EPS, 1.0 - _NOISE_EPS)
        logits = (logits + torch.log(u) - torch.log1p(-u)) / temperature
    probs = torch.sigmoid(logits).clamp(PROB_EPS, 1.0 - PROB_EPS)
    hard = (probs > 0.5).to(probs.dtype)
    return probs, hard + probs - probs.detach()


def expected_segments(length: int, rate: float) -> float:
    """Segments per sample when each patch is a boundary with probability ``rate``: a segment
    ends at every boundary among the first ``length - 1`` patches, and one more ends with the
    sequence (whether or not its last patch is a boundary). A model trained to its prior 1 / c
    therefore runs at slightly less than c-fold compression (ViT-B-32 "10x": 5.8 segments of
    49 patches, 8.4x)."""
    return rate * (length - 1) + 1.0


def regular_boundaries(length: int, segments: int, device: torch.device | None = None) -> torch.Tensor:
    """0/1 boundaries cutting ``length`` patches into ``segments`` near-equal segments (the
    last boundary on the last patch). Used to pin the segment count (FLOPs, memory tests)."""
    if not 1 <= segments <= length:
        raise ValueError(f"segments must be in [1, {length}], got {segments}")
    ends = torch.div(torch.arange(1, segments + 1) * length + segments - 1, segments, rounding_mode="floor") - 1
    pattern = torch.zeros(length, device=device)
    pattern[ends.to(pattern.device)] = 1.0
    return pattern


class BoundaryPredictor(nn.Module):
    """MLP (Linear, GELU, Linear) giving one boundary logit per patch token.

    ``forced_segments``: when set (not ``None``), the hard boundaries are replaced by
    :func:`regular_boundaries` cutting that many segments (the MLP still runs and gradients
    still flow through the straight-through path); FLOP counting uses this to evaluate a
    model at a given compression regardless of what the untrained predictor outputs.
    """

    def __init__(self, dim: int, hidden: int, temperature: float = 0.5, prior: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < prior < 1.0:
            raise ValueError(f"boundary prior must be in (0, 1), got {prior}")
        self.temperature = temperature
        self.prior = prior
        self.forced_segments: int | None = None
        self.fc1 = Fp32Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Fp32Linear(hidden, 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Small weights and a bias at logit(prior): training starts near the target rate
        (starting at rate 0.5 would run a 10x model at 2x, and at 2x its memory, first)."""
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
        self.fc2.bias.fill_(math.log(self.prior / (1.0 - self.prior)))

    def forward(self, x: torch.Tensor) -> Boundaries:
        """``x``: (B, L, D) patch tokens -> :class:`Boundaries` over the L positions."""
        logits = self.fc2(self.act(self.fc1(x))).squeeze(-1)
        probs, hard = sample_boundaries(logits, self.temperature, stochastic=self.training)
        if self.forced_segments is not None:
            pattern = regular_boundaries(logits.shape[-1], self.forced_segments, logits.device)
            hard = pattern.expand_as(probs) + probs - probs.detach()
        return Boundaries(logits=logits, probs=probs, hard=hard)


def binomial_log_pmf(k: torch.Tensor, n: int, p: float) -> torch.Tensor:
    """log Binomial(n, p).pmf(k), differentiable in ``k`` (fp32)."""
    k = k.float()
    return (
        math.lgamma(n + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )


def boundary_rate_loss(hard: torch.Tensor, prior: float) -> torch.Tensor:
    """``-log Binomial(L, prior).pmf(sum of hard boundaries) / L``, averaged over samples.

    ``hard``: (B, L) straight-through boundaries; the count's gradient reaches the soft
    boundaries (Nawrot et al. 2023, ``BoundaryPredictor.calc_loss``).
    """
    length = hard.shape[-1]
    return (-binomial_log_pmf(hard.float().sum(-1), length, prior) / length).mean()
