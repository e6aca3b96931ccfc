"""Boundary predictors, their rate losses and evaluation rules (see ``models/README.md``).

- :class:`MLPBoundaryPredictor`: DTP's MLP, Gumbel-Sigmoid in training, a deterministic rule at
  the training compression in evaluation, Binomial rate loss;
- :class:`CosineBoundaryPredictor`: H-Net's router; its ``selection`` decides how many
  boundaries: a threshold (H-Net), a fixed per-image budget (``topk``), or a batch-level budget
  whose count follows content (``adaptive``, evaluated at a threshold calibrated in training);
- :class:`FixedBoundaryPredictor`: evenly spaced boundaries (the control arm).

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

from .segments import straight_through_weights

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


PREDICTORS = ("mlp", "cosine", "fixed")
EVAL_RULES = ("expected", "threshold", "sample")
STRAIGHT_THROUGH = ("cumsum", "confidence")
SELECTIONS = ("threshold", "topk", "adaptive")
THRESHOLD_MOMENTUM = 0.99  # the adaptive router's running (EMA) estimate of its batch threshold
# the adaptive router's per-image cap, a multiple of the prior's mean segment count: packed
# attention pads a batch to its longest image, so the cap bounds that padded length
MAX_SEGMENTS_RATIO = 2.0
EVAL_SAMPLE_SEED = 0


def topk_boundaries(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """0/1 boundaries at each row's ``counts[b]`` most probable positions (ties: lower index)."""
    order = probs.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(probs.shape[-1], device=probs.device)
                                             .expand_as(order))
    return (ranks < counts.unsqueeze(-1)).to(probs.dtype)


def confidence_weights(probs: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """H-Net's confidence-weighted straight-through (Hwang, Wang, Gu 2025): value 1, gradient
    of the confidence in the decision taken (``p`` at a boundary, ``1 - p`` elsewhere). Used as
    pooling weights, each patch's decision gets the gradient of its own weight in its segment
    mean, which does not cancel as the cumulative-sum path's does (see :class:`MLPBoundaryPredictor`)."""
    hard = (hard.detach() > 0.5).to(probs.dtype)
    conf = hard * probs + (1.0 - hard) * (1.0 - probs)
    return 1.0 + (conf - conf.detach())


class BoundaryPredictorBase(nn.Module):
    """What every predictor shares: the prior rate, pinned segments, the pooling weights.

    ``forced_segments``: when set (not ``None``), the hard boundaries are replaced by
    :func:`regular_boundaries` cutting that many segments (gradients still flow through the
    straight-through path); FLOP counting uses this to evaluate a model at a given compression
    regardless of what the predictor outputs.
    """

    straight_through = "cumsum"

    @property
    def same_count_per_image(self) -> bool:
        """Whether every image gets the same number of segments (packed rows need no padding)."""
        return self.forced_segments is not None

    def __init__(self, prior: float) -> None:
        super().__init__()
        if not 0.0 < prior < 1.0:
            raise ValueError(f"boundary prior must be in (0, 1), got {prior}")
        self.prior = prior
        self.forced_segments: int | None = None

    def segment_cap(self, length: int) -> int:
        """The most segments an image of ``length`` patches can get (here: one per patch)."""
        return length

    def _finish(self, logits: torch.Tensor, probs: torch.Tensor, hard: torch.Tensor) -> Boundaries:
        if self.forced_segments is not None:
            pattern = regular_boundaries(probs.shape[-1], self.forced_segments, probs.device)
            hard = pattern.expand_as(probs) + probs - probs.detach()
        return Boundaries(logits=logits, probs=probs, hard=hard)

    def pooling_weights(self, bnd: Boundaries) -> torch.Tensor | None:
        """(B, L) weights of value 1 carrying the boundary gradient into the segment means;
        ``None`` when no gradient is wanted."""
        if not bnd.hard.requires_grad:
            return None
        if self.straight_through == "confidence":
            return confidence_weights(bnd.probs, bnd.hard)
        return straight_through_weights(bnd.hard)

    def rate_loss(self, bnd: Boundaries) -> torch.Tensor:
        raise NotImplementedError


class MLPBoundaryPredictor(BoundaryPredictorBase):
    """DTP's predictor (Nawrot et al. 2023): an MLP (Linear, GELU, Linear) gives one logit per
    patch token; training samples Gumbel-Sigmoid boundaries made hard with a straight-through
    estimator; the rate loss is ``-log Binomial(L, prior).pmf(count) / L``.

    Evaluation is deterministic and runs at the training compression (``eval_rule``):

    - ``"expected"`` (default): per image the ``k = round(sum of sigmoid(logits))`` most probable
      patches are boundaries. A Gumbel-Sigmoid sample has boundary ``l`` with probability exactly
      ``sigmoid(logit_l)``, so ``k`` is the count training draws on average;
    - ``"threshold"``: ``sigmoid(logit) > 0.5``, DTP's rule. A predictor near a prior < 0.5
      places no boundary at all under it (every image one segment);
    - ``"sample"``: a Bernoulli sample from a fixed seed (:data:`EVAL_SAMPLE_SEED`).

    ``straight_through``: ``"cumsum"`` is DTP's path (the gradient reaches boundary ``j``
    through the segment index of every later token); ``"confidence"`` H-Net's
    (:func:`confidence_weights`).
    """

    def __init__(self, dim: int, hidden: int, temperature: float = 0.5, prior: float = 0.5,
                 eval_rule: str = "expected", straight_through: str = "cumsum") -> None:
        super().__init__(prior)
        if eval_rule not in EVAL_RULES:
            raise ValueError(f"eval_rule must be one of {EVAL_RULES}, got {eval_rule!r}")
        if straight_through not in STRAIGHT_THROUGH:
            raise ValueError(f"straight_through must be one of {STRAIGHT_THROUGH}, got {straight_through!r}")
        self.temperature = temperature
        self.eval_rule = eval_rule
        self.straight_through = straight_through
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
        if self.training:
            probs, hard = sample_boundaries(logits, self.temperature, stochastic=True)
            return self._finish(logits, probs, hard)
        probs, hard = sample_boundaries(logits, self.temperature, stochastic=False)  # hard: threshold rule
        if self.eval_rule == "expected":
            counts = probs.detach().sum(-1).round().long()
            hard = topk_boundaries(probs.detach(), counts) + probs - probs.detach()
        elif self.eval_rule == "sample":
            gen = torch.Generator(device=probs.device).manual_seed(EVAL_SAMPLE_SEED)
            u = torch.rand(probs.shape, generator=gen, device=probs.device)
            hard = (u < probs.detach()).to(probs.dtype) + probs - probs.detach()
        return self._finish(logits, probs, hard)

    def rate_loss(self, bnd: Boundaries) -> torch.Tensor:
        return boundary_rate_loss(bnd.hard, self.prior)


BoundaryPredictor = MLPBoundaryPredictor  # the name earlier releases used


class CosineBoundaryPredictor(BoundaryPredictorBase):
    """H-Net's dynamic-chunking router (Hwang, Wang, Gu 2025), in raster order over patches.

    ``p_l = (1 - cos(W_q x_{l+1}, W_k x_l)) / 2``: a boundary after patch ``l`` is likely where
    the next patch differs from it. ``W_q``, ``W_k`` start at the identity, so from the first
    step boundaries sit where content changes. The last patch ends the sequence and so its
    segment (``p = 1``). Boundaries are ``p > 0.5`` in training and evaluation alike: the
    model evaluated is the model trained, with no eval rule to choose. The rate loss is
    H-Net's ratio loss on the selected fraction ``F`` (no gradient) and the mean probability
    ``G``, ``N / (N - 1) * ((N - 1) F G + (1 - F)(1 - G))`` with ``N = 1 / prior``, smallest at
    ``F = G = prior``, taken per image and averaged (H-Net takes it over the batch: per image
    every image is held near the target count, so an image unlike the training mix, one shape
    on a plain background, still runs near the training compression); the straight-through
    path is confidence-weighted.

    ``selection="topk"``: instead of the threshold, every image gets exactly the prior's segment
    count (:func:`expected_segments`, rounded), cut at its most dissimilar neighbouring pairs.
    The content decides where, the budget how many: compression, FLOPs and memory are fixed
    (equal lengths also skip attention padding), train and eval identical, and no rate loss.

    ``selection="adaptive"``: the count follows content, the *mean* meets the rate. In training
    the batch's ``round(B * prior * (L - 1))`` most dissimilar neighbouring pairs over all
    ``B * (L - 1)`` candidates are boundaries (one top-k over the batch): the batch's mean
    segment count is :func:`expected_segments` exactly, and a plain image gives up its budget
    to a busy one. That rule is a threshold on ``p``: the midpoint between the last pair taken
    and the first left (:attr:`threshold`, a buffer: checkpoints carry it) is tracked by a
    running mean (bias-corrected EMA, ``threshold_momentum``), and evaluation cuts every image
    at ``p > threshold`` on its own, so an image's segments never depend on its neighbours in a
    batch. Before any training step (``calibration_steps == 0``) evaluation falls back to the
    per-image top-k. Each image gets at most :meth:`segment_cap` segments (``max_segments_ratio``
    times the prior's mean count, rounded): packed attention pads a batch to its longest image,
    and the cap bounds that length. In training a pair outside its image's own top ``cap - 1``
    is no candidate of the batch's top-k (which still meets the rate exactly: the cap is never
    below the mean) nor of the calibrated threshold; evaluation cuts at the threshold, then
    keeps at most the image's top ``cap - 1`` pairs. No rate loss (the count is met by
    construction); the EMA stays fp32 under ``.half()`` / ``.bfloat16()``, whose rounding would
    freeze its small updates.
    """

    straight_through = "confidence"

    @property
    def same_count_per_image(self) -> bool:
        return self.selection == "topk" or self.forced_segments is not None

    def __init__(self, dim: int, prior: float = 0.5, selection: str = "threshold", tied: bool = False,
                 threshold_momentum: float = THRESHOLD_MOMENTUM,
                 max_segments_ratio: float = MAX_SEGMENTS_RATIO) -> None:
        super().__init__(prior)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if not 0.0 <= threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {threshold_momentum}")
        if not max_segments_ratio > 1.0:
            raise ValueError(f"max_segments_ratio must be > 1 (an image's segment cap as a multiple of the "
                             f"prior's mean count, which the batch must still meet), got {max_segments_ratio}")
        self.selection = selection
        self.threshold_momentum = threshold_momentum
        self.max_segments_ratio = max_segments_ratio
        if selection == "adaptive":  # only then: the other selections' checkpoints keep their keys
            self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float32))
            self.register_buffer("calibration_steps", torch.tensor(0, dtype=torch.long))
        self.q = Fp32Linear(dim, dim, bias=False)
        # tied: one projection for both sides, so identical neighbours always have p = 0 and a
        # boundary needs a change in content (separate ones can learn to cut uniform regions)
        self.k = None if tied else Fp32Linear(dim, dim, bias=False)
        self.reset_parameters()

    def segment_cap(self, length: int) -> int:
        """The adaptive selection's per-image cap: ``max_segments_ratio`` times the prior's mean
        count, rounded, never below the mean (so the batch's total is always reachable)."""
        if self.selection != "adaptive":
            return length
        mean = expected_segments(length, self.prior)
        return min(length, max(math.ceil(mean), round(self.max_segments_ratio * mean)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.eye_(self.q.weight)
        if self.k is not None:
            nn.init.eye_(self.k.weight)

    def forward(self, x: torch.Tensor) -> Boundaries:
        if self.k is None:
            z = F.normalize(self.q(x), dim=-1)
            q, k = z[:, 1:], z[:, :-1]
        else:
            q = F.normalize(self.q(x[:, 1:]), dim=-1)
            k = F.normalize(self.k(x[:, :-1]), dim=-1)
        cos = (q * k).sum(-1)
        probs = (0.5 * (1.0 - cos)).clamp(PROB_EPS, 1.0 - PROB_EPS)
        probs = torch.cat([probs, probs.new_ones(probs.shape[0], 1)], dim=-1)  # the sequence end
        logits = torch.logit(probs)
        if self.selection == "adaptive" and (self.training or int(self.calibration_steps) > 0):
            hard = self._adaptive(probs)
        elif self.selection in ("topk", "adaptive"):  # adaptive before calibration: the per-image budget
            length = int(probs.shape[-1])  # a tensor under fvcore's tracing
            k = min(length, max(1, round(expected_segments(length, self.prior)))) - 1
            counts = torch.full((probs.shape[0],), k, device=probs.device)
            hard = torch.cat([topk_boundaries(probs[:, :-1].detach(), counts), probs.new_ones(probs.shape[0], 1)], -1)
        else:
            hard = (probs > 0.5).to(probs.dtype)
        return self._finish(logits, probs, hard + probs - probs.detach())

    def _adaptive(self, probs: torch.Tensor) -> torch.Tensor:
        """0/1 boundaries of the adaptive selection (see the class doc); updates the calibrated
        threshold in training (unless the segment count is pinned)."""
        cand = probs[:, :-1].detach()
        ends = probs.new_ones(probs.shape[0], 1)
        batch, pairs = int(cand.shape[0]), int(cand.shape[1])  # tensors under fvcore's tracing
        per_image = self.segment_cap(pairs + 1) - 1  # boundaries an image may place before its end
        eligible = topk_boundaries(cand, torch.full((batch,), per_image, device=probs.device)) > 0.5
        if not self.training:
            return torch.cat([((cand > self.threshold.float()) & eligible).to(probs.dtype), ends], -1)
        total = min(batch * per_image, max(0, round(batch * self.prior * pairs)))
        flat = cand.masked_fill(~eligible, -1.0).reshape(1, -1)  # below every probability: never taken
        hard = topk_boundaries(flat, torch.full((1,), total, device=probs.device)).reshape(cand.shape)
        if self.forced_segments is None and flat.shape[1] > 0:
            top = flat.topk(min(total + 1, flat.shape[1]), dim=-1).values[0]
            taken = top[total - 1] if total > 0 else top[0].new_tensor(1.0)
            # the first eligible pair left (none left: 0, below every probability)
            left = top[total].clamp(min=0.0) if total < top.shape[0] else top[0].new_tensor(0.0)
            self._update_threshold(0.5 * (taken + left))
        return torch.cat([hard.to(probs.dtype), ends], -1)

    @torch.no_grad()
    def _update_threshold(self, batch_threshold: torch.Tensor) -> None:
        """Bias-corrected running mean: a plain average over the first ``1 / (1 - momentum)``
        steps, an EMA after, of the batch thresholds averaged over the data-parallel ranks."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # every data-parallel rank keeps the same threshold (as SyncBatchNorm's statistics): each
            # rank's own EMA would cut its evaluation shard differently from a checkpoint's reader
            batch_threshold = batch_threshold.detach().float().clone()
            torch.distributed.all_reduce(batch_threshold)
            batch_threshold /= torch.distributed.get_world_size()
        steps = int(self.calibration_steps) + 1
        alpha = max(1.0 - self.threshold_momentum, 1.0 / steps)
        self.threshold.lerp_(batch_threshold.to(self.threshold.dtype), alpha)
        self.calibration_steps.fill_(steps)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        kept = self.threshold.detach().clone() if self.selection == "adaptive" else None
        super()._apply(fn, recurse)
        if kept is not None and self.threshold.dtype != torch.float32:  # a cast: keep the fp32 value
            self.threshold.data = kept.to(self.threshold.device)
        return self

    def rate_loss(self, bnd: Boundaries) -> torch.Tensor:
        if self.selection in ("topk", "adaptive"):  # the count is met by construction: zero, still on the graph
            return bnd.probs.sum() * 0.0
        n = 1.0 / self.prior
        selected = (bnd.hard[:, :-1].detach() > 0.5).float().mean(-1)
        mean_prob = bnd.probs[:, :-1].float().mean(-1)
        per_image = n / (n - 1.0) * ((n - 1.0) * selected * mean_prob + (1.0 - selected) * (1.0 - mean_prob))
        return per_image.mean()


class FixedBoundaryPredictor(BoundaryPredictorBase):
    same_count_per_image = True

    """Control arm: evenly spaced boundaries at the prior's segment count
    (:func:`expected_segments`, rounded), the same for every image, in training and evaluation.
    Isolates what content-adaptive boundaries add over pooling at the same compression."""

    def __init__(self, prior: float = 0.5) -> None:
        super().__init__(prior)

    def forward(self, x: torch.Tensor) -> Boundaries:
        length = int(x.shape[1])  # a tensor under fvcore's tracing
        segments = min(length, max(1, round(expected_segments(length, self.prior))))
        hard = regular_boundaries(length, segments, x.device).expand(x.shape[0], -1)
        probs = hard.clamp(PROB_EPS, 1.0 - PROB_EPS)
        return self._finish(torch.logit(probs), probs, hard)

    def rate_loss(self, bnd: Boundaries) -> torch.Tensor:
        return bnd.probs.new_zeros(())


def make_boundary_predictor(kind: str, dim: int, hidden: int, prior: float, temperature: float = 0.5,
                            eval_rule: str = "expected", straight_through: str = "cumsum",
                            selection: str = "threshold", tied: bool = False,
                            threshold_momentum: float = THRESHOLD_MOMENTUM,
                            max_segments_ratio: float = MAX_SEGMENTS_RATIO) -> BoundaryPredictorBase:
    """The predictor a model JSON's ``predictor`` names (see :data:`PREDICTORS`)."""
    if kind == "mlp":
        return MLPBoundaryPredictor(dim, hidden, temperature, prior, eval_rule, straight_through)
    if kind == "cosine":
        return CosineBoundaryPredictor(dim, prior, selection, tied, threshold_momentum, max_segments_ratio)
    if kind == "fixed":
        return FixedBoundaryPredictor(prior)
    raise ValueError(f"predictor must be one of {PREDICTORS}, got {kind!r}")


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
