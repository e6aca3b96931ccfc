"""DRIP: dynamic token pooling at one block boundary (Nawrot et al. 2023's DTP, for images).

Blocks ``[0, pre)`` see the full sequence; before block ``pre`` a boundary predictor cuts each
image's patch sequence into segments, patch tokens are mean-pooled within segments (CLS kept)
and blocks ``[pre, pre + shorten)`` run on the packed short sequences. With ``upsample`` the
segments are broadcast back to their patches (plus the pre-pooling tokens) before the ``post``
blocks. The boundary path runs in fp32 (see :mod:`..boundary`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..boundary import MAX_SEGMENTS_RATIO, THRESHOLD_MOMENTUM, Boundaries, expected_segments, make_boundary_predictor
from ..protocol import ForwardState, TokenWeights
from ..segments import make_packing, pack_segments, row_sizes, segment_ids, unpack_patches
from . import TokenPlan, TokenReducer, register_reducer

# What the boundary predictor reads: the tokens after the ``pre`` blocks (DTP's and H-Net's
# place), or the patch embeddings before positions are added (content only: after the position
# embedding, neighbouring tokens differ by position even on a uniform background).
PREDICTOR_INPUTS = ("tokens", "embed")


@register_reducer("drip")
class DripReducer(TokenReducer):
    """DRIP's pooling (see module doc). Reports ``boundary_loss`` (the predictor's rate loss),
    ``boundary_rate`` and ``compression`` (patch tokens / segments), the segment of every patch
    (``groups``: per-image counts follow from it) and the boundary probabilities (``scores``).

    ``selection`` (cosine router): ``"topk"`` a fixed count per image, ``"adaptive"`` a count
    that follows content at the rate on average, ``"threshold"`` H-Net's (see
    :class:`~dtp_ds.models.boundary.CosineBoundaryPredictor`); ``threshold_momentum``: the
    adaptive selection's calibration EMA; ``max_segments_ratio``: its per-image cap, a multiple
    of the prior's mean segment count (bounds packed attention's padded length).

    ``proportional_attention`` (default off): ToMe's rule for the pooled segments: a segment of
    ``k`` patches is one key, so every query's logit for it gets ``log k`` (CLS: size 1, no
    bias) in the shorten blocks, and it keeps the weight its patches had together; through the
    trunk's generic per-key bias (:class:`~dtp_ds.models.protocol.TokenWeights`). The sizes are
    counts (no gradient). After upsampling every token is one patch again: no bias."""

    stat_names = ("compression", "boundary_rate")

    def __init__(
        self,
        dim: int,
        depth: int,
        num_patches: int,
        pre: int,
        shorten: int,
        post: int = 0,
        upsample: bool = False,
        compression: float = 10.0,
        predictor_hidden: int | None = None,
        temperature: float = 0.5,
        predictor: str = "mlp",
        eval_rule: str = "expected",
        straight_through: str = "cumsum",
        predictor_input: str = "tokens",
        selection: str = "threshold",
        tied: bool = False,
        threshold_momentum: float = THRESHOLD_MOMENTUM,
        max_segments_ratio: float = MAX_SEGMENTS_RATIO,
        proportional_attention: bool = False,
    ) -> None:
        super().__init__()
        if post and not upsample:
            raise ValueError("post blocks need upsample=True (without it they are shorten blocks)")
        if compression <= 1.0:
            raise ValueError(f"compression must be > 1, got {compression}")
        if predictor_input not in PREDICTOR_INPUTS:
            raise ValueError(f"predictor_input must be one of {PREDICTOR_INPUTS}, got {predictor_input!r}")
        if not isinstance(proportional_attention, bool):
            raise ValueError(f"proportional_attention must be true or false, got {proportional_attention!r}")
        if pre + shorten + post != depth:
            raise ValueError(f"DRIP pre + shorten + post = {pre + shorten + post} != the trunk's {depth} blocks")
        self.layout = (pre, shorten, post)
        self.upsample = upsample
        self.compression = compression
        self.predictor_input = predictor_input
        self.predictor_hidden = predictor_hidden or dim
        self.proportional_attention = proportional_attention
        self.boundary_predictor = make_boundary_predictor(
            predictor, dim, predictor_hidden or dim, 1.0 / compression, temperature, eval_rule,
            straight_through, selection, tied, threshold_momentum, max_segments_ratio,
        )

    def upgrade_state_dict(self, state_dict: dict, trunk_prefix: str) -> None:
        """The first wave's trunk kept ``pre_blocks`` / ``shorten_blocks`` / ``post_blocks`` and
        its ``boundary_predictor`` on the trunk itself."""
        starts = {"pre_blocks.": 0, "shorten_blocks.": self.layout[0], "post_blocks.": self.layout[0] + self.layout[1]}
        for key in [k for k in state_dict if k.startswith(trunk_prefix)]:
            rest = key[len(trunk_prefix):]
            if rest.startswith("boundary_predictor."):
                state_dict[trunk_prefix + "reducer." + rest] = state_dict.pop(key)
            for old, start in starts.items():
                if rest.startswith(old):
                    index, tail = rest[len(old):].split(".", 1)
                    state_dict[f"{trunk_prefix}blocks.{start + int(index)}.{tail}"] = state_dict.pop(key)

    def pin(self, tokens: int | None) -> None:
        self.boundary_predictor.forced_segments = tokens

    def default_rate(self) -> float:
        return self.boundary_predictor.prior

    def planned_tokens(self, patches: int, depth: int, rate: float | None = None) -> list[float]:
        pre, shorten, post = self.layout
        pred = self.boundary_predictor
        segments = expected_segments(patches, self.default_rate() if rate is None else rate)
        if pred.forced_segments is not None:
            segments = float(pred.forced_segments)
        elif pred.same_count_per_image:  # top-k / evenly spaced: the rounded count, for every image
            segments = float(min(patches, max(1, round(segments))))
        return [patches + 1.0] * pre + [segments + 1.0] * shorten + [patches + 1.0] * post

    def plan(self, patches: int, depth: int, width: int, rate: float | None = None,
             padding_sigmas: float = 3.0) -> TokenPlan:
        """Short blocks run packed: the batch's longest sequence is ``padding_sigmas`` standard
        deviations of the binomial boundary count over the mean (no padding where every image
        gets the same count: top-k selection, evenly spaced or pinned boundaries); under a per-image
        cap (the adaptive router's) the cap itself: its counts spread far wider than a binomial's,
        and a batch's busiest image reaches it. The fp32 boundary path saves
        the predictor MLP's input and hidden layers, and pooling fp32 patch copies and sums."""
        pre, shorten, post = self.layout
        tokens = tuple(self.planned_tokens(patches, depth, rate))
        short = tokens[pre] if shorten else patches + 1.0
        p = self.default_rate() if rate is None else rate
        padded = None
        if padding_sigmas > 0 and not self.boundary_predictor.same_count_per_image:
            cap = self.boundary_predictor.segment_cap(patches)
            spread = short - 1.0 + padding_sigmas * math.sqrt(patches * p * (1 - p))
            padded = 1.0 + (float(cap) if cap < patches else min(float(patches), spread))
        predictor = patches * (width + 2 * self.predictor_hidden) * 4 + patches * 24
        pooling = 2 * patches * width * 4 + short * width * 4
        final = patches + 1.0 if self.upsample else short
        return TokenPlan(tokens, (None,) * pre + (padded,) * shorten + (None,) * post, final,
                         not self.upsample, predictor + pooling)

    def at_boundary(self, index: int, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        pre, shorten, _ = self.layout
        if index == pre:
            return self._pool(x, st)
        if index == pre + shorten and self.upsample:
            short, packing = x, st.packing
            cls_out = short.index_select(0, packing.starts).unsqueeze(1)
            st.packing, st.weights = None, None  # one patch per token again: no proportional bias
            return st.carry + torch.cat([cls_out, unpack_patches(short, packing)], dim=1)
        return x

    def _pool(self, x: torch.Tensor, st: ForwardState) -> torch.Tensor:
        bnd: Boundaries = self.boundary_predictor(x[:, 1:] if self.predictor_input == "tokens" else st.embed)
        ids = segment_ids(bnd.hard)
        packing = make_packing(ids)  # the forward's one host synchronisation
        weights = self.boundary_predictor.pooling_weights(bnd)
        st.aux_losses["boundary_loss"] = self.boundary_predictor.rate_loss(bnd)
        st.stats["boundary_rate"] = (bnd.hard.detach() > 0.5).float().mean()
        st.stats["compression"] = float(st.batch * st.patches) / packing.counts.sum()
        st.groups, st.scores = ids, bnd.probs.detach()
        st.extras["boundaries"] = bnd
        if self.upsample:
            st.carry = x  # the tokens before pooling: upsampling adds them back
        st.packing = packing
        if self.proportional_attention:
            st.weights = TokenWeights(attn_bias=row_sizes(packing).log())
        return pack_segments(x, packing, weights)


class capture_boundaries:
    """Context manager collecting the :class:`~dtp_ds.models.boundary.Boundaries` of every
    forward of every DRIP reducer inside ``model`` (``.captured``, in call order): exactly the
    boundaries those forwards pooled with."""

    def __init__(self, model: nn.Module) -> None:
        self.predictors = [m.boundary_predictor for m in model.modules() if isinstance(m, DripReducer)]
        self.captured: list = []

    def __enter__(self) -> capture_boundaries:
        self.handles = [p.register_forward_hook(lambda _m, _i, out: self.captured.append(out))
                        for p in self.predictors]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
